"""The matcher (``xq_compile.passes.match``) on hand-built FX graphs: one per cache-append form and per
pattern of the README's support table, asserting exactly which nodes each site is made of, and the
reason of every site it skips.

The graphs are written node by node the way Dynamo records the model code (the same targets and
arguments as ``gm.code`` of the real models compiled with a backend that prints it): projections are
``F.linear`` (Dynamo prints it as ``torch._C._nn.linear``: the same function), heads are ``view`` and
``transpose`` methods, RoPE is pointwise ``operator`` calls and ``torch.cat``. Every node carries the
``meta["example_value"]`` Dynamo records (here the value computed on small real tensors), and cache
tensors carry a Dynamo source name (``L['kwargs']['cache'].layers[5].keys``): the matcher reads the
layer and key/value from it. Nothing here runs transformers, so a change in its model code cannot
change what these tests check; ``test_the_hand_built_llama_graph_is_what_dynamo_records`` checks the
graphs still look like what Dynamo records for the same code.
"""

from __future__ import annotations

import dataclasses
import operator
import types

import pytest
import torch
import torch.nn.functional as F
from torch import fx

from xq_compile.fused_rows import FusedRows
from xq_compile.passes.match import Site, SiteReport, attention_read, find_sites
from xq_compile.passes.rewrite import XQuantRewrite

BATCH, SEQ, HIDDEN, HEADS, HEAD_DIM, MAX_LEN = 2, 3, 64, 4, 16, 32
CAT_SKIP_REASON = ("the cache grows by torch.cat every step (transformers' DynamicCache): X caching needs a "
                   "fixed-size cache; pass cache=xq.XQuantCache(...)")


class DynamoLikeGraph:
    """An fx.Graph built node by node, each node with the value Dynamo would record for it."""

    def __init__(self) -> None:
        self.graph = fx.Graph()
        self.example_inputs: list = []
        self._generator = torch.Generator().manual_seed(0)

    def input(self, name: str, value, source: str | None = None) -> fx.Node:
        """A placeholder; ``source``: the Dynamo source it was lifted from (as ``meta["grapharg"]``)."""
        placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        with self.graph.inserting_after(placeholders[-1]) if placeholders else self.graph.inserting_before():
            node = self.graph.placeholder(name)  # inputs come first, as in Dynamo's graphs
        node.meta["example_value"] = value
        if source is not None:
            node.meta["grapharg"] = types.SimpleNamespace(source=types.SimpleNamespace(name=source))
        self.example_inputs.append(value)
        return node

    def randn(self, name: str, *shape: int, source: str | None = None) -> fx.Node:
        return self.input(name, torch.randn(*shape, generator=self._generator), source)

    def call(self, target, *args, name: str | None = None, **kwargs) -> fx.Node:
        return self._add("call_function", target, args, kwargs, name)

    def method(self, target: str, *args, name: str | None = None, **kwargs) -> fx.Node:
        return self._add("call_method", target, args, kwargs, name)

    def _add(self, op, target, args, kwargs, name) -> fx.Node:
        node = self.graph.create_node(op, target, args, kwargs, name=name)
        values, kw_values = fx.node.map_arg((args, kwargs), lambda n: n.meta["example_value"])
        if op == "call_function":
            node.meta["example_value"] = target(*values, **kw_values)
        else:  # a method of the first argument
            node.meta["example_value"] = getattr(values[0], target)(*values[1:], **kw_values)
        return node

    def module(self, output: fx.Node) -> fx.GraphModule:
        self.graph.output((output,))
        self.graph.lint()
        return fx.GraphModule(torch.nn.Module(), self.graph)


def cache_source(layer: int, kind: str) -> str:
    return f"L['kwargs']['cache'].layers[{layer}].{kind}"


@dataclasses.dataclass
class Layer:
    """The nodes of one hand-built attention layer that a site must consist of."""

    builder: DynamoLikeGraph
    x: fx.Node
    k_linear: fx.Node
    v_linear: fx.Node
    k_bias: fx.Node | None
    v_bias: fx.Node | None
    k_heads: fx.Node
    v_heads: fx.Node
    k_rope: list[fx.Node]
    k_append: fx.Node | None
    v_append: fx.Node | None
    positions: fx.Node          # what the RoPE tables derive from
    rope_tables: list[fx.Node]
    k_cache: fx.Node
    v_cache: fx.Node
    sdpa: fx.Node | None = None
    read_chain: list[fx.Node] = dataclasses.field(default_factory=list)


def rotate_half_rope(g: DynamoLikeGraph, states: fx.Node, cos: fx.Node, sin: fx.Node, half: int):
    """transformers' apply_rotary_pos_emb for one tensor: states·cos + rotate_half(states)·sin."""
    mul = g.call(operator.mul, states, cos)
    x1 = g.call(operator.getitem, states, (Ellipsis, slice(None, half)))
    x2 = g.call(operator.getitem, states, (Ellipsis, slice(half, None)))
    neg = g.call(operator.neg, x2)
    cat = g.call(torch.cat, (neg, x1), dim=-1)
    mul_sin = g.call(operator.mul, cat, sin)
    embed = g.call(operator.add, mul, mul_sin)
    return embed, [mul, x1, x2, neg, cat, mul_sin, embed]


