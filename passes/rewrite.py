"""Rewrite matched sites into an X-cache store plus a dequantize-and-project rebuild of K and V.

For every layer whose K/V cache is an ``XQuantLayer``:

  before:  k = rope(heads(linear(x, Wk)))          keys.index_copy_(2, pos, k)     attn(q, keys, ...)
           v = heads(linear(x, Wv))                values.index_copy_(2, pos, v)
  after:   X-state.index_copy_(1, pos, pack(quantize(x·R)))      (R: block Hadamard, or identity)
           x̂ = dequantize(X-state[:, :n])                        (n = tokens cached so far)
           K = pad(rope(heads(x̂ · (Wk·R)ᵀ + bk), positions[:, :n]))     V = pad(heads(x̂ · (Wv·R)ᵀ + bv))
           attn(q, K, ...)

The rope() above is the model's own RoPE code, cloned from the graph with the position ids replaced
by the positions each cached row was written with. The X state, the positions and the folded
weights W·R become new graph inputs; ``GraphInput`` says where the backend fetches each at run time.

What is stored and how it is rebuilt is the layer's cache form's (:mod:`xq_compile.forms`: X, X
delta, GQA latents); how the rebuilt rows are read is a rebuild strategy's (:mod:`.strategies`: plain
torch over the length n on CPU, device-side ops on CUDA). This module is the driver: per site it
asks the form to store, then to rebuild, projects the rows to K/V heads, re-applies RoPE
(:mod:`.rope`) and replaces the attention (:mod:`.attend`) or the cache reads (:mod:`.cleanup`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import fx

from xq_compile.cache import XQuantLayer, layer_of, window_layer_of
from xq_compile.config import XQuantConfig
from xq_compile.forms import XWindowForm

from .attend import attend_over_cached_rows, fused_decode_attention, key_norm_then_rope, plain_rope
from .cleanup import erase_site, replace_cache_reads
from .context import SiteContext
from .graph_state import GraphInput, GraphState
from .match import AttentionRead, Site, SiteReport, attention_read, example_value, find_appends, find_sites
from .positions import checked_positions, emit_positions_and_length
from .rope import rope_at_cached_rows
from .strategies import FUSED_MAX_QUERY_TOKENS, REBUILD_FORMS, strategy_for

__all__ = ["GraphInput", "REBUILD_FORMS", "RewriteResult", "XQuantRewrite"]


@dataclasses.dataclass
class RewriteResult:
    graph_module: fx.GraphModule
    extra_inputs: list[GraphInput]
    reports: list[SiteReport]
    # (placeholder index of a layer's K cache, how many tokens one call appends) for overflow checks
    appends: list[tuple[int, Callable[[Sequence[torch.Tensor]], int]]]
    # X state this graph created for a model's own K/V buffers (options= mode); the compiled
    # function keeps it alive
    owned_state: list = dataclasses.field(default_factory=list)

    @property
    def rewritten(self) -> int:
        return sum(r.status == "rewritten" for r in self.reports)


class XQuantRewrite:
    """The graph pass: ``XQuantRewrite().apply(gm, example_inputs)`` rewrites ``gm`` in place.

    ``example_inputs`` are the real tensors the graph is being compiled for; they identify which cache
    tensors belong to an XQuantCache. Sites whose cache is anything else are reported and left alone,
    unless ``options`` is given: then the X state of such a cache (a model's own K/V buffers, or a
    StaticCache) is created here with that configuration and owned by the compiled function.
    """

    def __init__(self, options: XQuantConfig | None = None, rebuild: str = "auto") -> None:
        """``rebuild``: "auto" (on CUDA the fused decode-attention op where a site allows it, else the
        dequant_project op; plain torch on CPU), or "fused", "op", "inline" to force one strategy on any
        device (see :mod:`.strategies`)."""
        if rebuild not in REBUILD_FORMS:
            raise ValueError(f"rebuild={rebuild!r}: use one of {REBUILD_FORMS}")
        self.options = options
        self.rebuild = rebuild

    def apply(self, gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> RewriteResult:
        graph = gm.graph
        state = GraphState(graph, example_inputs, self.options, self.rebuild)
        sites, reports = find_sites(graph)
        order = {n: i for i, n in enumerate(graph.nodes)}
        sites.sort(key=lambda s: order[s.key.append.node])
        appends = []
        kept = _window_layers(state)  # sliding-window layers: left as the model wrote them
        state.longest_buffer = _longest_buffer(state, sites)
        for site in sites:
            if site.layer in kept:
                continue
            window = state.model_window(site)
            if window is not None:
                reports.append(SiteReport(site.layer, "kept", window))
                continue
            layer = state.layer_for(site)
            if isinstance(layer, str):
                reports.append(SiteReport(site.layer, "skipped", layer))
                continue
            if isinstance(layer.form, XWindowForm):
                problem = _rewrite_window_site(state, site, layer)
                if problem is not None:
                    reports.append(SiteReport(site.layer, "skipped", problem))
                    continue
                note = None
            else:
                state.check_chain_order(layer)
                note = _rewrite_site(state, site, layer)
            owner = "" if layer.tracks_length else ", state owned by the compiled model"
            form = layer.form.describe(owner) + (f"; {note}" if note else "")
            reports.append(SiteReport(layer.layer_idx, "rewritten", form=form))
            appends.append((state.arg_index[site.key.append.cache], state.token_count(site.seq_len)))
        # One report per window layer, whether or not its writes matched a site (the window's roll does not)
        reports = [r for r in reports if r.layer not in kept]
        reports += [SiteReport(i, "kept", layer.form.describe()) for i, layer in kept.items()]
        reports.sort(key=lambda r: (r.layer is None, r.layer if r.layer is not None else 0))
        _refuse_unrewritten_xquant_appends(graph, state.arg_index, example_inputs, reports)
        graph.lint()
        gm.recompile()
        return RewriteResult(gm, state.extra_inputs, reports, appends, state.owned)


def _window_layers(state: GraphState) -> dict:
    """Layer index -> ModelWindowLayer, for the sliding-window layers of an XQuantCache in this graph."""
    layers = (window_layer_of(t) for t in state.example_inputs[:len(state.placeholders)] if isinstance(t, torch.Tensor))
    return {layer.layer_idx: layer for layer in layers if layer is not None}


def _longest_buffer(state: GraphState, sites: list[Site]) -> int:
    """Rows of the longest K cache written in this graph (options= mode tells sliding windows by it)."""
    caches = [state.example_inputs[state.arg_index[s.key.append.cache]] for s in sites
              if s.key.append.cache in state.arg_index]
    rows = [c.shape[2] for c in caches if isinstance(c, torch.Tensor) and c.dim() == 4]
    return max([r for r in rows if isinstance(r, int)], default=0)


def _rewrite_site(state: GraphState, site: Site, layer: XQuantLayer) -> str | None:
    """Store this call's rows in the layer's form, then read the cache back through the rebuild. Returns
    a note for the site's report where the fused decode-attention op took it (how it gets RoPE)."""
    graph, form = state.graph, layer.form
    ctx = SiteContext(state, site, layer, strategy_for(state.rebuild, layer.device))
    order = {n: i for i, n in enumerate(graph.nodes)}
    first, last = sorted((site.key.append.node, site.value.append.node), key=order.__getitem__)
    # 1. Store: the new tokens' rows and, once per graph, their positions and the cached length.
    with graph.inserting_before(first):
        ctx.index = _rows_written(ctx, site.key.append.index)
        if state.positions is None:
            emit_positions_and_length(ctx)
        form.emit_store(ctx)
    # 2a. Decode steps on the fused strategy: one op reads the packed rows, rebuilds K tiles with RoPE on
    # chip and accumulates the absorbed values; K and V are never written to memory.
    attention = attention_read(site, layer.max_cache_len)
    rope, key_norm = plain_rope(site), None
    if rope is None and ctx.strategy.fused_attention and (found := key_norm_then_rope(site)) is not None:
        key_norm, rope = found  # Qwen3, Gemma 3: the kernel applies the per-head norm before RoPE
    if (ctx.strategy.fused_attention and attention is not None and rope is not None
            and isinstance(site.seq_len, int) and site.seq_len <= FUSED_MAX_QUERY_TOKENS):
        with graph.inserting_before(attention.sdpa):
            sources = form.fused_sources(ctx, layer.max_cache_len)
            if sources is not None:
                note = fused_decode_attention(ctx, attention, rope, sources, form.emit_weights(ctx), key_norm)
                erase_site(graph, site, attention)
                return note
    # 2. Rebuild K and V from the cache, after the (now removed) appends, before any reader. Where
    # attention is the only reader (and the length is on the host), it attends over the n rebuilt rows.
    if ctx.strategy.device_length:
        attention = None
    with graph.inserting_before(last.next):
        new_keys, new_values, x_hat = _rebuild_keys_and_values(ctx, attention)
    if attention is None:
        replace_cache_reads(graph, site, new_keys, new_values)
        erase_site(graph, site, appends=False)
        return None
    attend_over_cached_rows(state, ctx.emit, attention, new_keys, new_values, site.num_heads, x_hat)
    erase_site(graph, site, attention)
    return None


