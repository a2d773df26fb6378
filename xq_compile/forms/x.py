"""The X forms: a layer caches its input X per token (XForm), or XQuant-CL's delta against the
reconstruction of the layer below (XDeltaForm).

State (``B`` = batch, ``L`` = capacity, ``d`` = hidden size, ``G = d / group_size``):
  quantized:   codes uint8 [B, L, packed_width(d, bits)], scale, zero fp16 [B, L, G]
               (scale_format="log8": scale_row fp16 [B, L, 1], scale_log8, zero_u8 uint8 [B, L, G],
               decoded to the fp16 scale/zero before every rebuild)
  unquantized: x [B, L, d] in the cache dtype

X is rotated by the block Hadamard R before quantizing; R is folded into the K/V weights, so the
rebuild is X̂·(W·R)ᵀ and costs nothing more. With XQuant-CL the graph carries an fp32 accumulator X̂ up
the layers: a base layer seeds it with its own X̂, a delta layer adds its dequantized delta to it.

With ``recent`` / ``sink`` (:mod:`.window`) the exact X·R of the window's rows is kept too, stream
``x``: x_recent [B, R, d], x_recent_rows int32 [B, R], x_sink [B, S, d] at 16 bits (fp16 for an fp32 cache). XQuant-CL's
accumulator stays the chain of *quantized* reconstructions (each delta is taken against what the
layer below rebuilds from its codes, whether or not the row is in the window: closed loop at every
length); the exact rows replace the reconstruction only in the rows K and V are projected from.
"""

from __future__ import annotations

import torch

from .. import quant
from ..config import XQuantConfig
from ..rotation import rotate
from .base import CacheForm, FusedSources, LayerShape, StateTensor
from .per_token import compact_names, decoded_scales, per_token_spec, store_quantized, store_quantized_log8, store_rows
from .exact_rows import ExactRows

STATE_NAMES = ("codes", "scale", "zero", "x")


def rotated_reconstruction(rotated_x: torch.Tensor, below: torch.Tensor | None, bits: int | None,
                           group_size: int, scale_format: str = "fp16") -> torch.Tensor:
    """X̂·R of one layer (fp32) from its rotated X: Q(X·R), or with XQuant-CL's delta against the
    reconstruction ``below`` of the layer underneath, X̂_{i-1}·R + Q(X·R - X̂_{i-1}·R)."""
    if below is None:
        return quant.fake_quantize_as(rotated_x.float(), bits, group_size, scale_format)
    return below + quant.fake_quantize_as(rotated_x.float() - below, bits, group_size, scale_format)


