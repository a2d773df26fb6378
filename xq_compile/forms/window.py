"""The model's own K/V window: what a sliding-window layer keeps (Gemma 2/3, Mistral and Qwen2 with a
sliding window, GPT-OSS).

Such a layer attends only to its last ``sliding_window`` tokens, so its cache never grows past the
window. It is left as the model wrote it: the cache layer is transformers' own static sliding-window
layer (a ring buffer of K and V rolled in place), so the masks and positions are transformers' own and
the layer is exact. The rewrite leaves its site unmodified and reports why (:meth:`describe`); the
simulation installs no hooks. Quantizing the window's rows (an X or latent ring buffer) would be a
specialization of this form, registered before it.

State (``B`` = batch, ``H`` = K/V heads, ``D`` = head dim, ``w`` = window, ``L`` = capacity):
  keys, values [B, H, min(L, w), D] in the cache dtype
"""

from __future__ import annotations

import sympy
import torch

from ..config import XQuantConfig
from .base import CacheForm, LayerShape, StateTensor


class ModelWindowForm(CacheForm):
    """A sliding-window layer's K and V as the model computes them, only the last ``window`` rows."""

    name = "model_window"
    rewritten = False  # the site report gives describe() as the reason

    @classmethod
    def applies(cls, xquant: XQuantConfig, layer_idx: int, shape: LayerShape) -> bool:
        return shape.sliding_window is not None

    def __init__(self, xquant: XQuantConfig, layer_idx: int, shape: LayerShape) -> None:
        super().__init__(xquant, layer_idx, shape)
        self.window = shape.sliding_window
        # Heads unknown (e.g. to the simulation, which needs no state): one head of the full width, same bytes
        self.num_kv_heads = shape.num_kv_heads or 1
        self.head_dim = shape.kv_width // self.num_kv_heads

    def window_rows(self, rows):
        """Rows the layer holds for a capacity of ``rows`` tokens (transformers' min(capacity, window))."""
        return min(rows, self.window) if isinstance(rows, int) else sympy.Min(rows, self.window)

    def state_spec(self, batch, rows, dtype: torch.dtype) -> dict[str, StateTensor]:
        shape = (batch, self.num_kv_heads, self.window_rows(rows), self.head_dim)
        return {"keys": StateTensor(shape, dtype), "values": StateTensor(shape, dtype)}

    def fixed_bytes(self, dtype_bytes: int) -> int:
        return 8  # transformers' int64 length counter; the keys/values are the state itself

    def describe(self, note: str = "") -> str:
        return f"sliding-window layer (window {self.window}): K/V kept in the model's own window cache{note}"

    def simulation_hooks(self, k_proj, v_proj, chain: dict) -> list:
        return []  # exact: the compiled path leaves this layer's K/V as the model computes them
