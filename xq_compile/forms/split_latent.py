"""The GQA latent form: a layer caches the key latent X·U_k and the value latent X·U_v (see
:mod:`xq_compile.latent` for the factors and the key latent's grouping along tokens).

State (``r`` = latent width = K/V heads x head dim, ``g`` = group size, ``G = ceil(L/g)`` token groups):
  quantized:   k_codes uint8 [B, G·g, packed_width(r, bits)], k_scale/k_zero fp16 [B, G, r] (per channel
               per token group; the open group's at open_bits, see xq_compile.latent), k_low uint8
               [B, g, packed_width(r, 4)] (the open group's low code bits), optional
               k_col0 fp16 [B, L] (channel 0 kept exact); v_codes [B, L, packed], v_scale/v_zero fp16
               [B, L, r/g] (per token)
  unquantized: k_latent, v_latent [B, L, r] in the cache dtype

With ``recent`` / ``sink`` (:mod:`.window`) both latents keep their window's rows exact (streams ``k``
and ``v``: the key latent's last R rows too, not only its open group, which holds fewer than g rows
and only until its group closes): k_recent, v_recent [B, R, r], k_sink, v_sink [B, S, r] in the cache
dtype, plus k_recent_rows, v_recent_rows int32 [B, R].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import quant
from ..config import XQuantConfig
from ..latent import (ROW_DTYPE, LATENT_FACTORS, LOW_BITS, fake_quantize_key_latent, key_latent_rows,
                      latent_width, open_bits, open_key_group, reopen_key_group, store_key_latent)
from .base import CacheForm, FusedSources, LayerShape, StateTensor, ceil_div, refuse_log8_latent
from .per_token import per_token_spec, store_rows
from .exact_rows import ExactRows
from .x import emit_store_per_token

VALUE_NAMES = ("v_codes", "v_scale", "v_zero", "v_latent")
KEY_NAMES = ("k_codes", "k_scale", "k_zero", "k_low")


class SplitLatentForm(CacheForm):
    """Key latent per channel over token groups (the open group at open_bits), value latent per token
    (rotated)."""

    name = "latent"

    @classmethod
    def applies(cls, xquant: XQuantConfig, layer_idx: int, shape: LayerShape) -> bool:
        return xquant.form_of(shape.hidden_size, shape.kv_width) == "latent" and not xquant.cross_layer

    def __init__(self, xquant: XQuantConfig, layer_idx: int, shape: LayerShape) -> None:
        super().__init__(xquant, layer_idx, shape)
        refuse_log8_latent(xquant, layer_idx, shape)
        self.width = latent_width(shape.kv_width, 1, shape.hidden_size)
        self.keep_channel0 = xquant.keep_channel0
        self.window = ExactRows.of(xquant, self.bits)
        if self.bits is not None or xquant.rotation == "hadamard":  # quantized, or the value latent rotated
            xquant.check_hidden_size(self.width, "the latent width (K/V heads x head dim)")

    @property
    def consecutive_writes(self) -> bool:
        return self.bits is not None  # a key group is quantized from its rows in order

    def state_spec(self, batch, rows, dtype: torch.dtype) -> dict[str, StateTensor]:
        r, g, bits = self.width, self.group_size, self.bits
        if bits is None:
            return {name: StateTensor((batch, rows, r), dtype) for name in ("k_latent", "v_latent")}
        key_groups = ceil_div(rows, g)
        spec = {
            "k_codes": StateTensor((batch, key_groups * g, quant.packed_width(r, bits)), torch.uint8),
            "k_scale": StateTensor((batch, key_groups, r), quant.SCALE_DTYPE),
            "k_zero": StateTensor((batch, key_groups, r), quant.SCALE_DTYPE),
            "k_low": StateTensor((batch, g, quant.packed_width(r, LOW_BITS)), torch.uint8),
            **per_token_spec(VALUE_NAMES, r, bits, g, batch, rows, dtype),
        }
        if self.keep_channel0:
            spec["k_col0"] = StateTensor((batch, rows), ROW_DTYPE)
        if self.window is not None:
            spec.update({**self.window.spec("k", batch, r, dtype), **self.window.spec("v", batch, r, dtype)})
        return spec

    def describe(self, note: str = "") -> str:
        if self.bits is None:
            return f"GQA latents X·U_k and X·U_v (unquantized{note})"
        bits, channel0 = self._bits_text(), ", channel 0 fp16" if self.keep_channel0 else ""
        window = f", {self.window.describe()}" if self.window is not None else ""
        return (f"GQA latent X·U_k ({bits}, per channel over {self.group_size}-token groups, open group "
                f"{open_bits(self.bits)}-bit{channel0}{window}) + X·U_v ({bits}, per token{window}{note})")

    # -- the rewrite ------------------------------------------------------------------------------
    # The key latent is not rotated: its per-channel groups already give every channel (the outlier
    # channel 0 included) its own range; the value latent is quantized per token, rotated.
    def emit_store(self, ctx) -> None:
        (k_down, _), (v_down, _) = ctx.latent_factors("key", rotated=False), ctx.latent_factors("value", rotated=True)
        key_latent, st = ctx.emit(F.linear, ctx.x, k_down), ctx.state
        if self.bits is None:
            ctx.emit(store_rows, st["k_latent"], ctx.index, key_latent)
        else:
            start = ctx.emit(lambda i: i.min(), ctx.index)
            ctx.emit(store_key_latent, *self._key_state(st), key_latent, start, self.bits, self.group_size)
            if self.keep_channel0:
                ctx.emit(store_rows, st["k_col0"], ctx.index, ctx.emit(lambda t: t[..., 0], key_latent))
        value_latent = ctx.emit(F.linear, ctx.x, v_down)
        emit_store_per_token(ctx, VALUE_NAMES, value_latent, self.bits, self.group_size)
        if self.window is not None:
            self.window.emit_store(ctx, "k", key_latent)
            self.window.emit_store(ctx, "v", value_latent)

    def emit_weights(self, ctx):
        return ctx.latent_factors("key", rotated=False)[1], ctx.latent_factors("value", rotated=True)[1]

    def emit_rebuild(self, ctx):
        if self.bits is None:
            return ctx.rows_of("k_latent"), ctx.rows_of("v_latent")
        st, g = ctx.state, self.group_size
        key_rows = ctx.emit(key_latent_rows, *self._key_state(st), ctx.rows, ctx.length, self.bits, g, ctx.dtype,
                            st.get("k_col0"))
        value_rows = ctx.emit(quant.dequantize, ctx.rows_of("v_codes"), ctx.rows_of("v_scale"), ctx.rows_of("v_zero"),
                              self.bits, g, ctx.dtype)
        if self.window is not None:
            key_rows = self.window.emit_exact(ctx, "k", key_rows)
            value_rows = self.window.emit_exact(ctx, "v", value_rows)
        return key_rows, value_rows

    def fused_sources(self, ctx, rows: int):
        if self.bits is None or self.window is not None:  # the kernel reads codes and the open group only
            return None
        st, key_groups = ctx.state, ceil_div(rows, self.group_size)
        key = (ctx.emit(lambda t: t.narrow(1, 0, rows), st["k_codes"]),
               ctx.emit(lambda t: t.narrow(1, 0, key_groups), st["k_scale"]),
               ctx.emit(lambda t: t.narrow(1, 0, key_groups), st["k_zero"]),
               ctx.emit(open_key_group, *self._key_state(st), ctx.length, self.bits, self.group_size, ctx.dtype))
        value = (st["v_codes"], st["v_scale"], st["v_zero"])
        return FusedSources(key, value, ("per_channel", "per_token"), st.get("k_col0"))

    # -- the runtime ------------------------------------------------------------------------------
    def after_crop(self, state: dict[str, torch.Tensor], before: int, after: int) -> None:
        """After a crop into a completed key group, make it the open group again with its kept rows.

        The next store continues that group; its kept rows were quantized at the cache's bits already,
        so they are quantized at open_bits from their dequantized values (a second rounding, for those
        rows only).
        """
        g = self.group_size
        if self.window is not None:
            self.window.after_crop(state, "k", after)
            self.window.after_crop(state, "v", after)
        if self.bits is None or after // g == before // g or after % g == 0:
            return  # still the same open group, or the crop ends on a group boundary
        group = after // g
        end = (group + 1) * g  # the group was complete: rows up to its end are per channel at the cache's bits
        rows = key_latent_rows(*self._key_state(state), after, end, self.bits, g, torch.float32)
        reopen_key_group(*self._key_state(state), rows[:, group * g:], group, self.bits, g)

    @staticmethod
    def _key_state(state) -> tuple:
        """(codes, scale, zero, low) of the key latent: state tensors or graph nodes."""
        return tuple(state[name] for name in KEY_NAMES)

    # -- the torch reference --------------------------------------------------------------------------
    def simulation_hooks(self, k_proj, v_proj, chain: dict) -> list:
        """K and V from the latents as the cache holds them once the window is written: complete key
        groups per channel, the open group per channel at open_bits, the value latent per token (rotated)."""
        def key_latent(latent):
            return self._simulated_window(latent, fake_quantize_key_latent(latent, self.bits, self.group_size,
                                                                           self.keep_channel0))

        def value_latent(latent):
            return self._simulated_window(latent, quant.fake_quantize(latent, self.bits, self.group_size))

        return latent_projection_hooks(k_proj, v_proj, (
            lambda x: None, key_latent), (self.rotation_for, value_latent))

    def _simulated_window(self, exact, approx):
        return self.window.simulate(exact, approx) if self.window is not None else approx


def latent_projection_hooks(k_proj, v_proj, key, value) -> list:
    """Hooks replacing K (V) by ``up · quantize(down · x)`` with the latent factors of its weight rows.

    ``key`` / ``value``: (rotation of x or None, the latent's quantization). ``v_proj`` is the V Linear,
    or for a fused projection ``k_proj`` its (K rows, V rows) (the queries keep exact X)."""
    def project(module, x, rows, rotation_of, quantize):
        down, up = LATENT_FACTORS.get(module.weight, rows, rotation_of(x))
        bias = module.bias if module.bias is None or rows is None else rows.of(module.bias)
        return F.linear(quantize(F.linear(x, down)), up, bias)

    if isinstance(v_proj, tuple):
        k_rows, v_rows = v_proj

        def fused(module, args, out):
            k, v = project(module, args[0], k_rows, *key), project(module, args[0], v_rows, *value)
            return v_rows.put(k_rows.put(out, k), v)

        return [k_proj.register_forward_hook(fused)]
    return [k_proj.register_forward_hook(lambda m, a, o: project(m, a[0], None, *key)),
            v_proj.register_forward_hook(lambda m, a, o: project(m, a[0], None, *value))]