def _rewrite_window_site(state: GraphState, site: Site, layer: XQuantLayer) -> str | None:
    """An X window layer (cache.XWindowLayer): its update() wrote the placeholders at absolute cache rows
    and returns the slice ``narrow(-2, first, count)`` of them that its sliding mask covers. That slice
    becomes K and V rebuilt from the ring (the rows' X̂, RoPE at their own positions), and the write the
    ring's store. None, or why the site is not in that form (it is then left, and refused)."""
    graph, form = state.graph, layer.form
    reads = _window_reads(graph, site)
    if isinstance(reads, str):
        return reads
    key_read, value_read = reads
    first, count = key_read.args[2:4]
    ctx = SiteContext(state, site, layer, strategy_for(state.rebuild, layer.device))
    order = {n: i for i, n in enumerate(graph.nodes)}
    with graph.inserting_before(min(reads, key=order.__getitem__)):
        ctx.index = _rows_written(ctx, site.key.append.index)
        if state.positions is None:
            emit_positions_and_length(ctx)
        rows = form.emit_window(ctx, first, count)
        k_weight, v_weight = form.emit_weights(ctx)
        k_heads = _project_heads(ctx, "key", rows, k_weight, None)
        if site.key.rope:
            source = site.position_source
            tables = state.window_rope_tables.setdefault((first, count), {})
            if source is not None and source not in tables:
                tables[source] = ctx.emit(lambda p, first, count: p.narrow(-1, first, count), state.positions,
                                          first, count)
            mapping = rope_at_cached_rows(state, site, site.rope_inputs, count, site.key.rope,
                                          {site.key.heads: k_heads}, cloned=tables)
            k_heads = mapping[site.key.append.value]
        v_heads = _project_heads(ctx, "value", rows, v_weight, None)
        k_heads, v_heads = form.emit_heads(ctx, k_heads, first), form.emit_heads(ctx, v_heads, first)
    for read, rebuilt in ((key_read, k_heads), (value_read, v_heads)):
        read.replace_all_uses_with(rebuilt)
        graph.erase_node(read)
    erase_site(graph, site)
    return None


