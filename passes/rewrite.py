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

On CPU the rebuild is emitted as plain torch ops over a data-dependent length n (Inductor fuses
unpack + dequantize into one C++ kernel feeding the matmul, and the work follows n, not
max_cache_len). On CUDA it is the ``xq_compile::dequant_project`` op, whose Triton kernel reads the
length on device (no host sync, so CUDA graphs stay possible).
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import fx

from xq_compile import quant
from xq_compile._torch_private import declare_static_placeholder, forget_example_values
from xq_compile.attention import absorbed_attention, decode_sdpa
from xq_compile.cache import XQuantLayer, layer_of
from xq_compile.config import XQuantConfig
from xq_compile.latent import LATENT_FACTORS, key_latent_rows, store_key_latent
from xq_compile.rotation import FOLDED_WEIGHTS, hadamard, rotate

from .emit import Emitter, clone_region
from .positions import rows_after_write
from .rows import fit_to_rows
from .match import Site, SiteReport, _arg, attention_read, example_value, find_sites, _ancestors, _descendants


REBUILD_FORMS = ("auto", "fused", "op", "inline")
FUSED_MAX_QUERY_TOKENS = 16  # the fused decode-attention kernel is written for decode steps


@dataclasses.dataclass(frozen=True)
class GraphInput:
    """A tensor the rewritten graph takes as an extra input, fetched from the original call's args."""

    name: str
    fetch: Callable[[Sequence[torch.Tensor]], torch.Tensor]


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


def _layer_fetcher(arg_index: int) -> Callable[[Sequence[torch.Tensor]], XQuantLayer]:
    def fetch(args):
        layer = layer_of(args[arg_index])
        if layer is None:
            raise RuntimeError(
                "a graph compiled by the xquant backend was called with a cache that is not the "
                "XQuantCache it was compiled for (or that cache was garbage collected); use an XQuantCache."
            )
        return layer

    return fetch