class XForm(CacheForm):
    """X itself, quantized per token (a base layer of XQuant-CL's chain when ``cross_layer``)."""

    name = "x"

    @classmethod
    def applies(cls, xquant: XQuantConfig, layer_idx: int, shape: LayerShape) -> bool:
        return xquant.form_of(shape.hidden_size, shape.kv_width) == "x" and not xquant.stores_delta(layer_idx)

    def __init__(self, xquant: XQuantConfig, layer_idx: int, shape: LayerShape) -> None:
        super().__init__(xquant, layer_idx, shape)
        self.width = shape.hidden_size
        xquant.check_hidden_size(self.width, "the hidden size")
        self.window = ExactRows.of(xquant, self.bits)

    @property
    def chained(self) -> bool:
        return self.xquant.cross_layer

    def state_spec(self, batch, rows, dtype: torch.dtype) -> dict[str, StateTensor]:
        spec = per_token_spec(STATE_NAMES, self.width, self.bits, self.group_size, batch, rows, dtype,
                              self.xquant.scale_format)
        if self.window is not None:
            spec.update(self.window.spec("x", batch, self.width, dtype))
        return spec

    def _bits_text(self) -> str:
        window = f", {self.window.describe()}" if self.window is not None else ""
        scales = f", {self.xquant.scale_format} scales" if self.bits is not None and self.log8 else ""
        return super()._bits_text() + scales + window

    @property
    def log8(self) -> bool:
        """Whether the rows keep their scales in the compact log8 format (see :mod:`xq_compile.quant`)."""
        return self.xquant.scale_format == "log8"

    def describe(self, note: str = "") -> str:
        return f"X ({self._bits_text()}{note})"

    # -- the rewrite ------------------------------------------------------------------------------
    def emit_store(self, ctx) -> None:
        x = ctx.emit(rotate, ctx.x, ctx.rotation) if ctx.rotation is not None else ctx.x
        if self.window is not None:
            self.window.emit_store(ctx, "x", x)
        below = self._emit_below(ctx)
        if below is not None:  # closed loop: the delta against the layer below *as reconstructed*
            x = ctx.emit(lambda x, below: x.float() - below, x, below)
        emit_store_per_token(ctx, STATE_NAMES, x, self.bits, self.group_size, self.xquant.scale_format)

    def _emit_below(self, ctx):
        return None

    def emit_weights(self, ctx):
        return ctx.model_weight("key"), ctx.model_weight("value")

    def emit_rebuild(self, ctx):
        # XQuant-CL accumulates in fp32 so that rounding does not build up over the layers.
        own_dtype = torch.float32 if self.chained else ctx.dtype
        own = (ctx.emit(quant.dequantize, ctx.rows_of("codes"), *self._emit_scales(ctx, ctx.rows_of), self.bits,
                        self.group_size, own_dtype) if self.bits is not None else ctx.rows_of("x"))
        own = self._emit_add_below(ctx, own)
        if self.chained:
            ctx.accumulator = own  # the quantized chain: what the layer above stored its deltas against
        rows = ctx.emit(lambda t, dtype: t.to(dtype), own, ctx.dtype) if own_dtype != ctx.dtype else own
        if self.window is not None:
            rows = self.window.emit_exact(ctx, "x", rows)
        return rows, rows

    def _emit_add_below(self, ctx, own):
        return own

    def _emit_scales(self, ctx, read) -> tuple:
        """(scale, zero) fp16 nodes of the rows ``read(name)`` returns: the stored ones, or in the log8
        format their decoding (working memory of the rebuild: the kernels then read the fp16 format)."""
        if not self.log8:
            return read("scale"), read("zero")
        return ctx.emit(decoded_scales, *(read(name) for name in compact_names("scale", "zero")), self.bits)

    def packed_rows(self, ctx):
        if self.bits is None or self.chained or self.window is not None:  # the op reads codes only
            return None
        return ctx.state["codes"], *self._emit_scales(ctx, ctx.state.__getitem__)

    def fused_sources(self, ctx, rows: int):
        if self.bits is None or self.chained or self.window is not None:  # the kernel reads codes only
            return None
        key = (ctx.state["codes"], *self._emit_scales(ctx, ctx.state.__getitem__), None)
        return FusedSources(key, (None, None, None), ("per_token", "per_token"), None)

    # -- the runtime ------------------------------------------------------------------------------
    def after_crop(self, state: dict[str, torch.Tensor], before: int, after: int) -> None:
        if self.window is not None:
            self.window.after_crop(state, "x", after)

    # -- the torch reference --------------------------------------------------------------------------
    def simulation_hooks(self, k_proj, v_proj, chain: dict) -> list:
        i, reconstructed = self.layer_idx, chain.setdefault("x", {})  # layer -> (its X, X̂·R)

        def x_hat(x: torch.Tensor) -> torch.Tensor:
            h = self.rotation_for(x)
            if i in reconstructed and reconstructed[i][0] is x:
                rotated_hat = reconstructed[i][1]  # v_proj of the layer whose k_proj just ran
            else:
                xr = rotate(x, h) if h is not None else x
                below = self._simulated_below(reconstructed)
                rotated_hat = rotated_reconstruction(xr, below, self.bits, self.group_size, self.xquant.scale_format)
                reconstructed[i] = (x, rotated_hat)
                if "trace" in chain:
                    chain["trace"][i] = (xr, below)
            x_hat = (rotate(rotated_hat, h) if h is not None else rotated_hat).to(x.dtype)
            # the window's rows exact in K/V only: the chain above keeps the quantized X̂ (closed loop)
            return self.window.simulate(x, x_hat, h) if self.window is not None else x_hat

        if isinstance(v_proj, tuple):  # fused projection: queries keep the exact X, K/V rows see X̂
            def fused(module, args, out):
                x = x_hat(args[0])
                for rows in v_proj:
                    bias = rows.of(module.bias) if module.bias is not None else None
                    out = rows.put(out, torch.nn.functional.linear(x, rows.of_weight(module.weight), bias))
                return out

            return [k_proj.register_forward_hook(fused)]
        hook = lambda module, args: (x_hat(args[0]), *args[1:])  # noqa: E731
        return [k_proj.register_forward_pre_hook(hook), v_proj.register_forward_pre_hook(hook)]

    def _simulated_below(self, reconstructed: dict):
        return None


class XDeltaForm(XForm):
    """XQuant-CL above the base layers: Q(X·R - X̂_{i-1}·R), the delta against the layer below."""

    name = "x_delta"

    @classmethod
    def applies(cls, xquant: XQuantConfig, layer_idx: int, shape: LayerShape) -> bool:
        return xquant.form_of(shape.hidden_size, shape.kv_width) == "x" and xquant.stores_delta(layer_idx)

    @property
    def chained(self) -> bool:
        return True

    def describe(self, note: str = "") -> str:
        return f"X delta vs layer {self.layer_idx - 1} (cross-layer, {self._bits_text()}{note})"

    def _emit_below(self, ctx):
        return ctx.emit(lambda acc, i: acc.index_select(1, i), ctx.accumulator, ctx.index)

    def _emit_add_below(self, ctx, own):
        return ctx.emit(lambda acc, delta: acc + delta.float(), ctx.accumulator, own)

    def _simulated_below(self, reconstructed: dict):
        return reconstructed[self.layer_idx - 1][1]


def emit_store_per_token(ctx, names: tuple[str, str, str, str], rows, bits: int | None, group_size: int,
                         scale_format: str = "fp16") -> None:
    """Emit the store of ``rows`` per token into the state tensors ``names`` (codes, scale, zero, raw)."""
    codes, scale, zero, raw = names
    if bits is None:
        ctx.emit(store_rows, ctx.state[raw], ctx.index, rows)
    elif scale_format == "log8":
        ctx.emit(store_quantized_log8, ctx.state[codes], *(ctx.state[n] for n in compact_names(scale, zero)), rows,
                 ctx.index, bits, group_size)
    else:
        ctx.emit(store_quantized, ctx.state[codes], ctx.state[scale], ctx.state[zero], rows, ctx.index, bits,
                 group_size)
