"""Sliding-window layers (Gemma 2/3, Mistral and Qwen2 with a sliding window, GPT-OSS): what they keep.

Such a layer attends only to its last ``sliding_window`` tokens, so its cache never grows past the
window. It keeps whichever of two windows is smaller per row in an fp16 cache (:func:`window_row_bytes`):

* :class:`XWindowForm`: the last ``window`` rows of its input X, quantized per token exactly as
  :class:`~xq_compile.forms.x.XForm` stores X (same rotation, codes, scales), in a ring buffer (row p at
  slot p % w). The pass rewrites the layer: K and V are rebuilt for the rows the model's own sliding
  mask covers, in the order transformers' static sliding-window layer returns them (see
  :class:`~xq_compile.cache.XWindowLayer`), with RoPE at each row's own position.
* :class:`ModelWindowForm`: the model's own K/V window (transformers' static sliding-window layer,
  rolled in place): the layer is left as the model wrote it, exact; the site report says why.

State (``B`` = batch, ``H`` = K/V heads, ``D`` = head dim, ``d`` = hidden size, ``w`` = window, ``L`` = capacity):
  XWindowForm:     the X form's state for min(L, w) rows (codes uint8 [B, w, packed], scale, zero fp16
                   [B, w, d / group_size]; unquantized x [B, w, d] in the cache dtype)
  ModelWindowForm: keys, values [B, H, min(L, w), D] in the cache dtype
"""

from __future__ import annotations

import sympy
import torch

from .. import quant
from ..config import XQuantConfig
from ..rotation import rotate
from .base import CacheForm, LayerShape, StateTensor
from .exact_rows import store_slots
from .per_token import per_token_spec
from .x import STATE_NAMES, XForm


def window_rows(rows, window: int):
    """Rows a window layer holds for a capacity of ``rows`` tokens (transformers' min(capacity, window))."""
    return min(rows, window) if isinstance(rows, int) else sympy.Min(rows, window)


def window_row_bytes(xquant: XQuantConfig, layer_idx: int, shape: LayerShape) -> tuple[int, int]:
    """(bytes of one row of the X window, of the model's K/V window) for one sequence in an fp16 cache:
    what decides a sliding-window layer's form. Compared in fp16, the narrowest cache dtype: X wins in
    any wider dtype where it wins in fp16 (its codes do not widen), so the choice never costs memory."""
    return (XWindowForm(xquant, layer_idx, shape).state_bytes(1, 2),
            ModelWindowForm(xquant, layer_idx, shape).state_bytes(1, 2))


def _x_window_supported(xquant: XQuantConfig) -> str | None:
    """Why no X window can be kept under ``xquant``, or None."""
    if xquant.has_window:
        return "an X window keeps no recent/sink rows exact"
    if xquant.cross_layer:
        return "XQuant-CL chains every layer's X"
    if xquant.scale_format != "fp16":
        return f"an X window keeps fp16 scales, not {xquant.scale_format}"
    return None