def _window_reads(graph: fx.Graph, site: Site) -> tuple[fx.Node, fx.Node] | str:
    """The K and V reads of an X window layer after its writes: ``narrow(-2, first, count)`` each, with the
    same rows; or why the site reads its cache otherwise."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    reads = []
    for append in (site.key.append, site.value.append):
        users = [u for u in (*append.cache.users, *append.node.users)
                 if u is not append.node and order[u] > order[append.node]]
        if len(users) != 1 or users[0].target not in ("narrow", torch.narrow) or len(users[0].args) != 4 \
                or users[0].args[1] not in (2, -2):
            return ("the sliding-window layer's K/V are read other than by the slice its XWindowLayer.update "
                    f"returns ({', '.join(str(u.target) for u in users) or 'no reads'})")
        reads.append(users[0])
    if reads[0].args[2:] != reads[1].args[2:]:
        return "the sliding-window layer's K and V reads cover different rows"
    return reads[0], reads[1]


def _rows_written(ctx: SiteContext, index: fx.Node) -> fx.Node:
    """The rows written, as int64 (gpt-fast decodes with int32 positions; index_copy_ takes int64 only).

    On CPU, where the length stays on the device (rebuild="op"), as checked_positions() returns them:
    one check per graph and source, before the first store."""
    checked = ctx.graph_state.checked_positions
    if index in checked:
        return checked[index]
    source, value = index, example_value(index)
    if value is not None and value.dtype != torch.int64:
        index = ctx.emit(lambda i: i.long(), index)
    if ctx.strategy.device_length and ctx.layer.device.type == "cpu":
        layer = ctx.layer
        index = ctx.emit(lambda i: checked_positions(i, layer.max_cache_len, layer.form.consecutive_writes), index)
        checked[source] = index
    return index


def _rebuild_keys_and_values(ctx: SiteContext, attention: AttentionRead | None):
    """(keys, values, x̂) from the cache: K heads with the model's RoPE at the cached rows; V heads, or
    with absorbed values the value projection's (weight, bias) and the value rows x̂ it applies to."""
    site, layer, form, emit = ctx.site, ctx.layer, ctx.layer.form, ctx.emit
    k_weight, v_weight = form.emit_weights(ctx)
    packed = form.packed_rows(ctx) if ctx.strategy.packed_projection else None
    key_rows, value_rows = (None, None) if packed is not None else form.emit_rebuild(ctx)
    # Absorbed values: (softmax·X̂)·W_vᵀ instead of rebuilding V, when that is cheaper: S·Hq·n·d FLOPs (a
    # fused reduction, counted 4x a GEMM's) against n·d·Hkv·D for the V rebuild. So decode steps and
    # short chunks absorb; long prefills rebuild V.
    absorb = (attention is not None and layer.xquant.absorb_values and isinstance(site.seq_len, int)
              and 4 * site.seq_len * attention.query_heads <= site.num_heads * site.head_dim)
    k_heads = _project_heads(ctx, "key", key_rows, k_weight, packed)
    if site.key.rope:
        source = site.position_source
        if source is not None and source not in ctx.graph_state.rope_tables:  # the cached rows' positions, once
            ctx.graph_state.rope_tables[source] = (
                ctx.graph_state.positions if ctx.strategy.device_length else
                emit(lambda p, n: p.narrow(-1, 0, n), ctx.graph_state.positions, ctx.length))
        mapping = rope_at_cached_rows(ctx.graph_state, site, site.rope_inputs, ctx.rows, site.key.rope,
                                      {site.key.heads: k_heads})
        k_heads = mapping[site.key.append.value]
    if absorb:
        return k_heads, (v_weight, ctx.bias("value")), value_rows
    v_heads = _project_heads(ctx, "value", value_rows, v_weight, packed)
    if attention is None and not ctx.strategy.device_length:
        # other readers see the cache's shape: the rebuilt rows padded with zeros (masked out)
        pad = lambda t, n: F.pad(t, (0, 0, 0, layer.max_cache_len - n))  # noqa: E731
        return emit(pad, k_heads, ctx.length), emit(pad, v_heads, ctx.length), None
    return k_heads, v_heads, None


