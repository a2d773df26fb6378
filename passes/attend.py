"""Attention over the rebuilt cache: the layer's SDPA call replaced by one over the n rebuilt rows
(or the absorbed-values form), or by the fused decode-attention op over the packed cache."""

from __future__ import annotations

import dataclasses
import operator

import torch
from torch import fx

from xq_compile._torch_private import forget_example_values
from xq_compile.attention import absorbed_attention, decode_sdpa
from xq_compile.forms import FusedSources

from .context import SiteContext
from .emit import Emitter
from .graph_state import GraphState
from .match import AttentionRead, Site, _arg, example_value
from .rope import default_rope, rope_at_cached_rows


def plain_rope(site: Site) -> tuple[fx.Node, fx.Node] | None:
    """(cos, sin) if the key's per-token region is exactly HF's ``k·cos + rotate_half(k)·sin``, else None.

    The fused decode-attention kernel applies that RoPE itself; anything else between the projection
    and the cache (another rotation layout, a norm other than :func:`key_norm_then_rope`'s) keeps the
    unfused form.
    """
    found = _rope_of(site.key.heads, site.key.append.value, site.head_dim // 2)
    return found[:2] if found is not None and set(site.key.rope) == found[2] else None


def _rope_of(k: fx.Node, out: fx.Node, half: int) -> tuple[fx.Node, fx.Node, set[fx.Node]] | None:
    """(cos, sin, the RoPE's nodes) if ``out`` is HF's ``k·cos + rotate_half(k)·sin``, else None."""

    def operands(node, targets):
        ok = node.op == "call_function" and node.target in targets and len(node.args) == 2 and not node.kwargs
        return node.args if ok else None

    def is_half(node, upper):
        if node.op != "call_function" or node.target is not operator.getitem or node.args[0] is not k:
            return False
        index = node.args[1]
        want = slice(half, None, None) if upper else slice(None, half, None)
        return isinstance(index, tuple) and len(index) == 2 and index[0] is Ellipsis and index[1] == want

    pair = operands(out, (operator.add, torch.add))
    for direct, rotated in (pair, pair[::-1]) if pair else ():
        a, b = operands(direct, (operator.mul, torch.mul)), operands(rotated, (operator.mul, torch.mul))
        if not a or not b or k not in a:
            continue
        cat = next((x for x in b if isinstance(x, fx.Node) and x.target is torch.cat), None)
        if cat is None or len(cat.args[0]) != 2 or cat.kwargs.get("dim", cat.args[1] if len(cat.args) > 1 else 0) not in (-1, 3):
            continue
        neg, lower = cat.args[0]
        if neg.op != "call_function" or neg.target not in (operator.neg, torch.neg):
            continue
        if not (is_half(neg.args[0], upper=True) and is_half(lower, upper=False)):
            continue
        nodes = {direct, rotated, out, cat, neg, neg.args[0], lower}
        return a[1] if a[0] is k else a[0], b[1] if b[0] is cat else b[0], nodes
    return None


@dataclasses.dataclass(frozen=True)
class KeyNormRead:
    """A per-head RMSNorm of the keys before RoPE, as the graph computes it: ``x · rsqrt(mean(x²) + eps) ·
    weight``; ``weight`` the node of the multiplier [head_dim] (Qwen3's parameter, or Gemma 3's
    ``1 + w.float()``), read at run time."""

    weight: fx.Node
    eps: float


def key_norm_then_rope(site: Site) -> tuple[KeyNormRead, tuple[fx.Node, fx.Node]] | None:
    """(the norm, (cos, sin)) if the key's per-token region is exactly a per-head RMSNorm of the heads, then
    HF's RoPE -- with the transpose to [B, H, S, D] before the norm (Gemma 3) or after it (Qwen3), as
    transformers writes their ``k_norm`` -- else None. Casts between the steps (``to``, ``float``,
    ``type_as``) are allowed: the fused kernel computes the norm in fp32 and rounds K once, after RoPE."""
    heads, layout, half = site.key.heads, site.key.layout, site.head_dim // 2
    if layout not in ("[B, S, H, D]", "[B, H, S, D]"):
        return None
    # the keys RoPE reads: the norm's output (or its transpose)
    k, rope = next(((k, found) for k in site.key.rope if (found := _rope_of(k, site.key.append.value, half))),
                   (None, None))
    if rope is None:
        return None
    seen = {k}

    def uncast(node):
        while (isinstance(node, fx.Node) and node.op == "call_method" and node.target in ("to", "float", "type_as")
               and all(not isinstance(a, fx.Node) or node.target == "type_as" for a in node.args[1:])):
            seen.add(node)
            node = node.args[0]
        return node

    def call(node, *, functions=(), methods=()):
        ok = isinstance(node, fx.Node) and (node.op == "call_function" and node.target in functions
                                            or node.op == "call_method" and node.target in methods)
        if ok:
            seen.add(node)
        return ok

    def is_heads(node):
        return uncast(node) is heads

    if layout == "[B, S, H, D]":  # norm, then the transpose RoPE reads
        if not call(k, methods=("transpose",)) or tuple(k.args[1:]) not in ((1, 2), (2, 1)):
            return None
        product = uncast(k.args[0])
    else:
        product = uncast(k)
    if not call(product, functions=(operator.mul, torch.mul)) or len(product.args) != 2:
        return None
    # normalized · weight, either order; the weight does not depend on the tokens
    for normed, weight in (product.args, product.args[::-1]):
        normed = uncast(normed)
        if not call(normed, functions=(operator.mul, torch.mul)) or weight in site.key.rope:
            continue
        shape = getattr(example_value(weight), "shape", None)
        if shape is None or tuple(shape) != (site.head_dim,):
            continue
        x, root = normed.args if is_heads(normed.args[0]) else normed.args[::-1]
        if not is_heads(x) or not call(root, functions=(torch.rsqrt,)):
            continue
        total = root.args[0]
        if not call(total, functions=(operator.add, torch.add)):
            continue
        mean, eps = total.args if isinstance(total.args[1], float) else total.args[::-1]
        if not isinstance(eps, float) or not call(mean, methods=("mean",)):
            continue
        axis = mean.args[1] if len(mean.args) > 1 else mean.kwargs.get("dim")
        if axis not in (-1, 3, (-1,), [-1]) or not mean.kwargs.get("keepdim", False):
            continue
        square = mean.args[0]
        if (not call(square, methods=("pow",), functions=(torch.pow,)) or square.args[1:] != (2,)
                or not is_heads(square.args[0])):
            continue
        if set(site.key.rope) != (seen | rope[2]) - {heads}:
            return None  # something else happens between the projection and the cache
        return KeyNormRead(weight, eps), rope[:2]
    return None


def fused_decode_attention(ctx: SiteContext, attention: AttentionRead, rope: tuple[fx.Node, fx.Node],
                           sources: FusedSources, weights: tuple[fx.Node, fx.Node],
                           key_norm: KeyNormRead | None = None) -> str:
    """Replace the layer's SDPA by ``xq_compile::decode_attention`` over the packed cache (emitted
    before the SDPA, where ``sources`` and ``weights`` were), the keys through ``key_norm`` where given.
    Returns how the op gets RoPE, for the site's report: "RoPE from positions", or "RoPE tables: <why not
    from the positions>" (then ", key norm in the kernel" where it applies one)."""
    state, emit, site, layer, sdpa = ctx.graph_state, ctx.emit, ctx.site, ctx.layer, attention.sdpa
    L, D, B = layer.max_cache_len, site.head_dim, layer.batch_size
    found = default_rope(*rope, site.position_source, D)
    table = example_value(rope[0])
    if not isinstance(found, str) and (table is None or table.dtype != layer.dtype):
        # the kernel rounds cos/sin once, to the model dtype; tables in another dtype would be rounded twice
        found = f"the model's RoPE tables are {getattr(table, 'dtype', 'of unknown dtype')}, not {layer.dtype}"
    if isinstance(found, str):
        # cos/sin of every cached row: the model's own table code, cloned with the cached positions
        state.rope_tables.setdefault(site.position_source, state.positions)
        rope_at_cached_rows(state, site, rope, L)
        cos, sin = (emit(lambda t: t.reshape(-1, L, D).expand(B, L, D).to(layer.dtype).contiguous(),
                         state.rope_tables.get(t, t)) for t in rope)
        computed, note = (None, None, 1.0), f"RoPE tables: {found}"
    else:
        # transformers' default rotary embedding: the kernel computes cos/sin from the cached rows'
        # positions (8 bytes a row instead of the tables' 4·D), with the model's own inv_freq (a graph
        # input, read at run time as the tables read it) and attention_scaling
        cos = sin = None
        positions = emit(lambda p: p.reshape(-1, L).expand(B, L), state.positions)  # [L] (shared) or [B, L]
        inv_freq = emit(lambda f: f.to(torch.float32).reshape(-1), found.inv_freq)
        computed, note = (positions, inv_freq, found.scaling), "RoPE from positions"
    (k_weight, v_weight), (k_bias, v_bias) = weights, (ctx.bias("key"), ctx.bias("value"))
    query, scale = _arg(sdpa, 0, "query"), _arg(sdpa, 6, "scale")
    g = layer.xquant.group_size
    norm = {}
    if key_norm is not None:  # the multiplier as the graph computes it (Gemma's 1 + w), read at run time
        norm = dict(k_norm_weight=emit(lambda w: w.to(torch.float32).reshape(-1).contiguous(), key_norm.weight),
                    k_norm_eps=key_norm.eps)
        note += ", key norm in the kernel"
    new = emit(torch.ops.xq_compile.decode_attention.default, query, *sources.key, *sources.value, None,
               sources.key_channel0, k_weight, k_bias, v_weight, v_bias, cos, sin, attention.mask, state.length,
               layer.bits, g, sources.layouts[0], layer.bits, g, sources.layouts[1],
               float(D ** -0.5 if scale is None else scale), *computed, **norm)
    sdpa.replace_all_uses_with(new)
    state.graph.erase_node(sdpa)
    return note


def attend_over_cached_rows(state: GraphState, emit: Emitter, attention: AttentionRead, keys: fx.Node, values,
                            kv_heads: int, x_hat: fx.Node | None) -> None:
    """Replace the layer's SDPA call by one over the n rebuilt rows.

    ``values`` are the rebuilt V heads, or with ``x_hat`` given, the (weight, bias) of the value
    projection, which is then absorbed after the attention weights.
    """
    graph, sdpa = state.graph, attention.sdpa
    with graph.inserting_before(sdpa):
        mask = attention.mask
        if mask is not None:
            # all layers of a graph share the mask and the length: cut it once
            if mask not in state.cut_masks:
                state.cut_masks[mask] = emit(lambda m, n: m.narrow(-1, 0, n), mask, state.length)
            mask = state.cut_masks[mask]
        query, scale = _arg(sdpa, 0, "query"), _arg(sdpa, 6, "scale")
        mask_value = example_value(attention.mask) if attention.mask is not None else None
        shape = dict(scale=scale, query_heads=attention.query_heads, kv_heads=kv_heads, head_dim=attention.head_dim,
                     seq_len=attention.seq_len, mask_is_bool=mask_value is not None and mask_value.dtype == torch.bool)
        plain = not sdpa.kwargs.get("is_causal", False) and not sdpa.kwargs.get("dropout_p", 0.0)
        if x_hat is not None:
            v_weight, v_bias = values
            new = emit(absorbed_attention, query, keys, x_hat, v_weight, v_bias, mask, **shape)
        elif attention.seq_len == 1 and plain:
            # one query row over n rows: n >= 1 is all the shape system knows, too little for SDPA's lowering
            new = emit(decode_sdpa, query, keys, values, mask, **shape)
        else:
            repeat = attention.query_heads // kv_heads
            if repeat > 1 and not sdpa.kwargs.get("enable_gqa", False):
                expand = lambda t: t.unsqueeze(2).expand(-1, -1, repeat, -1, -1).flatten(1, 2)  # noqa: E731
                keys, values = emit(expand, keys), emit(expand, values)
            args, kwargs = list(sdpa.args), dict(sdpa.kwargs)
            args[1:3] = [keys, values]
            if attention.mask is not None:
                if attention.mask_in_args:
                    args[3] = mask
                else:
                    kwargs["attn_mask"] = mask
            new = graph.call_function(sdpa.target, tuple(args), kwargs)
            new.meta = dict(sdpa.meta)
            forget_example_values(new)
    sdpa.replace_all_uses_with(new)
    graph.erase_node(sdpa)