class XWindowForm(XForm):
    """A sliding-window layer's last ``window`` rows of X, quantized per token, in a ring buffer."""

    name = "x_window"

    @classmethod
    def applies(cls, xquant: XQuantConfig, layer_idx: int, shape: LayerShape) -> bool:
        if shape.sliding_window is None or _x_window_supported(xquant) is not None:
            return False
        x_bytes, kv_bytes = window_row_bytes(xquant, layer_idx, shape)
        return x_bytes < kv_bytes

    def __init__(self, xquant: XQuantConfig, layer_idx: int, shape: LayerShape) -> None:
        super().__init__(xquant, layer_idx, shape)
        self.sliding_window = shape.sliding_window

    def window_rows(self, rows):
        return window_rows(rows, self.sliding_window)

    def state_spec(self, batch, rows, dtype: torch.dtype) -> dict[str, StateTensor]:
        return per_token_spec(STATE_NAMES, self.width, self.bits, self.group_size, batch, self.window_rows(rows), dtype)

    def describe(self, note: str = "") -> str:
        x_bytes, kv_bytes = window_row_bytes(self.xquant, self.layer_idx, self.shape)
        return (f"X window ({self._bits_text()}, last {self.sliding_window} rows: {x_bytes} B/row, the model's "
                f"fp16 K/V window {kv_bytes} B/row{note})")

    # -- the rewrite ------------------------------------------------------------------------------
    def emit_window(self, ctx, start, count):
        """Emit the store of this call's rows (at ``ctx.index``, consecutive) into the ring, and return the
        X̂ rows [B, count, d] (model dtype) of cache rows ``start`` .. ``start + count - 1``: the rows the
        layer's sliding mask covers. The call's own rows come from its quantized chunk (the ring keeps
        only the last ``window`` of a longer chunk), older rows from the ring as it was before the store."""
        x = ctx.emit(rotate, ctx.x, ctx.rotation) if ctx.rotation is not None else ctx.x
        if self.bits is None:
            ring, chunk = (ctx.state["x"],), ctx.emit(lambda x, dtype: (x.to(dtype),), x, ctx.dtype)
        else:
            ring = (ctx.state["codes"], ctx.state["scale"], ctx.state["zero"])
            chunk = ctx.emit(quantized_chunk, x, self.bits, self.group_size)
        state = ctx.emit(rows_of_window, ring, chunk, ctx.index, start, count)
        ctx.emit(store_window, ring, chunk, ctx.index)
        if self.bits is None:
            return state[0]
        return ctx.emit(quant.dequantize, *state, self.bits, self.group_size, ctx.dtype)

    def emit_store(self, ctx) -> None:
        raise TypeError("an X window is stored and read by emit_window (the pass's window driver)")

    def emit_rebuild(self, ctx):
        raise TypeError("an X window is stored and read by emit_window (the pass's window driver)")

    def packed_rows(self, ctx):
        return None

    def fused_sources(self, ctx, rows: int):
        return None

    def after_crop(self, state: dict[str, torch.Tensor], before: int, after: int) -> None:
        """The ring still holds every row a query at ``after`` attends to (the cache refuses other crops)."""

    def emit_heads(self, ctx, heads, start):
        """The rebuilt K or V heads [..., count, D] of cache rows ``start``.. as the model's window holds them."""
        return ctx.emit(zero_unwritten_rows, heads, start, ctx.index)

    # simulation_hooks: XForm's. Per-token quantization does not depend on the other rows, and the eager
    # model's own sliding mask limits the rows each query sees, as the ring does.


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
        return window_rows(rows, self.window)

    def state_spec(self, batch, rows, dtype: torch.dtype) -> dict[str, StateTensor]:
        shape = (batch, self.num_kv_heads, self.window_rows(rows), self.head_dim)
        return {"keys": StateTensor(shape, dtype), "values": StateTensor(shape, dtype)}

    def fixed_bytes(self, dtype_bytes: int) -> int:
        return 8  # transformers' int64 length counter; the keys/values are the state itself

    def describe(self, note: str = "") -> str:
        why = _x_window_supported(self.xquant)
        if why is None:
            x_bytes, kv_bytes = window_row_bytes(self.xquant, self.layer_idx, self.shape)
            why = f"{kv_bytes} B/row in fp16, an X window {x_bytes} B/row"
        return (f"sliding-window layer (window {self.window}): K/V kept in the model's own window cache "
                f"({why}{note})")

    def simulation_hooks(self, k_proj, v_proj, chain: dict) -> list:
        return []  # exact: the compiled path leaves this layer's K/V as the model computes them


def quantized_chunk(x: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed codes, scale, zero) of ``x`` [B, s, d] per token, as :func:`~.per_token.store_quantized` stores them."""
    scale, zero = quant.scale_and_zero(x, bits, group_size)
    return quant.pack(quant.codes_for(x, scale, zero, bits, group_size), bits), scale, zero


def rows_of_window(ring: tuple, chunk: tuple, index: torch.Tensor, start, count) -> tuple:
    """The state rows of cache rows ``start`` .. ``start + count - 1``: rows this call writes (``index``,
    consecutive) from its ``chunk`` tensors [B, s, ...], older rows from slot p % w of the ``ring`` tensors
    [B, w, ...]. Rows not yet written read an unused slot (the sliding mask hides them). Static shapes."""
    p = torch.arange(count, device=index.device) + start
    first = index.min()
    new = (p >= first)[None, :, None]
    chunk_row = (p - first).clamp(0, chunk[0].shape[1] - 1)
    slot = p % ring[0].shape[1]
    return tuple(torch.where(new, c.index_select(1, chunk_row).to(r.dtype), r.index_select(1, slot))
                 for r, c in zip(ring, chunk))


def zero_unwritten_rows(heads: torch.Tensor, start, index: torch.Tensor) -> torch.Tensor:
    """``heads`` [..., count, D] (K or V of cache rows ``start``..) with the rows past the last one written
    zeroed: where transformers' window has never been written it holds zeros, and a query that masks every
    row (left padding) averages over all of them, so they must be the same."""
    p = torch.arange(heads.shape[-2], device=heads.device) + start
    return torch.where((p <= index.max())[:, None], heads, torch.zeros((), dtype=heads.dtype, device=heads.device))


def store_window(ring: tuple, chunk: tuple, index: torch.Tensor) -> None:
    """Write this call's rows (``index``) at slot p % w of the ring tensors: only the last w of them."""
    w = ring[0].shape[1]
    for target, rows in zip(ring, chunk):
        store_slots(target, rows, index % w, index > index.max() - w)