def split_heads(g: DynamoLikeGraph, projected: fx.Node, transpose: bool = True) -> tuple[fx.Node, fx.Node]:
    """[B, S, H·D] -> [B, S, H, D] (-> [B, H, S, D]): (the view, the per-head states)."""
    view = g.method("view", projected, (BATCH, SEQ, -1, HEAD_DIM))
    return view, (g.method("transpose", view, 1, 2) if transpose else view)


def llama_layer(kv_heads: int = HEADS, layer: int = 5, *, bias: bool = False, k_norm: str | None = None,
                rope: bool = True, fused_qkv: bool = False, append: str = "index_copy_", named: bool = True,
                tables_as_inputs: bool = False) -> Layer:
    """One decoder attention layer as Dynamo records transformers' Llama with a StaticCache (5.24).

    ``bias``: q/k/v biases (Qwen2). ``k_norm``: RMSNorm of the keys before RoPE, "per head" on
    [B, S, H, D] (Qwen3), or over "all heads" on [B, S, H·D] before the split into heads (OLMo 2).
    ``rope=False``: no RoPE (EXAONE 4's global layers). ``fused_qkv``: one qkv projection sliced into q, k, v
    (Phi-3), or "per head": split into heads of [q_h, k_h, v_h] first, then chunked (GPT-NeoX), or "conv1d":
    GPT-2's Conv1D (``addmm`` with a weight stored [in, out]), then split into q, k, v; or "falcon": ``x @ W.T
    + b``, split into H + 2 heads, the key head picked by ``[..., [-2], :]`` (multi-query, ``kv_heads=1``); or
    "persimmon": split into [B, S, H, 3, D], each head's keys picked by ``[..., 1, :]``; or "bigcode":
    StarCoder's multi-query ``c_attn(x).unsqueeze(1).split((d, D, D), dim=3)`` (``kv_heads=1``).
    ``append``: "index_copy_" (StaticCache), "cat" (DynamicCache: keys = cat([keys, k], dim=-2)).
    ``named``: cache placeholders carry Dynamo sources naming layer and keys/values (else they have
    none, and plain names). ``tables_as_inputs``: cos/sin are graph inputs (a graph break before the layer).
    """
    g = DynamoLikeGraph()
    kv_width = kv_heads * HEAD_DIM
    x = g.randn("hidden_states", BATCH, SEQ, HIDDEN)
    position_ids = g.input("position_ids", torch.arange(SEQ).repeat(BATCH, 1) + 4)
    inv_freq = g.input("inv_freq", 1.0 / 10000 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM))
    if fused_qkv == "per head":
        w_qkv = g.randn("query_key_value_weight", 3 * HIDDEN, HIDDEN)
    elif fused_qkv == "conv1d":  # MHA only, like GPT-2
        w_qkv, b_qkv = g.randn("c_attn_weight", HIDDEN, 3 * HIDDEN), g.randn("c_attn_bias", 3 * HIDDEN)
    elif fused_qkv == "falcon":
        rows = HIDDEN + 2 * kv_width
        w_qkv, b_qkv = g.randn("query_key_value_weight", rows, HIDDEN), g.randn("query_key_value_bias", rows)
    elif fused_qkv == "persimmon":  # MHA only
        w_qkv = g.randn("query_key_value_weight", 3 * HIDDEN, HIDDEN)
    elif fused_qkv == "bigcode":
        w_qkv = g.randn("c_attn_weight", HIDDEN + 2 * kv_width, HIDDEN)
    elif fused_qkv:
        w_qkv = g.randn("qkv_proj_weight", HIDDEN + 2 * kv_width, HIDDEN)
    else:
        w_q = g.randn("q_proj_weight", HIDDEN, HIDDEN)
        w_k, w_v = g.randn("k_proj_weight", kv_width, HIDDEN), g.randn("v_proj_weight", kv_width, HIDDEN)
    b_q, b_k, b_v = (g.randn(f"{p}_proj_bias", w) for p, w in (("q", HIDDEN), ("k", kv_width), ("v", kv_width))) \
        if bias else (None, None, None)
    k_norm_weight = g.randn("k_norm_weight", kv_width if k_norm == "all heads" else HEAD_DIM) if k_norm else None
    cache_shape = (BATCH, kv_heads, MAX_LEN, HEAD_DIM)
    k_cache = g.input("cache_k_0" if not named else "l_kwargs_cache_layers_k", torch.zeros(cache_shape),
                      cache_source(layer, "keys") if named else None)
    v_cache = g.input("cache_v_0" if not named else "l_kwargs_cache_layers_v", torch.zeros(cache_shape),
                      cache_source(layer, "values") if named else None)
    cache_position = g.input("cache_position", torch.arange(SEQ) + 4)
    mask = g.input("attention_mask", torch.ones(BATCH, 1, SEQ, MAX_LEN, dtype=torch.bool))
    if tables_as_inputs:
        positions = None
        cos = g.randn("position_embeddings_0_", BATCH, 1, SEQ, HEAD_DIM)
        sin = g.randn("position_embeddings_1_", BATCH, 1, SEQ, HEAD_DIM)
    else:  # LlamaRotaryEmbedding, then unsqueeze(1) in apply_rotary_pos_emb
        positions = position_ids
        ids = g.method("float", g.call(operator.getitem, position_ids, (Ellipsis, None)))
        emb = g.call(torch.cat, (g.call(operator.mul, ids, inv_freq, name="freqs"),) * 2, dim=-1, name="emb")
        cos = g.method("unsqueeze", g.method("cos", emb), 1)
        sin = g.method("unsqueeze", g.method("sin", emb), 1)

    if fused_qkv == "per head":  # GPT-NeoX (MHA only): heads of [q_h, k_h, v_h], then chunk(3, dim=-1)
        qkv = g.call(F.linear, x, w_qkv, None, name="qkv")
        grouped = g.method("transpose", g.method("view", qkv, (BATCH, SEQ, -1, 3 * HEAD_DIM)), 1, 2)
        pieces = g.method("chunk", grouped, 3, dim=-1)
        query, keys, v_heads = (g.call(operator.getitem, pieces, i) for i in range(3))
        k_linear = v_linear = qkv
        k_heads, k_region = keys, []
    elif fused_qkv == "conv1d":  # x = addmm(bias, x.view(-1, d), weight).view(size_out); .split(d, dim=2)
        flat = g.method("view", x, -1, HIDDEN)
        qkv = g.method("view", g.call(torch.addmm, b_qkv, flat, w_qkv, name="x"), (BATCH, SEQ, 3 * HIDDEN))
        pieces = g.method("split", qkv, HIDDEN, dim=2)
        q_lin, k_lin, v_lin = (g.call(operator.getitem, pieces, i) for i in range(3))
        k_linear = v_linear = qkv
        _, query = split_heads(g, q_lin)
        _, keys = split_heads(g, k_lin)
        k_heads, k_region = keys, []
        _, v_heads = split_heads(g, v_lin)
    elif fused_qkv == "bigcode":  # [B, 1, S, d + 2D]: one head axis, then the channels split
        qkv = g.call(F.linear, x, w_qkv, None, name="qkv")
        pieces = g.method("split", g.method("unsqueeze", qkv, 1), (HIDDEN, kv_width, kv_width), dim=3)
        q_lin, keys, v_heads = (g.call(operator.getitem, pieces, i) for i in range(3))
        query = g.method("transpose", g.method("view", q_lin, BATCH, SEQ, HEADS, HEAD_DIM), 1, 2)
        k_linear = v_linear = qkv
        k_heads, k_region = keys, []
    elif fused_qkv in ("falcon", "persimmon"):  # heads (or their [q, k, v] blocks) picked on axis -2
        if fused_qkv == "falcon":  # x @ self.weight.T + self.bias, then [B, S, H + 2, D]
            qkv = g.call(operator.add, g.call(operator.matmul, x, g.call(getattr, w_qkv, "T")), b_qkv)
            grouped = g.method("view", qkv, BATCH, SEQ, HEADS + 2, HEAD_DIM)
            picks = (slice(None, -2), [-2], [-1])
        else:  # F.linear, then [B, S, H, 3, D]
            qkv = g.call(F.linear, x, w_qkv, None, name="qkv")
            grouped = g.method("view", qkv, BATCH, SEQ, HEADS, 3, HEAD_DIM)
            picks = (0, 1, 2)
        q_pick, k_pick, v_pick = (g.call(operator.getitem, grouped, (Ellipsis, p, slice(None))) for p in picks)
        k_linear = v_linear = qkv
        query, keys, v_heads = (g.method("transpose", p, 1, 2) for p in (q_pick, k_pick, v_pick))
        k_heads, k_region = keys, []
    elif fused_qkv:
        qkv = g.call(F.linear, x, w_qkv, None, name="qkv")
        q_lin = g.call(operator.getitem, qkv, (Ellipsis, slice(None, HIDDEN)), name="query_states")
        k_lin = g.call(operator.getitem, qkv, (Ellipsis, slice(HIDDEN, HIDDEN + kv_width)), name="key_states")
        v_lin = g.call(operator.getitem, qkv, (Ellipsis, slice(HIDDEN + kv_width, None)), name="value_states")
        k_linear = v_linear = qkv
        _, query = split_heads(g, q_lin)
        _, keys = split_heads(g, k_lin)
        k_heads, k_region = keys, []
        _, v_heads = split_heads(g, v_lin)
    else:
        _, query = split_heads(g, g.call(F.linear, x, w_q, b_q))
        k_linear = g.call(F.linear, x, w_k, b_k)
        keys, k_region = k_linear, []
        if k_norm != "all heads":
            _, keys = split_heads(g, k_linear, transpose=not k_norm)
        k_heads = keys
        if k_norm:  # RMSNorm (Qwen3's on [B, S, H, D], then transpose(1, 2); OLMo 2's, then the split)
            f32 = g.method("to", k_heads, torch.float32)
            variance = g.method("mean", g.method("pow", f32, 2), -1, keepdim=True)
            rsqrt = g.call(torch.rsqrt, g.call(operator.add, variance, 1e-6))
            normed = g.method("to", g.call(operator.mul, f32, rsqrt), torch.float32)
            keys = g.call(operator.mul, k_norm_weight, normed)
            keys = g.method("transpose", keys, 1, 2) if k_norm == "per head" else split_heads(g, keys)[1]
            nodes = list(g.graph.nodes)
            k_region = nodes[nodes.index(f32):]
        v_linear = g.call(F.linear, x, w_v, b_v)
        _, v_heads = split_heads(g, v_linear)
    tables, rope_nodes = [], []
    if rope:
        query, _ = rotate_half_rope(g, query, cos, sin, HEAD_DIM // 2)
        keys, rope_nodes = rotate_half_rope(g, keys, cos, sin, HEAD_DIM // 2)
        tables = [cos, sin]
    layer_nodes = Layer(g, x, k_linear, v_linear, b_k, b_v, k_heads, v_heads, k_region + rope_nodes, None, None,
                        positions if rope else None, tables, k_cache, v_cache)
    if k_norm_weight is not None:
        layer_nodes.rope_tables.insert(0, k_norm_weight)

    if append == "cat":
        k_all = g.call(torch.cat, [k_cache, keys], dim=-2, name="keys")
        v_all = g.call(torch.cat, [v_cache, v_heads], dim=-2, name="values")
    else:
        layer_nodes.k_append = g.method("index_copy_", k_cache, 2, cache_position, keys)
        layer_nodes.v_append = g.method("index_copy_", v_cache, 2, cache_position, v_heads)
        k_all, v_all = k_cache, v_cache
    if kv_heads != HEADS:  # repeat_kv
        def repeat(cache):
            group = HEADS // kv_heads
            chain = [g.call(operator.getitem, cache, (slice(None), slice(None), None, slice(None), slice(None)))]
            length = cache.meta["example_value"].shape[2]
            chain.append(g.method("expand", chain[-1], BATCH, kv_heads, group, length, HEAD_DIM))
            chain.append(g.method("reshape", chain[-1], BATCH, HEADS, -1, HEAD_DIM))
            layer_nodes.read_chain += chain
            return chain[-1]
        k_all, v_all = repeat(k_all), repeat(v_all)
    mask_arg = mask if append != "cat" else None
    layer_nodes.sdpa = g.call(F.scaled_dot_product_attention, query, k_all, v_all, attn_mask=mask_arg,
                              dropout_p=0.0, scale=0.25, is_causal=False, name="attn_output")
    return layer_nodes


def matched(layer: Layer) -> tuple[list[Site], list[SiteReport]]:
    layer.builder.module(layer.sdpa)
    return find_sites(layer.builder.graph)


def assert_site_is(site: Site, layer: Layer, *, number: int, kv_heads: int) -> None:
    """The site consists of exactly the layer's K/V projection, heads, RoPE and append nodes."""
    assert site.layer == number
    assert site.x is layer.x
    assert (site.key.linear, site.value.linear) == (layer.k_linear, layer.v_linear)
    if layer.k_linear.target == "view":  # Conv1D: view(addmm(bias, x.view(-1, d), weight))
        addmm = layer.k_linear.args[0]
        assert site.key.call.nodes == site.value.call.nodes == (addmm.args[1], addmm, layer.k_linear)
        assert site.key.weight is site.value.weight is addmm.args[2]
        assert site.key.bias is site.value.bias is addmm.args[0]
    elif layer.k_linear.target is operator.add:  # FalconLinear: x @ weight.T + bias
        matmul, bias = layer.k_linear.args
        transposed = matmul.args[1]
        assert site.key.call.nodes == site.value.call.nodes == (transposed, matmul, layer.k_linear)
        assert site.key.weight is site.value.weight is transposed.args[0]
        assert site.key.bias is site.value.bias is bias
    else:
        assert (site.key.weight, site.value.weight) == (layer.k_linear.args[1], layer.v_linear.args[1])
        assert (site.key.bias, site.value.bias) == (layer.k_bias, layer.v_bias)
    assert (site.key.heads, site.value.heads) == (layer.k_heads, layer.v_heads)
    assert site.key.rope == layer.k_rope
    assert site.value.rope == []
    assert (site.key.append.node, site.value.append.node) == (layer.k_append, layer.v_append)
    assert (site.key.append.cache, site.value.append.cache) == (layer.k_cache, layer.v_cache)
    assert site.key.append.index is site.value.append.index
    assert site.key.append.seq_dim == site.value.append.seq_dim == 2
    assert site.position_source is layer.positions
    assert site.rope_inputs == layer.rope_tables
    assert (site.num_heads, site.head_dim, site.seq_len) == (kv_heads, HEAD_DIM, SEQ)


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_llama_static_cache_index_copy(kv_heads):
    layer = llama_layer(kv_heads)
    sites, reports = matched(layer)
    assert reports == [] and len(sites) == 1
    assert_site_is(sites[0], layer, number=5, kv_heads=kv_heads)
    assert sites[0].key.channels is None and sites[0].key.layout == "[B, H, S, D]"
    assert [n.target for n in sites[0].key.rope] == [operator.mul, operator.getitem, operator.getitem,
                                                     operator.neg, torch.cat, operator.mul, operator.add]
    read = attention_read(sites[0], MAX_LEN)
    assert read.sdpa is layer.sdpa
    assert read.chains == layer.read_chain and len(read.chains) == (0 if kv_heads == HEADS else 6)
    assert (read.query_heads, read.seq_len, read.head_dim) == (HEADS, SEQ, HEAD_DIM)
    assert read.mask is layer.sdpa.kwargs["attn_mask"] and not read.mask_in_args


def test_qwen2_biases_belong_to_the_projections():
    layer = llama_layer(2, bias=True)
    sites, reports = matched(layer)
    assert reports == [] and len(sites) == 1
    assert_site_is(sites[0], layer, number=5, kv_heads=2)
    assert sites[0].key.bias.name == "k_proj_bias" and sites[0].value.bias.name == "v_proj_bias"


def test_qwen3_k_norm_before_rope_is_part_of_the_key_region():
    layer = llama_layer(2, k_norm="per head")
    sites, reports = matched(layer)
    assert reports == [] and len(sites) == 1
    assert_site_is(sites[0], layer, number=5, kv_heads=2)
    key = sites[0].key
    # The per-token region starts at the [B, S, H, D] view: the norm, the transpose, then RoPE.
    assert key.heads.target == "view" and key.layout == "[B, S, H, D]"
    assert [n.target for n in key.rope[:8]] == ["to", "pow", "mean", operator.add, torch.rsqrt, operator.mul,
                                                "to", operator.mul]
    assert key.rope[8].target == "transpose"
    assert sites[0].rope_inputs[0].name == "k_norm_weight"


def test_olmo2_k_norm_over_all_heads_before_the_split_is_part_of_the_key_region():
    layer = llama_layer(2, k_norm="all heads")
    sites, reports = matched(layer)
    assert reports == [] and len(sites) == 1
    assert_site_is(sites[0], layer, number=5, kv_heads=2)
    key = sites[0].key
    # The per-token region starts at the projection's output [B, S, H·D]: the norm, the split into heads
    # (the model's own view, which the rewrite replays over the cached rows), the transpose, then RoPE.
    assert key.heads is layer.k_linear and key.layout == "[B, S, H·D]" and key.rows_axis == 1
    assert [n.target for n in key.rope[:9]] == ["to", "pow", "mean", operator.add, torch.rsqrt, operator.mul,
                                                "to", operator.mul, "view"]
    assert key.rope[9].target == "transpose"
    assert sites[0].rope_inputs[0].name == "k_norm_weight"
    assert sites[0].value.layout == "[B, H, S, D]"


def test_exaone4_keys_normed_without_rope_have_no_position_source():
    """EXAONE 4's global layers: a per-head k_norm and no RoPE. The norm's weight reads the same for every
    token, so the region needs no positions; a table-shaped input that does not come from positions is
    still refused (test_sites_that_do_not_fit_are_skipped_with_the_reason)."""
    layer = llama_layer(2, k_norm="per head", rope=False)
    sites, reports = matched(layer)
    assert reports == [] and len(sites) == 1
    assert_site_is(sites[0], layer, number=5, kv_heads=2)
    assert sites[0].position_source is None and [n.name for n in sites[0].rope_inputs] == ["k_norm_weight"]


def test_phi3_fused_qkv_projection_is_sliced_into_key_and_value_rows():
    layer = llama_layer(2, fused_qkv=True)
    sites, reports = matched(layer)
    assert reports == [] and len(sites) == 1
    assert_site_is(sites[0], layer, number=5, kv_heads=2)
    assert sites[0].key.linear is sites[0].value.linear
    assert sites[0].key.channels == FusedRows(HIDDEN, HIDDEN + 2 * HEAD_DIM)
    assert sites[0].value.channels == FusedRows(HIDDEN + 2 * HEAD_DIM, HIDDEN + 4 * HEAD_DIM)


def test_gpt_neox_per_head_fused_qkv_takes_every_heads_key_and_value_rows():
    layer = llama_layer(fused_qkv="per head")
    sites, reports = matched(layer)
    assert reports == [] and len(sites) == 1
    assert_site_is(sites[0], layer, number=5, kv_heads=HEADS)
    key, value = sites[0].key, sites[0].value
    assert key.channels == FusedRows(HEAD_DIM, 2 * HEAD_DIM, 3 * HEAD_DIM)
    assert value.channels == FusedRows(2 * HEAD_DIM, 3 * HEAD_DIM, 3 * HEAD_DIM)
    assert key.layout == value.layout == "[B, H, S, D]" and key.heads.target is operator.getitem
    rows = torch.arange(3 * HIDDEN)  # head h's rows: q at 3·D·h, k at 3·D·h + D, v at 3·D·h + 2·D
    assert key.channels.of(rows).tolist() == [3 * HEAD_DIM * h + HEAD_DIM + c for h in range(HEADS)
                                              for c in range(HEAD_DIM)]
    assert value.channels.count(3 * HIDDEN) == HIDDEN


def test_gpt2_conv1d_projection_reads_its_key_and_value_rows_from_a_weight_stored_transposed():
    layer = llama_layer(fused_qkv="conv1d", rope=False)
    sites, reports = matched(layer)
    assert reports == [] and len(sites) == 1
    assert_site_is(sites[0], layer, number=5, kv_heads=HEADS)
    key, value = sites[0].key, sites[0].value
    assert key.channels == FusedRows(HIDDEN, 2 * HIDDEN, weight_transposed=True)
    assert value.channels == FusedRows(2 * HIDDEN, 3 * HIDDEN, weight_transposed=True)
    weight = layer.builder.example_inputs[[n.name for n in layer.builder.graph.nodes].index("c_attn_weight")]
    assert torch.equal(key.channels.of_weight(weight), weight[:, HIDDEN:2 * HIDDEN].T)  # [out, in] rows


@pytest.mark.parametrize("fused", ["falcon", "bigcode"])
def test_multi_query_fused_projection_gives_its_one_key_head(fused):
    """Falcon-7B picks its one K/V head from the fused heads (``[..., [-2], :]`` of H + 2); StarCoder gives the
    fused projection a heads axis of one and splits its channels. Either way: rows [q | k | v], one head each."""
    layer = llama_layer(1, fused_qkv=fused, rope=False)
    sites, reports = matched(layer)
    assert reports == [] and len(sites) == 1
    assert_site_is(sites[0], layer, number=5, kv_heads=1)
    assert sites[0].key.channels == FusedRows(HIDDEN, HIDDEN + HEAD_DIM)
    assert sites[0].value.channels == FusedRows(HIDDEN + HEAD_DIM, HIDDEN + 2 * HEAD_DIM)
    assert sites[0].key.layout == sites[0].value.layout == "[B, H, S, D]"


def test_persimmon_takes_every_heads_key_block_picked_by_an_integer_index():
    layer = llama_layer(fused_qkv="persimmon", rope=False)
    sites, reports = matched(layer)
    assert reports == [] and len(sites) == 1
    assert_site_is(sites[0], layer, number=5, kv_heads=HEADS)
    assert sites[0].key.channels == FusedRows(HEAD_DIM, 2 * HEAD_DIM, 3 * HEAD_DIM)
    assert sites[0].value.channels == FusedRows(2 * HEAD_DIM, 3 * HEAD_DIM, 3 * HEAD_DIM)


def test_an_addmm_that_is_not_a_plain_projection_is_not_taken_for_one():
    """addmm(bias, x, W, beta=.., alpha=..) scales its terms: not x·W + b, so not a projection."""
    layer = llama_layer(fused_qkv="conv1d", rope=False)
    addmm = layer.k_linear.args[0]
    addmm.kwargs = {"beta": 0.5}
    sites, reports = matched(layer)
    assert sites == [] and reports == [SiteReport(5, "skipped", "the appended states come from 0 projections, "
                                                                "expected exactly one linear")] * 2


def test_dynamic_cache_cat_appends_are_skipped_with_the_reason():
    layer = llama_layer(2, layer=2, append="cat")
    sites, reports = matched(layer)
    # One report per layer (for its keys); RoPE's own torch.cat((-x2, x1), dim=-1) is not an append.
    assert sites == []
    assert reports == [SiteReport(2, "skipped", CAT_SKIP_REASON)]


def test_two_layers_are_two_sites_numbered_by_their_cache_source():
    # Layers 0 and 1 of one graph: the second layer's input is the first's attention output.
    first = llama_layer(2, layer=0)
    g = first.builder
    caches = [g.input(f"cache_{k}_1", torch.zeros(BATCH, 2, MAX_LEN, HEAD_DIM), cache_source(1, kind))
              for k, kind in (("k", "keys"), ("v", "values"))]
    x1 = g.method("reshape", g.method("transpose", first.sdpa, 1, 2), BATCH, SEQ, HIDDEN)
    k = split_heads(g, g.call(F.linear, x1, first.k_linear.args[1], None))[1]
    v = split_heads(g, g.call(F.linear, x1, first.v_linear.args[1], None))[1]
    g.method("index_copy_", caches[0], 2, first.k_append.args[2], k)
    g.method("index_copy_", caches[1], 2, first.k_append.args[2], v)
    sites, reports = matched(first)
    assert reports == []
    assert [s.layer for s in sites] == [0, 1]
    assert sites[1].x is x1 and sites[1].key.append.cache is caches[0]
    assert sites[1].position_source is None and sites[1].key.rope == []  # no RoPE in this layer


def gpt_fast_layer() -> Layer:
    """gpt-fast's attention: the caches are module buffers written with k_cache[:, :, input_pos] = k,
    cos/sin looked up in tables at input_pos ([S], shared by all rows). Dynamo records the write as
    operator.setitem (index_put_ after AOT autograd, which the matcher never sees)."""
    g = DynamoLikeGraph()
    x = g.randn("x", BATCH, SEQ, HIDDEN)
    input_pos = g.input("l_input_pos_", torch.arange(SEQ) + 2, "L['input_pos']")
    tables = [g.randn(f"l_self_buffers_{n}_", MAX_LEN, HEAD_DIM, source=f"L['self']._buffers['{n}']")
              for n in ("cos", "sin")]
    w_q, w_k, w_v = (g.randn(f"{p}_weight", HIDDEN, HIDDEN) for p in "qkv")
    buffers = "L['self']._modules['attn']._modules['0']._buffers"
    k_cache, v_cache = (g.input(f"l_{n}_", torch.zeros(BATCH, HEADS, MAX_LEN, HEAD_DIM), f"{buffers}['{n}']")
                        for n in ("k_cache", "v_cache"))
    cos, sin = (g.call(operator.getitem, t, input_pos) for t in tables)
    _, q = split_heads(g, g.call(F.linear, x, w_q, None))
    k_linear, v_linear = g.call(F.linear, x, w_k, None), g.call(F.linear, x, w_v, None)
    _, k = split_heads(g, k_linear)
    _, v = split_heads(g, v_linear)
    half = HEAD_DIM // 2
    # rotated = cat([-x2, x1]); x·cos + rotated·sin
    rope = [g.call(operator.getitem, k, (Ellipsis, slice(half, None)))]
    rope.append(g.call(operator.neg, rope[-1]))
    rope.append(g.call(operator.getitem, k, (Ellipsis, slice(None, half))))
    rope.append(g.call(torch.cat, [rope[1], rope[2]], dim=-1))
    rope.append(g.call(operator.mul, k, cos))
    rope.append(g.call(operator.mul, rope[3], sin))
    rope.append(g.call(operator.add, rope[4], rope[5]))
    everything = (slice(None), slice(None))
    k_append = g.call(operator.setitem, k_cache, everything + (input_pos,), rope[-1])
    v_append = g.call(operator.setitem, v_cache, everything + (input_pos,), v)
    sdpa = g.call(F.scaled_dot_product_attention, q, k_cache, v_cache)
    return Layer(g, x, k_linear, v_linear, None, None, k, v, rope, k_append, v_append, input_pos, [cos, sin],
                 k_cache, v_cache, sdpa)


def test_gpt_fast_buffer_setitem():
    layer = gpt_fast_layer()
    sites, reports = matched(layer)
    assert reports == [] and len(sites) == 1
    # The buffers' source names no layer: layers are numbered in graph order.
    assert_site_is(sites[0], layer, number=0, kv_heads=HEADS)
    assert sites[0].key.append.index is layer.positions  # [S] positions shared by every row


def test_a_cache_that_is_not_an_xquant_cache_is_skipped_and_the_graph_kept():
    layer = llama_layer(2)
    gm = layer.builder.module(layer.sdpa)
    before = gm.code
    result = XQuantRewrite().apply(gm, layer.builder.example_inputs)
    assert result.reports == [SiteReport(5, "skipped", "the cache is not an XQuantCache (pass "
                                         "cache=xq.XQuantCache(...), or configure the backend with "
                                         "torch.compile(..., options={...}))")]
    assert result.extra_inputs == [] and gm.code == before


def test_a_graph_without_attention_has_no_sites():
    g = DynamoLikeGraph()
    x, w_up, w_down = g.randn("x", BATCH, SEQ, HIDDEN), g.randn("w_up", 128, HIDDEN), g.randn("w_down", HIDDEN, 128)
    out = g.call(F.linear, g.call(F.silu, g.call(F.linear, x, w_up, None)), w_down, None)
    g.module(out)
    assert find_sites(g.graph) == ([], [])


# -- what the matcher refuses, and why ---------------------------------------------------------------

def only_keys_appended(layer: Layer) -> None:
    layer.builder.graph.erase_node(layer.v_append)


def values_transformed(layer: Layer) -> None:
    with layer.builder.graph.inserting_before(layer.v_append):
        scaled = layer.builder.graph.call_function(operator.mul, (layer.v_heads, 2.0))
    scaled.meta["example_value"] = layer.v_heads.meta["example_value"] * 2
    layer.v_append.replace_input_with(layer.v_heads, scaled)


def keys_from_two_projections(layer: Layer) -> None:  # e.g. an unmerged LoRA adapter
    g = layer.builder.graph
    with g.inserting_after(layer.k_linear):
        extra = g.call_function(F.linear, (layer.x, layer.k_linear.args[1], None))
    with g.inserting_after(extra):
        both = g.call_function(operator.add, (layer.k_linear, extra))
    layer.k_linear.replace_all_uses_with(both, delete_user_cb=lambda user: user is not both)
    both.meta["example_value"] = layer.k_linear.meta["example_value"]


def keys_without_heads(layer: Layer) -> None:  # the projection itself is appended, no per-head view
    layer.k_append.replace_input_with(layer.k_append.args[3], layer.k_linear)


def keys_without_rope(layer: Layer) -> None:  # with no source names, RoPE is what tells K from V
    layer.k_append.replace_input_with(layer.k_append.args[3], layer.k_heads)


def keys_clipped_in_place(layer: Layer) -> None:  # OLMo's clip_qkv: k_proj(x).clamp_(-c, c) before the view
    layer.builder.method("clamp_", layer.k_linear, -8.0, 8.0)


def positions_not_integers(layer: Layer) -> None:  # RoPE tables from float positions: no ids to re-apply them at
    layer.positions.meta["example_value"] = layer.positions.meta["example_value"].float()


def written_along_dim_1(layer: Layer) -> None:
    for append in (layer.k_append, layer.v_append):
        append.update_arg(1, 1)


def values_at_other_positions(layer: Layer) -> None:
    g = layer.builder.graph
    index = layer.v_append.args[2]
    with g.inserting_before(layer.v_append):
        shifted = g.call_function(operator.add, (index, 1))
    shifted.meta["example_value"] = index.meta["example_value"] + 1
    layer.v_append.update_arg(2, shifted)


SKIPS = {
    "only the keys are cached": (only_keys_appended, {},
                                 "expected one key and one value append fed by the same input, found 1"),
    "values transformed": (values_transformed, {},
                           "the value states are transformed between projection and cache (only keys may carry RoPE)"),
    "keys from two projections": (keys_from_two_projections, {},
                                  "the appended states come from 2 projections, expected exactly one linear"),
    "keys without a per-head reshape": (keys_without_heads, {},
                                        "no per-head reshape between the projection and the cache append"),
    "cache written along dim 1": (written_along_dim_1, {},
                                  "cache append along dim 1; expected [batch, heads, seq, head_dim] dim 2"),
    "values written at other positions": (values_at_other_positions, {},
                                          "key and value are written at different positions"),
    "RoPE tables are graph inputs": (None, {"tables_as_inputs": True},
                                     "the keys' RoPE cos/sin are inputs of this graph, not computed from position "
                                     "ids in it: the model was split by a graph break; compile with fullgraph=True"),
    "keys clipped in place": (keys_clipped_in_place, {},
                              "the projected states are modified in place on their way to the cache (clamp_, e.g. "
                              "OLMo's clip_qkv): a rebuild from X would miss it"),
    "RoPE tables from float positions": (positions_not_integers, {},
                                         "the keys' RoPE tables do not derive from a [batch, seq] integer position "
                                         "tensor"),
    "no source names and no RoPE on either": (keys_without_rope, {"named": False},
                                              "cannot tell the key append from the value append"),
}


@pytest.mark.parametrize("variant", list(SKIPS))
def test_sites_that_do_not_fit_are_skipped_with_the_reason(variant):
    edit, options, reason = SKIPS[variant]
    layer = llama_layer(2, **options)
    if edit is not None:
        edit(layer)
    sites, reports = matched(layer)
    assert sites == []
    assert reports == [SiteReport(5 if options.get("named", True) else 0, "skipped", reason)]


def test_without_source_names_the_key_is_the_append_with_rope():
    layer = llama_layer(2, named=False)
    sites, reports = matched(layer)
    assert reports == [] and len(sites) == 1
    assert_site_is(sites[0], layer, number=0, kv_heads=2)  # no layer in any name: numbered in graph order


# -- the hand-built graphs against what Dynamo records ------------------------------------------------

def test_the_hand_built_llama_graph_is_what_dynamo_records():
    """Dynamo's graph of the same attention code (written like transformers' Llama with a StaticCache)
    calls the same functions and methods, in the same order, as :func:`llama_layer`'s graph."""

    def attention(hidden_states, position_ids, inv_freq, q_w, k_w, v_w, keys, values, cache_position, mask):
        freqs = position_ids[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().unsqueeze(1), emb.sin().unsqueeze(1)

        def heads(w):
            return F.linear(hidden_states, w, None).view((BATCH, SEQ, -1, HEAD_DIM)).transpose(1, 2)

        def rotate_half(x):
            x1, x2 = x[..., :HEAD_DIM // 2], x[..., HEAD_DIM // 2:]
            return torch.cat((-x2, x1), dim=-1)

        def rope(x):
            return x * cos + rotate_half(x) * sin

        q, k, v = heads(q_w), heads(k_w), heads(v_w)
        q, k = rope(q), rope(k)
        keys.index_copy_(2, cache_position, k)
        values.index_copy_(2, cache_position, v)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, dropout_p=0.0, scale=0.25,
                                              is_causal=False)

    layer = llama_layer(HEADS)
    recorded = []

    def capture(gm, example_inputs):
        recorded.append(gm)
        return gm.forward

    torch.compiler.reset()
    torch.compile(attention, backend=capture, fullgraph=True)(*layer.builder.example_inputs[:3],
                                                              *layer.builder.example_inputs[3:6],
                                                              *layer.builder.example_inputs[6:10])

    def calls(graph):
        return [(n.op, n.target) for n in graph.nodes if n.op in ("call_function", "call_method")]

    assert calls(recorded[0].graph) == calls(layer.builder.graph)
    # And the matcher finds the same site in both.
    dynamo_site, = find_sites(recorded[0].graph)[0]
    our_site = matched(layer)[0][0]
    assert [str(n.target) for n in dynamo_site.key.rope] == [str(n.target) for n in our_site.key.rope]