def _project_heads(ctx: SiteContext, which: str, rows: fx.Node | None, weight: fx.Node, packed) -> fx.Node:
    """Rows -> K (V) heads in the layout the model's own per-token region (RoPE, k_norm...) expects;
    ``rows=None``: the dequant_project op reads the packed state ``packed`` (codes, scale, zero)."""
    site, layer, emit = ctx.site, ctx.layer, ctx.emit
    proj, bias = ctx.projection(which), ctx.bias(which)
    if rows is None:
        out = emit(torch.ops.xq_compile.dequant_project.default, *packed, weight, bias, ctx.length, layer.bits,
                   layer.xquant.group_size)
    else:
        out = emit(F.linear, rows, weight, bias)
    if proj.layout == "[B, S, H·D]":
        return out  # the model's own code in the region splits it into heads
    heads = emit(lambda t: t.unflatten(-1, (site.num_heads, site.head_dim)), out)
    return emit(lambda t: t.transpose(1, 2), heads) if proj.layout == "[B, H, S, D]" else heads


def _refuse_unrewritten_xquant_appends(graph, arg_index, example_inputs, reports) -> None:
    """An XQuantCache cannot take the original K/V write (its K/V are 4-byte placeholders): say why."""
    for append in find_appends(graph):
        idx = arg_index.get(append.cache)
        if idx is not None and layer_of(example_inputs[idx]) is not None:
            skipped = list(dict.fromkeys(str(r) for r in reports if r.status == "skipped"))  # K's and V's alike
            reasons = "; ".join(skipped) or "unknown pattern"
            advice = ("" if any("graph break" in r for r in skipped) else
                      " The model's attention does not match a supported pattern; use a transformers "
                      "StaticCache for it instead of XQuantCache.")
            raise RuntimeError(
                f"xquant could not rewrite a K/V write into XQuantCache layer "
                f"{layer_of(example_inputs[idx]).layer_idx} ({reasons}).{advice}"
            )
