"""XQuant-CL in the latent form: a layer caches the joint K|V latent X·U of the stacked [W_k; W_v],
per token, like X (a base layer), or its delta against the layers below (see :mod:`xq_compile.latent`).

State (``r`` = 2 x K/V heads x head dim, at most the hidden size): as the X form with rows of width r.

The graph carries X̃ (fp32, as wide as X) up the layers: a layer's latent is X̃·downᵀ plus its delta
(or its own rows, for a base layer), and X̃ then moves to match it in that layer's subspace.

With ``recent`` / ``sink`` (:mod:`.window`) the exact joint latent X·downᵀ of the window's rows is kept
too (stream ``latent``); X̃ stays the chain of quantized reconstructions (closed loop), the exact rows
replace the rebuilt latent only where K and V are projected from it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import quant
from ..config import XQuantConfig
from ..latent import LATENT_FACTORS, latent_width
from .base import CacheForm, LayerShape, StateTensor, refuse_log8_latent
from .per_token import per_token_spec
from .exact_rows import ExactRows
from .x import STATE_NAMES, emit_store_per_token


class JointLatentForm(CacheForm):
    """The joint K|V latent per token, chained across layers as XQuant-CL's X is."""

    name = "joint_latent"

    @classmethod
    def applies(cls, xquant: XQuantConfig, layer_idx: int, shape: LayerShape) -> bool:
        return xquant.form_of(shape.hidden_size, shape.kv_width) == "latent" and xquant.cross_layer

    def __init__(self, xquant: XQuantConfig, layer_idx: int, shape: LayerShape) -> None:
        super().__init__(xquant, layer_idx, shape)
        refuse_log8_latent(xquant, layer_idx, shape)
        self.width = latent_width(2 * shape.kv_width, 1, shape.hidden_size)
        self.stores_delta = xquant.stores_delta(layer_idx)
        self.window = ExactRows.of(xquant, self.bits)
        xquant.check_hidden_size(self.width, "the joint K|V latent width (2 x K/V heads x head dim)")

    @property
    def chained(self) -> bool:
        return True

    def state_spec(self, batch, rows, dtype: torch.dtype) -> dict[str, StateTensor]:
        spec = per_token_spec(STATE_NAMES, self.width, self.bits, self.group_size, batch, rows, dtype)
        if self.window is not None:
            spec.update(self.window.spec("latent", batch, self.width, dtype))
        return spec

    def describe(self, note: str = "") -> str:
        what = f"delta vs layer {self.layer_idx - 1}" if self.stores_delta else "base layer"
        window = f", {self.window.describe()}" if self.window is not None else ""
        return f"GQA joint K|V latent, {what} (cross-layer, {self._bits_text()} per token{window}{note})"

    # -- the rewrite ------------------------------------------------------------------------------
    def emit_store(self, ctx) -> None:
        down, _ = ctx.joint_factors()
        latent = ctx.emit(F.linear, ctx.x, down)
        if self.window is not None:
            self.window.emit_store(ctx, "latent", latent)
        if self.stores_delta:  # closed loop: against the layers below *as reconstructed*, in this subspace
            below = ctx.emit(lambda acc, i: acc.index_select(1, i), ctx.accumulator, ctx.index)
            latent = ctx.emit(lambda x, below, down: x.float() - F.linear(below, down.float()), latent, below, down)
        emit_store_per_token(ctx, STATE_NAMES, latent, self.bits, self.group_size)

    def emit_weights(self, ctx):
        _, up = ctx.joint_factors()
        kv = self.shape.kv_width
        return ctx.emit(lambda up: up.narrow(0, 0, kv), up), ctx.emit(lambda up: up.narrow(0, kv, kv), up)

    def emit_rebuild(self, ctx):
        down, _ = ctx.joint_factors()
        own = (ctx.emit(quant.dequantize, ctx.rows_of("codes"), ctx.rows_of("scale"), ctx.rows_of("zero"), self.bits,
                        self.group_size, torch.float32) if self.bits is not None else ctx.rows_of("x"))
        if ctx.accumulator is None:
            latent_hat = ctx.emit(lambda own: own.float(), own)
            ctx.accumulator = ctx.emit(lambda own, down: F.linear(own, down.float().t()), latent_hat, down)
        else:
            seen = ctx.emit(lambda acc, down: F.linear(acc, down.float()), ctx.accumulator, down)
            latent_hat = (ctx.emit(lambda seen, own: seen + own.float(), seen, own) if self.stores_delta
                          else ctx.emit(lambda own: own.float(), own))
            ctx.accumulator = ctx.emit(lambda acc, new, seen, down: acc + F.linear(new - seen, down.float().t()),
                                       ctx.accumulator, latent_hat, seen, down)
        rows = ctx.emit(lambda t, dtype: t.to(dtype), latent_hat, ctx.dtype)
        if self.window is not None:  # in K/V only: X̃ above stays the quantized chain
            rows = self.window.emit_exact(ctx, "latent", rows)
        return rows, rows

    # -- the runtime ------------------------------------------------------------------------------
    def after_crop(self, state: dict[str, torch.Tensor], before: int, after: int) -> None:
        if self.window is not None:
            self.window.after_crop(state, "latent", after)

    # -- the torch reference --------------------------------------------------------------------------
    def simulation_hooks(self, k_proj, v_proj, chain: dict) -> list:
        """The joint latent as the compiled path rebuilds it; ``chain["acc"]`` carries X̃ (fp32) from
        layer to layer within one forward call, as the graph's accumulator does."""
        if isinstance(v_proj, tuple):
            raise NotImplementedError("XQuant-CL in the latent form needs separate k_proj/v_proj projections")
        i, kv = self.layer_idx, k_proj.out_features

        def latent_hat(x):
            if chain.get(i, (None,))[0] is x:
                return chain[i][1], chain[i][2]
            down, up = LATENT_FACTORS.get_joint(k_proj.weight, v_proj.weight, rotation=self.rotation_for(x))
            latent, d32, bits, g = F.linear(x, down).float(), down.float(), self.bits, self.group_size
            below = chain.get("acc") if i > 0 else None
            if below is None:
                hat = quant.fake_quantize(latent, bits, g)
                acc = F.linear(hat, d32.t())
            else:
                seen = F.linear(below, d32)
                hat = (seen + quant.fake_quantize(latent - seen, bits, g) if self.stores_delta
                       else quant.fake_quantize(latent, bits, g))
                acc = below + F.linear(hat - seen, d32.t())
            if self.window is not None:  # in K/V only: X̃ above stays the quantized chain
                hat = self.window.simulate(latent, hat)
            chain["acc"], chain[i] = acc, (x, hat.to(x.dtype), up)
            return chain[i][1], up

        def key_hook(module, args, out):
            hat, up = latent_hat(args[0])
            return F.linear(hat, up[:kv], module.bias)

        def value_hook(module, args, out):
            hat, up = latent_hat(args[0])
            return F.linear(hat, up[kv:], module.bias)

        return [k_proj.register_forward_hook(key_hook), v_proj.register_forward_hook(value_hook)]