class XQuantRewrite:
    """The graph pass: ``XQuantRewrite().apply(gm, example_inputs)`` rewrites ``gm`` in place.

    ``example_inputs`` are the real tensors the graph is being compiled for; they identify which cache
    tensors belong to an XQuantCache. Sites whose cache is anything else are reported and left alone,
    unless ``options`` is given: then the X state of such a cache (a model's own K/V buffers, or a
    StaticCache) is created here with that configuration and owned by the compiled function.
    """

    def __init__(self, options: XQuantConfig | None = None, rebuild: str = "auto") -> None:
        """``rebuild``: "auto" (on CUDA the fused decode-attention op where a site allows it, else the
        dequant_project op; plain torch on CPU), or "fused", "op", "inline" to force one form on any device."""
        if rebuild not in REBUILD_FORMS:
            raise ValueError(f"rebuild={rebuild!r}: use one of {REBUILD_FORMS}")
        self.options = options
        self.rebuild = rebuild

    def apply(self, gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> RewriteResult:
        graph = gm.graph
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        arg_index = {n: i for i, n in enumerate(placeholders)}
        sites, reports = find_sites(graph)
        state = _GraphState(graph, placeholders, arg_index, example_inputs, self.options)
        state.rebuild = self.rebuild

        order = {n: i for i, n in enumerate(graph.nodes)}
        sites.sort(key=lambda s: order[s.key.append.node])
        appends = []
        for site in sites:
            layer = state.layer_for(site)
            if isinstance(layer, str):
                reports.append(SiteReport(site.layer, "skipped", layer))
                continue
            _check_cross_layer_order(state, layer)
            _rewrite_site(state, site, layer)
            reports.append(SiteReport(layer.layer_idx, "rewritten", form=_form(layer)))
            appends.append((arg_index[site.key.append.cache], state.token_count(site.seq_len)))
        reports.sort(key=lambda r: (r.layer is None, r.layer if r.layer is not None else 0))
        _refuse_unrewritten_xquant_appends(graph, arg_index, example_inputs, reports)
        graph.lint()
        gm.recompile()
        return RewriteResult(gm, state.extra_inputs, reports, appends, state.owned)


def _form(layer: XQuantLayer) -> str:
    bits = "unquantized" if layer.bits is None else f"{layer.bits}-bit"
    owner = "" if layer.tracks_length else ", state owned by the compiled model"
    if layer.joint_latent:
        what = f"delta vs layer {layer.layer_idx - 1}" if layer.stores_delta else "base layer"
        return f"GQA joint K|V latent, {what} (cross-layer, {bits} per token{owner})"
    if layer.stores_delta:
        return f"X delta vs layer {layer.layer_idx - 1} (cross-layer, {bits}{owner})"
    if layer.form == "latent" and layer.bits is None:
        return f"GQA latents X·U_k and X·U_v (unquantized{owner})"
    if layer.form == "latent":
        channel0 = ", channel 0 fp16" if layer.keep_channel0 else ""
        return (f"GQA latent X·U_k ({bits}, per channel over {layer.xquant.group_size}-token groups, open group "
                f"fp16{channel0}) + X·U_v ({bits}, per token{owner})")
    return f"X ({bits}{owner})"


def _check_cross_layer_order(state: "_GraphState", layer: XQuantLayer) -> None:
    """XQuant-CL chains every layer to the one below: all of them must be in this graph, in order."""
    if not layer.xquant.cross_layer:
        return
    if layer.layer_idx != state.next_cross_layer:
        raise RuntimeError(
            f"XQuant-CL needs every attention layer in one graph, in order, but this graph reaches "
            f"layer {layer.layer_idx} after layer {state.next_cross_layer - 1}. Compile with "
            "fullgraph=True (a graph break splits the layer chain), or use cross_layer=False."
        )
    state.next_cross_layer += 1


def _refuse_unrewritten_xquant_appends(graph, arg_index, example_inputs, reports) -> None:
    """An XQuantCache cannot take the original K/V write (its K/V are 4-byte placeholders): say why."""
    from .match import find_appends

    for append in find_appends(graph):
        idx = arg_index.get(append.cache)
        if idx is not None and layer_of(example_inputs[idx]) is not None:
            skipped = [str(r) for r in reports if r.status == "skipped"]
            reasons = "; ".join(skipped) or "unknown pattern"
            advice = ("" if any("graph break" in r for r in skipped) else
                      " The model's attention does not match a supported pattern; use a transformers "
                      "StaticCache for it instead of XQuantCache.")
            raise RuntimeError(
                f"xquant could not rewrite a K/V write into XQuantCache layer "
                f"{layer_of(example_inputs[idx]).layer_idx} ({reasons}).{advice}"
            )


class _GraphState:
    """Per-graph bookkeeping: new inputs (deduplicated), and what is emitted once per graph."""

    def __init__(self, graph, placeholders, arg_index, example_inputs, options: XQuantConfig | None = None):
        self.graph = graph
        self.options = options
        self.owned: list[XQuantLayer] = []  # X state created for a model's own K/V buffers (options=)
        self.placeholders = placeholders
        self.arg_index = arg_index
        self.example_inputs = example_inputs
        self.extra_inputs: list[GraphInput] = []
        self._inputs_by_key: dict[tuple, fx.Node] = {}
        self.length: fx.Node | None = None        # tokens cached after this call's append (int or tensor)
        self.positions: fx.Node | None = None
        self.accumulator: fx.Node | None = None   # XQuant-CL: X̂ of the layer below, all cached rows
        self.cut_masks: dict[fx.Node, fx.Node] = {}  # attention mask -> its first n columns
        self.rope_tables: dict[fx.Node, fx.Node] = {}  # position source / RoPE table node -> at cached rows
        self.row_choices: dict = {}  # RoPE table node -> which of its shape literals counts the rows
        self.next_cross_layer = 0
        self.shared_positions: torch.Tensor | None = None  # options= mode: shared by the graph's layers
        self.shared_rotation: torch.Tensor | None = None

    # -- inputs -------------------------------------------------------------------------------
    def add_input(self, key: tuple, name: str, fetch) -> fx.Node:
        if key in self._inputs_by_key:
            return self._inputs_by_key[key]
        anchor = self._inputs_by_key and list(self._inputs_by_key.values())[-1] or self.placeholders[-1]
        with self.graph.inserting_after(anchor):
            node = self.graph.placeholder(f"xq_{name}")
        declare_static_placeholder(node)
        self._inputs_by_key[key] = node
        self.extra_inputs.append(GraphInput(name, fetch))
        return node

    def layer_for(self, site: Site) -> XQuantLayer | str:
        """The XQuantLayer behind a site, or the reason the site cannot be rewritten."""
        k_cache, v_cache = site.key.append.cache, site.value.append.cache
        if k_cache.op != "placeholder" or v_cache.op != "placeholder":
            return ("the K/V cache tensors are not graph inputs (a cache allocated lazily inside this graph, "
                    "e.g. a StaticCache before its first call: allocate it before compiling)")
        layer = layer_of(self.example_inputs[self.arg_index[k_cache]])
        if layer is None and self.options is not None:
            layer = self.state_for_model_buffers(site)
        if layer is None:
            return ("the cache is not an XQuantCache (pass cache=xq.XQuantCache(...), or configure the "
                    "backend with torch.compile(..., options={...}))")
        if isinstance(layer, str):
            return layer
        if layer_of(self.example_inputs[self.arg_index[v_cache]]) is not layer:
            return "the K and V caches belong to different XQuantCache layers"
        x = example_value(site.x)
        if x is None or x.shape[-1] != layer.hidden_size:
            return f"the projection input is not [batch, seq, {layer.hidden_size}]"
        if x.dtype != layer.dtype or x.device.type != layer.device.type:
            raise TypeError(
                f"XQuantCache was created with dtype={layer.dtype}, device={layer.device}, but layer "
                f"{layer.layer_idx} runs in dtype={x.dtype} on {x.device}: create the cache with "
                f"dtype={x.dtype}, device='{x.device}' (the model's)."
            )
        if (site.num_heads, site.head_dim) != (layer.num_heads, layer.k_head_dim):
            return (f"the model writes {site.num_heads} heads of {site.head_dim}, the cache expects "
                    f"{layer.num_heads} of {layer.k_head_dim}")
        if x.shape[0] != layer.batch_size:
            raise ValueError(
                f"XQuantCache has max_batch_size={layer.batch_size} but the model is called with batch "
                f"{x.shape[0]}: create the cache with max_batch_size={x.shape[0]}."
            )
        return layer

    def state_for_model_buffers(self, site: Site) -> XQuantLayer | str:
        """options= mode: X state for a model's own K/V buffers, owned by the compiled function."""
        keys = self.example_inputs[self.arg_index[site.key.append.cache]]
        values = self.example_inputs[self.arg_index[site.value.append.cache]]
        x = example_value(site.x)
        if not isinstance(keys, torch.Tensor) or keys.dim() != 4 or x is None:
            return "the K/V cache is not a [batch, heads, max_len, head_dim] tensor"
        if keys.count_nonzero() or values.count_nonzero():
            return ("the K/V cache already holds states written without xquant (e.g. a cache filled by an "
                    "earlier uncompiled or unrewritten call): reset it, or allocate it before compiling")
        self.options.check_hidden_size(x.shape[-1])
        batch, heads, max_len, head_dim = keys.shape
        if self.shared_positions is None:
            source = example_value(site.position_source) if site.position_source is not None else None
            shape = (batch, max_len) if source is None or source.dim() == 2 else (max_len,)
            self.shared_positions = torch.zeros(shape, dtype=torch.int64, device=keys.device)
            self.shared_rotation = (hadamard(self.options.group_size, device=keys.device)
                                    if self.options.rotation == "hadamard" else None)
        layer = XQuantLayer(layer_idx=site.layer, max_cache_len=max_len, batch_size=batch, hidden_size=x.shape[-1],
                            num_kv_heads=heads, head_dim=head_dim, xquant=self.options, dtype=x.dtype,
                            device=keys.device, positions=self.shared_positions, rotation=self.shared_rotation,
                            model_buffers=(keys, values))
        self.owned.append(layer)
        return layer

    def token_count(self, seq_len) -> Callable[[Sequence[torch.Tensor]], int]:
        """How many tokens a call appends: a constant, or read off an input's shape if dynamic."""
        if isinstance(seq_len, int):
            return lambda args: seq_len
        for i, n in enumerate(self.placeholders):
            v = example_value(n)
            if isinstance(v, torch.Tensor):
                for dim, size in enumerate(v.shape):
                    if isinstance(size, torch.SymInt) and str(size) == str(seq_len):
                        return lambda args, i=i, dim=dim: args[i].shape[dim]
        raise RuntimeError(f"cannot find the input whose shape gives the appended length {seq_len}")


def _rewrite_site(state: _GraphState, site: Site, layer: XQuantLayer) -> None:
    graph = state.graph
    cfg = layer.xquant
    emit = Emitter(graph)
    k_idx = state.arg_index[site.key.append.cache]
    fetch_layer = _layer_fetcher(k_idx)
    tag = f"layer{layer.layer_idx}"
    state_inputs = {
        name: state.add_input(("state", k_idx, name), f"{tag}_{name}",
                              lambda args, name=name: fetch_layer(args).state[name])
        for name in layer.state
    }
    rotation = None
    if layer.rotation is not None:
        rotation = state.add_input(("rotation", k_idx), f"{tag}_rotation", lambda args: fetch_layer(args).rotation)

    def weight(proj) -> fx.Node:
        if layer.rotation is None:
            return proj.weight
        w_idx = weight_index(proj)
        return state.add_input(("folded", w_idx), f"{tag}_{proj.weight.name}_rotated",
                               lambda args: FOLDED_WEIGHTS.get(args[w_idx], fetch_layer(args).rotation))

    def weight_index(proj) -> int:
        w_idx = state.arg_index.get(proj.weight)
        if w_idx is None:
            raise TypeError(f"layer {layer.layer_idx}: projection weight is not a graph input")
        return w_idx

    def latent_factors(proj, rotated: bool) -> tuple[fx.Node, fx.Node]:
        """(down, up) SVD factors of the projection's weight rows, computed once per weight."""
        w_idx, rows = weight_index(proj), proj.channels

        def fetch(which):
            return lambda args: LATENT_FACTORS.get(
                args[w_idx], rows, fetch_layer(args).rotation if rotated else None)[which]

        part = f"_{rows[0]}_{rows[1]}" if rows else ""  # K and V of one fused weight: one input each
        return tuple(state.add_input(("latent", w_idx, rows, rotated, which), f"{tag}_{proj.weight.name}{part}_{name}",
                                     fetch(which)) for which, name in enumerate(("down", "up")))

    latent = layer.form == "latent" and not layer.joint_latent
    joint = layer.joint_latent  # XQuant-CL in the latent form: the joint K|V latent, per token
    if joint:
        kw_idx, vw_idx = weight_index(site.key), weight_index(site.value)

        def fetch_joint(which):
            return lambda args: LATENT_FACTORS.get_joint(args[kw_idx], args[vw_idx], site.key.channels,
                                                         site.value.channels, fetch_layer(args).rotation)[which]

        kv_down, kv_up = (state.add_input(("joint", kw_idx, vw_idx, which), f"{tag}_kv_{name}", fetch_joint(which))
                          for which, name in enumerate(("down", "up")))
        kv_width = site.num_heads * site.head_dim
    elif latent:
        # The key latent is not rotated: its per-channel groups already give every channel (the
        # outlier channel 0 included) its own range; the value latent is quantized per token.
        (k_down, k_weight), (v_down, v_weight) = latent_factors(site.key, False), latent_factors(site.value, True)
    else:
        k_weight, v_weight = weight(site.key), weight(site.value)
    order = {n: i for i, n in enumerate(graph.nodes)}
    first, last = sorted((site.key.append.node, site.value.append.node), key=order.__getitem__)
    index = site.key.append.index
    if example_value(index) is not None and example_value(index).dtype != torch.int64:
        # gpt-fast decodes with int32 positions; index_copy_ takes int64 indices only
        with graph.inserting_before(first):
            index = emit(lambda i: i.long(), index)
    # The fused-op form (device-side length, max_cache_len rows, no host sync: CUDA graphs) or the
    # inline form (plain torch over the data-dependent length n, fused by Inductor's C++ backend).
    on_cuda = state.rebuild in ("op", "fused") or (state.rebuild == "auto" and layer.device.type == "cuda")

    def store_rows(rows: dict[str, fx.Node]) -> None:
        for name, new in rows.items():
            emit(lambda t, i, r: t.index_copy_(1, i, r.to(t.dtype)), state_inputs[name], index, new)

    def store_quantized(x: fx.Node, bits: int | None, prefix: str = "") -> None:
        """Store new rows per token: codes, scale, zero (or the rows themselves, unquantized)."""
        if bits is None:
            store_rows({prefix + ("latent" if prefix else "x"): x})
            return
        scale, zero = emit(quant.scale_and_zero, x, bits, cfg.group_size)
        store_rows({prefix + "scale": scale, prefix + "zero": zero})
        # codes for the scale/zero as stored (read back from fp16 memory: see quant.codes_for)
        stored = [emit(lambda t, i: t.index_select(1, i), state_inputs[prefix + name], index)
                  for name in ("scale", "zero")]
        codes = emit(quant.codes_for, x, *stored, bits, cfg.group_size)
        store_rows({prefix + "codes": emit(quant.pack, codes, bits)})

    # 1. Store: the new tokens' X (rotated, quantized, packed) and, once per graph, their positions.
    with graph.inserting_before(first):
        if state.positions is None:
            state.positions = state.add_input(("positions", k_idx), "positions", lambda args: fetch_layer(args).positions)
            if site.position_source is not None:
                if layer.positions.dim() == 2:  # one row of position ids per sequence (left padding)
                    emit(lambda p, i, pos: p.index_copy_(1, i, pos.expand(p.shape[0], -1).to(p.dtype)),
                         state.positions, index, site.position_source)
                else:  # positions shared by the whole batch (the model indexes its tables with [S])
                    emit(lambda p, i, pos: p.index_copy_(0, i, pos.to(p.dtype)), state.positions, index,
                         site.position_source)
            # rows [0, n) are cached once this call has written: n = 1 + the highest position written
            if on_cuda:
                state.length = emit(lambda i: i.max().reshape(1) + 1, index)
            else:
                # checked first (clear errors for positions that do not fit), then bounded for the shape system
                in_order = latent and layer.bits is not None  # store_key_latent needs consecutive rows
                length = emit(lambda i: rows_after_write(i, layer.max_cache_len, in_order).item(), index)
                # The call writes seq_len distinct rows, so n >= seq_len: telling the shape system spares
                # Inductor guards on n it cannot decide (torch 2.11's CPU SDPA lowering asks n > 1).
                written = (max(1, site.seq_len) if isinstance(site.seq_len, int)
                           else emit(lambda i: i.shape[0], index))  # dynamic: the index's (symbolic) length
                emit.check(graph.call_function(operator.ge, (length, written)))
                emit.check(graph.call_function(operator.le, (length, layer.max_cache_len)))
                state.length = length
        if latent:
            key_latent = emit(F.linear, site.x, k_down)
            if layer.bits is None:
                store_rows({"k_latent": key_latent})
            else:
                emit(store_key_latent, state_inputs["k_codes"], state_inputs["k_scale"], state_inputs["k_zero"],
                     state_inputs["k_tail"], key_latent, emit(lambda i: i.min(), index), layer.bits,
                     cfg.group_size)
                if layer.keep_channel0:
                    store_rows({"k_col0": emit(lambda t: t[..., 0], key_latent)})
            store_quantized(emit(F.linear, site.x, v_down), layer.bits, "v_")
        else:
            # Closed loop: a delta is taken against the layer below *as reconstructed*, for the new rows.
            below = (emit(lambda acc, i: acc.index_select(1, i), state.accumulator, index)
                     if layer.stores_delta else None)
            if joint:  # ... in this layer's joint latent
                x = emit(F.linear, site.x, kv_down)
                if below is not None:
                    x = emit(lambda x, below, down: x.float() - F.linear(below, down.float()), x, below, kv_down)
            else:
                x = emit(rotate, site.x, rotation) if rotation is not None else site.x
                if below is not None:
                    x = emit(lambda x, below: x.float() - below, x, below)
            store_quantized(x, layer.bits)

    # 2a. CUDA decode steps: one fused op reads the packed rows, rebuilds K tiles with RoPE on chip and
    # accumulates the absorbed values; K and V are never written to memory.
    if on_cuda and state.rebuild in ("auto", "fused"):
        attention, rope = attention_read(site, layer.max_cache_len), _plain_rope(site)
        if (attention is not None and rope is not None and layer.bits is not None and not cfg.cross_layer
                and isinstance(site.seq_len, int) and site.seq_len <= FUSED_MAX_QUERY_TOKENS):
            _fused_decode_attention(state, emit, site, layer, attention, rope, state_inputs, k_weight, v_weight)
            return

    # 2. Rebuild K and V from the X cache, after the (now removed) appends, before any reader.
    anchor = last.next
    with graph.inserting_before(anchor):
        n = state.length
        # rows of each projection's input: X̂ for both (x form), or the key and the value latent
        rows_of = (lambda name: state_inputs[name]) if on_cuda else (
            lambda name: emit(lambda t, n: t.narrow(1, 0, n), state_inputs[name], n))
        if latent:
            rows = layer.max_cache_len if on_cuda else n
            if layer.bits is None:
                key_rows, value_rows = rows_of("k_latent"), rows_of("v_latent")
            else:
                key_rows = emit(key_latent_rows, state_inputs["k_codes"], state_inputs["k_scale"],
                                state_inputs["k_zero"], state_inputs["k_tail"], rows, n, layer.bits, cfg.group_size,
                                layer.dtype, state_inputs.get("k_col0"))
                value_rows = emit(quant.dequantize, rows_of("v_codes"), rows_of("v_scale"), rows_of("v_zero"),
                                  layer.bits, cfg.group_size, layer.dtype)
        elif joint:
            # X̃ (fp32, d wide) carries the layers below; this layer's latent is X̃·downᵀ plus its delta
            # (or its own rows, for a base layer), and X̃ moves to match it in this layer's subspace.
            own = (emit(quant.dequantize, rows_of("codes"), rows_of("scale"), rows_of("zero"), layer.bits,
                        cfg.group_size, torch.float32) if layer.bits is not None else rows_of("x"))
            if state.accumulator is None:
                latent_hat = emit(lambda own: own.float(), own)
                state.accumulator = emit(lambda own, down: F.linear(own, down.float().t()), latent_hat, kv_down)
            else:
                seen = emit(lambda acc, down: F.linear(acc, down.float()), state.accumulator, kv_down)
                latent_hat = (emit(lambda seen, own: seen + own.float(), seen, own) if layer.stores_delta
                              else emit(lambda own: own.float(), own))
                state.accumulator = emit(lambda acc, new, seen, down: acc + F.linear(new - seen, down.float().t()),
                                         state.accumulator, latent_hat, seen, kv_down)
            key_rows = value_rows = emit(lambda t: t.to(layer.dtype), latent_hat)
            k_weight = emit(lambda up: up.narrow(0, 0, kv_width), kv_up)
            v_weight = emit(lambda up: up.narrow(0, kv_width, kv_width), kv_up)
        elif on_cuda and layer.bits is not None and not cfg.cross_layer:
            key_rows = value_rows = None  # the fused dequantize-and-project op reads the packed rows
        else:
            # XQuant-CL accumulates in fp32 so that rounding does not build up over the layers.
            own_dtype = torch.float32 if cfg.cross_layer else layer.dtype
            own = (emit(quant.dequantize, rows_of("codes"), rows_of("scale"), rows_of("zero"), layer.bits,
                        cfg.group_size, own_dtype) if layer.bits is not None else rows_of("x"))
            if layer.stores_delta:
                own = emit(lambda acc, delta: acc + delta.float(), state.accumulator, own)
            if cfg.cross_layer:
                state.accumulator = own
            key_rows = value_rows = emit(lambda t: t.to(layer.dtype), own) if own_dtype != layer.dtype else own

        def project(proj, rows, w) -> fx.Node:
            w, bias = _projection_rows(emit, proj, w, layer)
            if rows is None:
                out = emit(torch.ops.xq_compile.dequant_project.default, state_inputs["codes"],
                           state_inputs["scale"], state_inputs["zero"], w, bias, n, layer.bits,
                           cfg.group_size)
            else:
                out = emit(F.linear, rows, w, bias)
            heads = emit(lambda t: t.unflatten(-1, (site.num_heads, site.head_dim)), out)
            # The same layout the model's own per-token region (RoPE, k_norm...) expects.
            return emit(lambda t: t.transpose(1, 2), heads) if proj.heads_first else heads

        # On CPU, if attention is the only reader, it gets just the n cached rows and a mask cut to n:
        # attention then follows the length too. Otherwise the rebuilt rows are padded to the cache's
        # shape (zeros, masked out). The CUDA op always returns max_cache_len rows (no host sync).
        attention = None if on_cuda else attention_read(site, layer.max_cache_len)
        # Absorbed values: (softmax·X̂)·W_vᵀ instead of rebuilding V, when that is cheaper: S·Hq·n·d
        # FLOPs (a fused reduction, counted 4x a GEMM's) against n·d·Hkv·D for the V rebuild. So decode
        # steps and short chunks absorb; long prefills rebuild V.
        absorb = (attention is not None and cfg.absorb_values and isinstance(site.seq_len, int)
                  and 4 * site.seq_len * attention.query_heads <= site.num_heads * site.head_dim)

        def to_cache_shape(t: fx.Node) -> fx.Node:
            if on_cuda or attention is not None:
                return t
            return emit(lambda t, n: F.pad(t, (0, 0, 0, layer.max_cache_len - n)), t, n)

        k_heads = project(site.key, key_rows, k_weight)
        v_heads = None if absorb else project(site.value, value_rows, v_weight)
        if site.key.rope:
            source = site.position_source
            if source not in state.rope_tables:  # the cached rows' positions, once per graph
                state.rope_tables[source] = (state.positions if on_cuda else
                                             emit(lambda p, n: p.narrow(-1, 0, n), state.positions, n))
            mapping = _rope_at_cached_rows(state, site, site.rope_inputs, layer.max_cache_len if on_cuda else n,
                                           site.key.rope, {site.key.heads: k_heads})
            k_heads = mapping[site.key.append.value]
        new_keys = to_cache_shape(k_heads)
        new_values = _projection_rows(emit, site.value, v_weight, layer) if absorb else to_cache_shape(v_heads)

    if attention is not None:
        _attend_over_cached_rows(state, emit, attention, new_keys, new_values, site.num_heads,
                                 value_rows if absorb else None)
        for append in (site.key.append, site.value.append):
            graph.erase_node(append.node)
        _erase_dead(graph, [site.key.linear, site.value.linear, *site.key.rope, site.key.heads, site.value.heads,
                            *attention.chains])
        return

    # 3. Every later read of the K/V cache now reads the rebuilt tensors; the appends go away.
    for proj, rebuilt in ((site.key, new_keys), (site.value, new_values)):
        append = proj.append
        position = {n: i for i, n in enumerate(graph.nodes)}
        for user in list(append.cache.users):
            if user is not append.node and position[user] > position[append.node]:
                user.replace_input_with(append.cache, rebuilt)
        append.node.replace_all_uses_with(rebuilt)
        graph.erase_node(append.node)
    _erase_dead(graph, [site.key.linear, site.value.linear, *site.key.rope, site.key.heads, site.value.heads])


def _projection_rows(emit: Emitter, proj, weight: fx.Node, layer: XQuantLayer) -> tuple[fx.Node, fx.Node | None]:
    """(weight, bias) of the rows a projection rebuilds: one slice of a fused projection (Phi-3's qkv_proj)
    takes only its rows; the latent factors were computed from the slice already."""
    bias = proj.bias
    if proj.channels is not None:
        first, stop = proj.channels
        if layer.form != "latent":
            weight = emit(lambda w: w.narrow(0, first, stop - first), weight)
        if bias is not None:
            bias = emit(lambda b: b.narrow(0, first, stop - first), bias)
    return weight, bias


def _rope_at_cached_rows(state: "_GraphState", site: Site, roots, rows, per_layer=(), replace=None) -> dict:
    """Clone the model's RoPE table code feeding ``roots`` with the cached rows' positions, at the
    insertion point (``state.rope_tables`` maps the position source to them already). The tables
    are cloned once per graph and shared by the layers that share them in the model; ``per_layer``
    nodes (a layer's norm and rotation region) are cloned every time. ``rows``: how many rows the
    clones compute (an int, or the node of the data-dependent length). Returns the node mapping."""
    source = site.position_source
    tables = (_descendants(source) - {source}) & set().union(*(_ancestors(i, lambda _: False) for i in roots))
    per_layer = set(per_layer)
    region = [nd for nd in state.graph.nodes if (nd in tables and nd not in state.rope_tables) or nd in per_layer]
    mapping = clone_region(state.graph, region, {**state.rope_tables, **(replace or {})})
    state.rope_tables.update({nd: mapping[nd] for nd in tables if nd in mapping})
    # The code was traced for this call's tokens: sizes it read off them (gpt-fast: freqs_cis.view(1,
    # x.size(1), ...)) are literals or the token-count symbol, and must follow the rows instead.
    inputs = {source: example_value(source).dim() - 1}
    if site.key.heads in (replace or {}):
        inputs[site.key.heads] = 2 if site.key.heads_first else 1
    fit_to_rows([nd for nd in state.graph.nodes if nd in tables or nd in per_layer],
                {nd: mapping[nd] for nd in region}, inputs, site.seq_len, rows, state.row_choices,
                {site.key.append.value: 2} if per_layer else None)
    return mapping


def _plain_rope(site: Site) -> tuple[fx.Node, fx.Node] | None:
    """(cos, sin) if the key's per-token region is exactly HF's ``k·cos + rotate_half(k)·sin``, else None.

    The fused decode-attention kernel applies that RoPE itself; anything else between the projection
    and the cache (a k_norm, another rotation layout) keeps the unfused form.
    """
    k, out, half = site.key.heads, site.key.append.value, site.head_dim // 2

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
        if set(site.key.rope) != {direct, rotated, out, cat, neg, neg.args[0], lower}:
            continue
        return a[1] if a[0] is k else a[0], b[1] if b[0] is cat else b[0]
    return None


def _fused_decode_attention(state: "_GraphState", emit: Emitter, site: Site, layer: XQuantLayer, attention,
                            rope: tuple[fx.Node, fx.Node], state_inputs: dict[str, fx.Node],
                            key: fx.Node, value: fx.Node) -> None:
    """Replace the layer's SDPA by ``xq_compile::decode_attention`` over the packed cache."""
    graph, sdpa, cfg = state.graph, attention.sdpa, layer.xquant
    L, D, B = layer.max_cache_len, site.head_dim, layer.batch_size
    with graph.inserting_before(sdpa):
        # cos/sin of every cached row: the model's own table code, cloned with the cached positions
        state.rope_tables.setdefault(site.position_source, state.positions)
        _rope_at_cached_rows(state, site, rope, L)
        cos, sin = (emit(lambda t: t.reshape(-1, L, D).expand(B, L, D).to(layer.dtype).contiguous(),
                         state.rope_tables.get(t, t)) for t in rope)
        (k_weight, k_bias), (v_weight, v_bias) = (_projection_rows(emit, site.key, key, layer),
                                                  _projection_rows(emit, site.value, value, layer))
        g = cfg.group_size
        if layer.form == "latent":
            st = state_inputs
            key_groups = -(-L // g)  # the kernel reads L rows; the spare group is only written
            k_source = (emit(lambda t: t.narrow(1, 0, L), st["k_codes"]),
                        emit(lambda t: t.narrow(1, 0, key_groups), st["k_scale"]),
                        emit(lambda t: t.narrow(1, 0, key_groups), st["k_zero"]),
                        emit(lambda t: t.to(layer.dtype), st["k_tail"]))
            v_source = (st["v_codes"], st["v_scale"], st["v_zero"])
            layouts = ("per_channel", "per_token")
            col0 = st.get("k_col0")
        else:
            k_source = (state_inputs["codes"], state_inputs["scale"], state_inputs["zero"], None)
            v_source, layouts, col0 = (None, None, None), ("per_token", "per_token"), None
        query, scale = _arg(sdpa, 0, "query"), _arg(sdpa, 6, "scale")
        new = emit(torch.ops.xq_compile.decode_attention.default, query, *k_source, *v_source, None, col0,
                   k_weight, k_bias, v_weight, v_bias, cos, sin, attention.mask, state.length,
                   layer.bits, g, layouts[0], layer.bits, g, layouts[1],
                   float(D ** -0.5 if scale is None else scale))
    sdpa.replace_all_uses_with(new)
    graph.erase_node(sdpa)
    for append in (site.key.append, site.value.append):
        graph.erase_node(append.node)
    _erase_dead(graph, [site.key.linear, site.value.linear, *site.key.rope, site.key.heads, site.value.heads,
                        *attention.chains])


def _attend_over_cached_rows(state: "_GraphState", emit: Emitter, attention, keys: fx.Node, values,
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


def _erase_dead(graph: fx.Graph, roots: list[fx.Node]) -> None:
    """Remove the now-unused original K/V projection chains (and only those)."""
    candidates = set()
    for root in roots:
        candidates |= _descendants(root)
        candidates.add(root)
    changed = True
    while changed:
        changed = False
        for node in reversed(list(graph.nodes)):
            if node in candidates and not node.users and node.op in ("call_function", "call_method"):
                if (node.op == "call_method" and str(node.target).endswith("_")) or node.target is operator.setitem:
                    continue  # in-place ops have effects even without users (e.g. a later layer's cache write)
                graph.erase_node(node)
                candidates.discard(node)
                changed = True
