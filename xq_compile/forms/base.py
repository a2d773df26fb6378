"""What every cache form provides: its state spec, its bytes, its graph code and its simulation.

A *form* is what one attention layer keeps in the cache instead of K and V (X per token, XQuant-CL's X
delta, the GQA latents, ...). One object per layer, chosen by :func:`xq_compile.forms.form_for`.
Everything that depends on the form goes through it:

* :meth:`CacheForm.state_spec`: names, shapes and dtypes of the layer's state tensors, for a capacity
  of ``rows`` tokens. The cache allocates from it (:func:`allocate`), and the memory formulas are the
  same spec evaluated at a symbolic ``rows`` (:meth:`CacheForm.state_bytes`), so the two cannot drift.
* :meth:`CacheForm.emit_store` / :meth:`CacheForm.emit_rebuild` / :meth:`CacheForm.fused_sources`: the
  graph code the rewrite emits for the layer, written as plain torch and recorded through the
  rewrite's :class:`~xq_compile.passes.context.SiteContext` (the services a form may use: its state
  as graph inputs, the rows written, the cached length, the weights and factors it needs).
* :meth:`CacheForm.simulation_hooks`: the same quantization as module hooks on the eager model
  (:func:`xq_compile.simulate.simulate_xquant`, the torch reference of the compiled path).
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, ClassVar

import sympy
import torch

from ..config import XQuantConfig
from ..rotation import rotation_of

if TYPE_CHECKING:  # the pass imports the forms, not the other way round
    from torch import fx

    from ..passes.context import SiteContext


@dataclasses.dataclass(frozen=True)
class LayerShape:
    """What decides a layer's form: the widths of its input X and its K (= V) projection, and its
    attention type (``sliding_window``: the window of a sliding-window layer, None for full attention)."""

    hidden_size: int
    kv_width: int  # K/V heads x head dim
    num_kv_heads: int | None = None
    sliding_window: int | None = None


@dataclasses.dataclass(frozen=True)
class StateTensor:
    """One tensor of a layer's state: ``shape`` may hold sympy expressions of a symbolic capacity."""

    shape: tuple
    dtype: torch.dtype

    def nbytes(self):
        return math.prod(self.shape) * self.dtype.itemsize


def ceil_div(a, b: int):
    """⌈a / b⌉ for an int or a sympy expression (the spec serves allocation and formulas alike)."""
    return -(-a // b) if isinstance(a, int) else sympy.ceiling(a / b)


def refuse_log8_latent(xquant: XQuantConfig, layer_idx: int, shape: LayerShape) -> None:
    """The GQA latent forms keep fp16 scales (the key latent is grouped along tokens, with an open group
    requantized as it fills): refuse the log8 scale format there, saying what to do."""
    if xquant.scale_format != "fp16":
        raise ValueError(
            f"XQuantConfig(scale_format={xquant.scale_format!r}) applies to the X forms only, but layer {layer_idx} "
            f"caches the GQA latents (its X, {shape.hidden_size} wide, is wider than K+V, {2 * shape.kv_width}): "
            "use scale_format='fp16', or form='x' to cache X itself.")


def allocate(spec: dict[str, StateTensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {name: torch.zeros(t.shape, dtype=t.dtype, device=device) for name, t in spec.items()}


@dataclasses.dataclass(frozen=True)
class FusedSources:
    """The state as the fused decode-attention op reads it (see kernels/decode_attention/op.py)."""

    key: tuple          # (codes, scale, zero, open-group tail or None)
    value: tuple        # (codes, scale, zero), or (None, None, None): the key source serves both
    layouts: tuple[str, str]
    key_channel0: "fx.Node | None"


class CacheForm:
    """Base of the forms: what a layer caches, how many bytes, and the code that writes and reads it."""

    name: ClassVar[str]
    rewritten: ClassVar[bool] = True  # False: the pass leaves the layer's site as the model wrote it

    def __init__(self, xquant: XQuantConfig, layer_idx: int, shape: LayerShape) -> None:
        self.xquant = xquant
        self.layer_idx = layer_idx
        self.shape = shape
        self.bits = xquant.bits_of_layer(layer_idx)
        self.group_size = xquant.group_size

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layer {self.layer_idx}: {self.describe()})"

    @classmethod
    def applies(cls, xquant: XQuantConfig, layer_idx: int, shape: LayerShape) -> bool:
        """Whether this form is the one for such a layer (the registry asks the forms in order)."""
        raise NotImplementedError

    # -- the state --------------------------------------------------------------------------------
    def state_spec(self, batch, rows, dtype: torch.dtype) -> dict[str, StateTensor]:
        """The layer's state tensors for ``batch`` sequences of capacity ``rows`` (int or sympy)."""
        raise NotImplementedError

    def state_bytes(self, rows, dtype_bytes: int):
        """Bytes of one sequence's state at capacity ``rows`` (an int, or a sympy expression)."""
        dtype = {2: torch.float16, 4: torch.float32, 8: torch.float64}[dtype_bytes]
        return sum(t.nbytes() for t in self.state_spec(1, rows, dtype).values())

    def fixed_bytes(self, dtype_bytes: int) -> int:
        """Bytes the cache layer holds besides the state, whatever the capacity: its stride-0 K and V
        placeholders (one element each) and its int64 length counter."""
        return 2 * dtype_bytes + 8

    def bytes_per_token(self, dtype_bytes: int) -> sympy.Rational:
        """What one more cached token costs as the capacity grows (fixed parts such as open groups
        vanish): the slope of :meth:`state_bytes` between two capacities that every group divides."""
        span = self.group_size * 2 ** 20
        slope = self.state_bytes(2 * span, dtype_bytes) - self.state_bytes(span, dtype_bytes)
        return sympy.Rational(int(slope), span)

    @property
    def chained(self) -> bool:
        """XQuant-CL: the layer is a link of the cross-layer chain (it reads or seeds the accumulator
        carrying the reconstruction of the layers below), so all layers must be in one graph, in order."""
        return False

    @property
    def consecutive_writes(self) -> bool:
        """Whether rows must be written in order (groups along tokens are quantized as they fill)."""
        return False

    def describe(self, note: str = "") -> str:
        """What the layer caches, for site reports and ``explain()`` (e.g. ``"X (4-bit)"``); ``note``
        goes inside the parentheses (e.g. who owns the state)."""
        raise NotImplementedError

    def rotation_for(self, x: torch.Tensor) -> torch.Tensor | None:
        """The block-Hadamard matrix X is rotated by (on ``x``'s device), or None."""
        return rotation_of(self.xquant, x.device)

    def _bits_text(self) -> str:
        return "unquantized" if self.bits is None else f"{self.bits}-bit"

    # -- the rewrite ------------------------------------------------------------------------------
    def emit_store(self, ctx: "SiteContext") -> None:
        """Emit the writes of this call's new rows (at ``ctx.index``) into the state."""
        raise NotImplementedError

    def emit_weights(self, ctx: "SiteContext") -> tuple["fx.Node", "fx.Node"]:
        """Emit the (key, value) weights that project the rebuilt rows to K and V heads: the model's
        own rows (X forms, the rotation folded in) or a latent's up factor."""
        raise NotImplementedError

    def emit_rebuild(self, ctx: "SiteContext") -> tuple["fx.Node", "fx.Node"]:
        """Emit the reconstruction of the cached rows K and V are projected from: (key rows, value
        rows), each [B, ctx.rows, width] in the model's dtype."""
        raise NotImplementedError

    def packed_rows(self, ctx: "SiteContext") -> tuple | None:
        """(codes, scale, zero) if the rows are packed X per token that the dequantize-and-project op
        can read directly (it then replaces :meth:`emit_rebuild`), else None."""
        return None

    def fused_sources(self, ctx: "SiteContext", rows: int) -> FusedSources | None:
        """The state for the fused decode-attention op reading ``rows`` rows, or None if it cannot."""
        return None

    # -- the runtime ------------------------------------------------------------------------------
    def after_crop(self, state: dict[str, torch.Tensor], before: int, after: int) -> None:
        """Fix up the state when the cache is cropped from ``before`` to ``after`` tokens."""

    # -- the torch reference --------------------------------------------------------------------------
    def simulation_hooks(self, k_proj: torch.nn.Module, v_proj: "torch.nn.Module | tuple", chain: dict) -> list:
        """Module hooks that make the eager model's K/V see what the compiled path rebuilds.

        ``v_proj`` is the V Linear, or for a fused projection ``k_proj`` (Phi-3's qkv_proj, gpt-fast's wqkv,
        GPT-NeoX's query_key_value) its (K rows, V rows) as :class:`~xq_compile.fused_rows.FusedRows`.
        ``chain`` is shared by the layers of one model (XQuant-CL's reconstruction of the layer below)."""
        raise NotImplementedError
