"""The paged X-cache attention of the vLLM plugin (xq_compile.vllm.paged/layout), in plain torch: no vLLM
needed. Checked against per-request dense attention over X̂ as the simulation computes it."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from xq_compile import XQuantConfig, quant
from xq_compile.latent import svd_factors
from xq_compile.rotation import fold_into_weight, hadamard, rotate
from xq_compile.simulate import simulated_x
from xq_compile.vllm import bytes_per_token, token_state_layout
from xq_compile.vllm import paged
from xq_compile.vllm.layout import field_views


def test_layout_bytes_are_the_x_form_of_xquantcache():
    four = token_state_layout(XQuantConfig(bits=4, group_size=64), 576, torch.float32)
    assert [(f.name, f.width, f.dtype) for f in four] == [
        ("codes", 288, torch.uint8), ("scale", 9, torch.float16), ("zero", 9, torch.float16)]
    assert bytes_per_token(four) == 324  # 2 x 576 x 2 / 324 = 7.11x an fp16 K+V token
    assert bytes_per_token(token_state_layout(XQuantConfig(bits=3, group_size=64), 576, torch.float32)) == 252
    assert bytes_per_token(token_state_layout(XQuantConfig(bits=None), 576, torch.bfloat16)) == 1152
    with pytest.raises(ValueError, match="group_size=64 does not divide"):
        token_state_layout(XQuantConfig(bits=4, group_size=64), 96, torch.float32)


def _field_bytes(pages: torch.Tensor, layout, name: str) -> torch.Tensor:
    """The bytes of field ``name`` of every slot, [num_blocks, block_size, nbytes], cut from each block
    by hand: a block is its slots' codes, then their scales, then their zeros."""
    blocks, block_size = pages[:, 0].reshape(pages.shape[0], -1), pages.shape[2]
    start = 0
    for f in layout:
        if f.name == name:
            return blocks[:, block_size * start:block_size * (start + f.nbytes)].reshape(pages.shape[0], block_size, -1)
        start += f.nbytes
    raise KeyError(name)


def test_a_block_holds_each_field_of_its_slots_in_one_run():
    """store writes a token's codes, scale and zero into three runs of its block (field-major), so each
    field's rows have their own stride (32 code bytes here, not the 40-byte token): what lets the GPU
    kernels load codes 16 bytes at a time. gather reads back exactly the state stored."""
    xquant = XQuantConfig(bits=4, group_size=32)
    layout = token_state_layout(xquant, 64, torch.float32)
    assert bytes_per_token(layout) == 40
    pages = torch.zeros(3, 1, 4, 40, dtype=torch.uint8)
    x, slots = torch.randn(5, 64), torch.tensor([5, 4, 11, 0, 7])
    paged.store(pages, slots, x, layout, xquant, None)
    state = paged.x_state(x, xquant, None)
    for name, want in state.items():
        got = _field_bytes(pages, layout, name).view(want.dtype)[slots // 4, slots % 4]
        assert torch.equal(got, want), name
    views = field_views(pages, layout)
    assert views["codes"].stride() == (160, 32, 1) and views["scale"].stride() == (80, 2, 1)
    assert all(v.untyped_storage().data_ptr() == pages.untyped_storage().data_ptr() for v in views.values())
    batch = paged.PagedBatch(query_start_loc=torch.tensor([0, 1], dtype=torch.int32),
                             seq_lens=torch.tensor([6], dtype=torch.int32),
                             block_table=torch.tensor([[0, 1]], dtype=torch.int32),
                             slot_mapping=torch.tensor([5]), max_query_len=1, max_seq_len=6)
    rows, valid = paged.gather(pages, batch, layout, xquant, torch.float32)
    # slots 0, 4, 5 of request 0 hold x[3], x[1], x[0]
    torch.testing.assert_close(rows[[0, 4, 5]], paged.x_hat(
        {k: v[[3, 1, 0]] for k, v in state.items()}, xquant, torch.float32))


def _rope(positions: torch.Tensor, keys: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Neox-style RoPE (as Llama), for [T, heads * head_dim] at positions [T]."""
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = positions.float()[:, None] * inv[None]
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]
    k = keys.view(keys.shape[0], -1, head_dim)
    a, b = k[..., : head_dim // 2], k[..., head_dim // 2:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], -1).flatten(1)


def _reference_rows(form: str, x: torch.Tensor, xquant: XQuantConfig, w_k, w_v, h):
    """X̂ for K and for V as the torch reference computes them: the simulation's X̂ (X form), or each
    latent fake-quantized per token through the rotated SVD factors and mapped back (latent form)."""
    if xquant.bits is None:
        return x, x, w_k, w_v
    if form == "x":
        return simulated_x(x, xquant), simulated_x(x, xquant), w_k, w_v
    (down_k, up_k), (down_v, up_v) = svd_factors(w_k, h), svd_factors(w_v, h)
    fake = lambda latent: quant.fake_quantize(latent, xquant.bits, xquant.group_size)  # noqa: E731
    return fake(F.linear(x, down_k)), fake(F.linear(x, down_v)), up_k, up_v


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("form", ["x", "latent"])
@pytest.mark.parametrize("bits", [None, 4, 2])
@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("absorb", [False, True])
@pytest.mark.parametrize("window, soft_cap", [(None, None), (5, None), (None, 0.5)])
def test_paged_attention_equals_dense_attention_per_request(static, form, bits, kv_heads, absorb, window, soft_cap):
    """Three requests (a decode step, a first prefill chunk, a later chunk) and two padding tokens; rows read
    packed (CPU) or at every place (``static``: CUDA graphs), the unused places of the pages filled with
    NaN bytes (the static read must not let them through). With a sliding ``window``, the blocks no new token
    sees any more are handed back as vLLM does: their table entries point at the null block (NaN too).
    ``soft_cap``: Gemma 2's cap on the scaled scores (these scores reach about ±2)."""
    torch.manual_seed(0)
    d, heads, head_dim, block_size, num_blocks, g = 128, 4, 16, 4, 40, 32
    xquant = XQuantConfig(bits=bits, group_size=g, form=form)
    w_k, w_v = torch.randn(kv_heads * head_dim, d) / d**0.5, torch.randn(kv_heads * head_dim, d) / d**0.5
    b_k, b_v = torch.randn(kv_heads * head_dim), torch.randn(kv_heads * head_dim)
    h = hadamard(g) if bits is not None else None
    shape = dict(num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, scale=head_dim**-0.5)
    if form == "x":
        fold = (lambda w: fold_into_weight(w, h)) if h is not None else (lambda w: w)
        proj = paged.Projection(k_weight=fold(w_k), v_weight=fold(w_v), k_bias=b_k, v_bias=b_v, **shape)
        row_width, store_rotation = d, h
    else:  # the rows are the latents, already rotated by the factors
        proj = paged.latent_projection(w_k, b_k, w_v, b_v, h, **shape)
        row_width, store_rotation = 2 * kv_heads * head_dim, None
    layout = token_state_layout(xquant, row_width, torch.float32)
    pages = torch.full((num_blocks, 1, block_size, bytes_per_token(layout)), 255, dtype=torch.uint8)  # NaN
    rope = lambda pos, keys: _rope(pos, keys, head_dim)  # noqa: E731

    cached, new = [5, 0, 9], [1, 6, 3]  # a decode step, a first prefill chunk, a later chunk
    totals = [c + n for c, n in zip(cached, new)]
    xs = [torch.randn(t, d) for t in totals]
    tables = 1 + torch.randperm(num_blocks - 1)[:12].view(3, 4)  # in no particular order; block 0 is vLLM's null block

    def slot(r, pos):
        return int(tables[r, pos // block_size]) * block_size + pos % block_size

    def store(slots, x):
        paged.store(pages, slots, proj.row_source(x), layout, xquant, store_rotation)

    # the cached rows were written by earlier steps
    for r, c in enumerate(cached):
        if c:
            store(torch.tensor([slot(r, p) for p in range(c)]), xs[r][:c])
    slots = [slot(r, p) for r in range(3) for p in range(cached[r], totals[r])]
    starts = torch.tensor([0, 1, 7, 10], dtype=torch.int32)
    batch = paged.PagedBatch(query_start_loc=starts, seq_lens=torch.tensor(totals, dtype=torch.int32),
                             block_table=tables.int(), slot_mapping=torch.tensor(slots + [-1, -1]),  # 2 padding
                             max_query_len=max(new), max_seq_len=max(totals))
    x_new = torch.cat([xs[r][cached[r]:] for r in range(3)] + [torch.randn(2, d)])
    query = torch.randn(x_new.shape[0], heads * head_dim)

    store(batch.slot_mapping, x_new)
    if window is not None:  # request 2 (rows 0..11, new tokens at 9..11) sees rows 5..11 only: block 0 freed
        pages[tables[2, 0]] = 255
        batch.block_table[2, 0] = 0
    rows, valid = paged.gather(pages, batch, layout, xquant, torch.float32, static=static, window=window)
    out = paged.attend(query[:10], rows, valid, batch, proj, rope, absorb, window=window, soft_cap=soft_cap)

    for r in range(3):
        k_rows, v_rows, k_weight, v_weight = _reference_rows(form, xs[r], xquant, w_k, w_v, h)
        keys = rope(torch.arange(totals[r]), F.linear(k_rows, k_weight, b_k)).view(-1, kv_heads, head_dim)
        values = F.linear(v_rows, v_weight, b_v).view(-1, kv_heads, head_dim).transpose(0, 1)
        q = query[starts[r]:starts[r + 1]].view(-1, heads, head_dim).transpose(0, 1)
        offset = torch.arange(cached[r], totals[r])[:, None] - torch.arange(totals[r])[None]  # query - row
        visible = (offset >= 0) & (offset < (window or totals[r]))
        scores = q @ keys.transpose(0, 1).repeat_interleave(heads // kv_heads, 0).transpose(1, 2) * head_dim**-0.5
        if soft_cap is not None:
            scores = soft_cap * torch.tanh(scores / soft_cap)
        weights = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        want = weights @ values.repeat_interleave(heads // kv_heads, 0)
        got = out[starts[r]:starts[r + 1]].view(-1, heads, head_dim).transpose(0, 1)
        torch.testing.assert_close(got, want, atol=5e-5, rtol=5e-5)


def test_absorb_rule_follows_the_query_length():
    proj = paged.Projection(k_weight=None, v_weight=None, k_bias=None, v_bias=None, num_heads=9, num_kv_heads=9,
                            head_dim=64, scale=0.125)
    assert paged.absorb_values(XQuantConfig(bits=4), 1, proj)  # decode: absorb
    assert not paged.absorb_values(XQuantConfig(bits=4), 128, proj)  # a prefill chunk: rebuild V
    assert not paged.absorb_values(XQuantConfig(bits=4, absorb_values=False), 1, proj)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_attention_sharded_by_token_merges_to_the_full_attention(kv_heads):
    """Decode context parallelism: rows dealt round-robin to 3 ranks, each attends over its own rows; the
    merged result is the attention over all rows (a query that sees no row on a rank is handled)."""
    torch.manual_seed(0)
    heads, queries, rows, dim = 4, 3, 10, 8
    q = torch.randn(2, heads, queries, dim)
    keys, values = torch.randn(2, kv_heads, rows, dim), torch.randn(2, kv_heads, rows, dim)
    mask = torch.arange(rows)[None, None] <= torch.tensor([[1, 5, 9], [0, 4, 7]])[..., None]  # causal, per request
    want = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask.unsqueeze(1), scale=0.3,
                                          enable_gqa=kv_heads != heads)
    full, full_lse = paged.attention_with_lse(q, keys, values, mask, 0.3)
    torch.testing.assert_close(full, want, atol=1e-5, rtol=1e-5)
    parts = [paged.attention_with_lse(q, keys[..., r::3, :], values[..., r::3, :], mask[..., r::3], 0.3)
             for r in range(3)]
    assert torch.isinf(parts[1][1][1, :, 0]).all()  # request 1's first query sees row 0 only (rank 0)
    merged, lse = paged.merge_attention([p[0] for p in parts], [p[1] for p in parts])
    torch.testing.assert_close(merged, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, full_lse)


def test_engine_args_select_the_plugin_and_refuse_what_it_does_not_serve():
    from xq_compile.vllm import engine_args, serve_flags

    args = engine_args(XQuantConfig(bits=4, form="x"))
    assert args["hf_overrides"]["architectures"] == ["XQuantLlamaForCausalLM"]
    assert XQuantConfig.from_options(args["hf_overrides"]["xquant"]) == XQuantConfig(bits=4, form="x")
    assert json.loads(serve_flags(XQuantConfig(bits=4, form="x"))[1]) == args["hf_overrides"]
    for config in (XQuantConfig(cross_layer=True), XQuantConfig(form="latent", keep_channel0=True),
                   XQuantConfig(layer_bits=(4, 2)), XQuantConfig(form="x", recent=32)):
        with pytest.raises(NotImplementedError, match="does not serve"):
            engine_args(config)
    with pytest.raises(ValueError, match="serves"):
        engine_args(XQuantConfig(), architecture="GptOssForCausalLM")


def test_engine_args_carry_the_fused_decode_configuration_checked():
    """engine_args(decode_attention=...) (the fused decode kernels' configuration, e.g. the opt-in Gluon
    scores kernel) travels in the model config to every worker, where decode_config_of reads it back;
    unknown keys and bad values are refused before any engine starts."""
    from types import SimpleNamespace

    from xq_compile.vllm import decode_config_of, engine_args, serve_flags

    four_bit = XQuantConfig(bits=4, form="x")
    overrides = engine_args(four_bit, decode_attention={"gluon": "auto", "num_splits": 8})["hf_overrides"]
    assert decode_config_of(SimpleNamespace(**overrides)) == {"gluon": "auto", "num_splits": 8}
    assert json.loads(serve_flags(four_bit, decode_attention={"gluon": "auto"})[1])["xquant_decode_attention"] \
        == {"gluon": "auto"}
    plain = engine_args(four_bit)["hf_overrides"]
    assert decode_config_of(SimpleNamespace(**plain)) == {} and "xquant_decode_attention" not in plain
    with pytest.raises(TypeError, match="unknown decode_attention config.*block_q"):
        engine_args(four_bit, decode_attention={"block_q": 16})
    with pytest.raises(ValueError, match="gluon=3 must be 0"):
        engine_args(four_bit, decode_attention={"gluon": 3})
    with pytest.raises(ValueError, match="block_n=48"):
        decode_config_of(SimpleNamespace(xquant_decode_attention={"block_n": 48}))


def test_fused_decode_launches_under_the_layer_configuration(monkeypatch):
    """The layer's configuration is in force for the op's launches (what the GPU launcher resolves), and only
    inside fused_decode."""
    from xq_compile.kernels import decode_attention as da

    pages, batch, layout, xquant, proj, query, inv_freq = _decode_step("x", 4, kv_heads=2)
    seen = []

    def op(**args):
        seen.append(da.resolve_config(da.DecodeAttentionInputs.from_op_args(**args)))
        return da.decode_attention(**args)

    monkeypatch.setattr(paged, "decode_attention", op)
    want = paged.fused_decode(query, pages, batch, layout, xquant, proj, inv_freq)
    got = paged.fused_decode(query, pages, batch, layout, xquant, proj, inv_freq, {"gluon": "auto", "num_splits": 5})
    assert [cfg["gluon"] for cfg in seen] == [0, "auto"] and seen[1]["num_splits"] == 5
    assert torch.equal(got, want)  # (on CPU the op's torch kernel: the configuration is the GPU launches')
    assert da.resolve_config(da.DecodeAttentionInputs.from_op_args(
        **paged.decode_arguments(query, pages, batch, layout, xquant, proj, inv_freq))) == seen[0]


def test_engine_args_read_the_architecture_from_the_model_folder(tmp_path):
    from xq_compile.vllm import engine_args

    four_bit = XQuantConfig(bits=4, form="x")
    for stock, served in (("Qwen2ForCausalLM", "XQuantQwen2ForCausalLM"),
                          ("MistralForCausalLM", "XQuantLlamaForCausalLM"),
                          ("LlamaForCausalLM", "XQuantLlamaForCausalLM"),
                          ("Phi3ForCausalLM", "XQuantPhi3ForCausalLM"),
                          ("Gemma2ForCausalLM", "XQuantGemma2ForCausalLM"),
                          ("Gemma3ForCausalLM", "XQuantGemma3ForCausalLM")):
        (tmp_path / "config.json").write_text(json.dumps({"architectures": [stock]}))
        assert engine_args(four_bit, model=str(tmp_path))["hf_overrides"]["architectures"] == [served]
        assert engine_args(four_bit, stock) == engine_args(four_bit, model=str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GptOssForCausalLM"]}))
    with pytest.raises(ValueError, match="GptOssForCausalLM.*stock vLLM"):
        engine_args(four_bit, model=str(tmp_path))
    with pytest.raises(ValueError, match="not a model folder with a config.json"):
        engine_args(four_bit, model=str(tmp_path / "missing"))


# --------------------------------------------------------------------------------------------------
# The fused decode path (paged.fused_decode: xq_compile::decode_attention reading the pages; its Triton
# kernels are tested under the interpreter in tests/test_paged_decode_attention.py, here the op's CPU
# kernel checks the views and the arguments against the torch path)


def _decode_step(form: str, bits: int, kv_heads: int, seed: int = 0):
    """A decode step of 3 requests (5, 12 and 0 rows cached, one new token each) stored in shuffled pages
    whose unused bytes are NaN; returns what the two paths take."""
    torch.manual_seed(seed)
    d, heads, head_dim, block_size, num_blocks, g = 128, 4, 16, 4, 24, 32
    xquant = XQuantConfig(bits=bits, group_size=g, form=form)
    w_k, w_v = torch.randn(kv_heads * head_dim, d) / d**0.5, torch.randn(kv_heads * head_dim, d) / d**0.5
    b_k, b_v = torch.randn(kv_heads * head_dim), torch.randn(kv_heads * head_dim)
    h = hadamard(g)
    shape = dict(num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, scale=head_dim**-0.5)
    if form == "x":
        proj = paged.Projection(k_weight=fold_into_weight(w_k, h), v_weight=fold_into_weight(w_v, h), k_bias=b_k,
                                v_bias=b_v, **shape)
        row_width, store_rotation = d, h
    else:
        proj = paged.latent_projection(w_k, b_k, w_v, b_v, h, **shape)
        row_width, store_rotation = 2 * kv_heads * head_dim, None
    layout = token_state_layout(xquant, row_width, torch.float32)
    pages = torch.full((num_blocks, 1, block_size, bytes_per_token(layout)), 255, dtype=torch.uint8)  # NaN
    totals = [6, 13, 1]
    tables = 1 + torch.randperm(num_blocks - 1)[:12].view(3, 4)
    tables[2, 1:] = 0  # past a request's last block: vLLM's null block
    for r, total in enumerate(totals):
        slots = torch.tensor([int(tables[r, p // block_size]) * block_size + p % block_size for p in range(total)])
        paged.store(pages, slots, proj.row_source(torch.randn(total, d)), layout, xquant, store_rotation)
    batch = paged.PagedBatch(query_start_loc=torch.arange(4, dtype=torch.int32),
                             seq_lens=torch.tensor(totals, dtype=torch.int32), block_table=tables.int(),
                             slot_mapping=torch.zeros(3, dtype=torch.long), max_query_len=1, max_seq_len=max(totals))
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))  # as _rope's
    return pages, batch, layout, xquant, proj, torch.randn(3, heads * head_dim), inv_freq


@pytest.mark.parametrize("form", ["x", "latent"])
@pytest.mark.parametrize("bits", [4, 3])
def test_page_sources_are_views_of_the_page_bytes(form, bits):
    """The op's sources share the pages' storage (no copy) and hold each slot's codes, scale and zero as
    the layout decodes them: the whole row (X form), or its key latent then its value latent."""
    pages, batch, layout, xquant, proj, _, _ = _decode_step(form, bits, kv_heads=2)
    sources = paged.page_sources(pages, layout, xquant, proj)
    for name, t in sources.items():
        if t is not None:
            assert t.untyped_storage().data_ptr() == pages.untyped_storage().data_ptr(), name
    block = int(batch.block_table[1, 2])  # request 1's rows 8..11
    if form == "x":
        assert sources["v_packed"] is None
        parts = {"codes": [sources["k_packed"]], "scale": [sources["k_scale"]], "zero": [sources["k_zero"]]}
    else:  # [key latent | value latent]: 64 channels each
        assert sources["k_packed"].shape[-1] == quant.packed_width(proj.key_width, bits)
        parts = {"codes": [sources["k_packed"], sources["v_packed"]], "scale": [sources["k_scale"], sources["v_scale"]],
                 "zero": [sources["k_zero"], sources["v_zero"]]}
    for name, views in parts.items():
        joined = torch.cat([v[block] for v in views], dim=-1)
        assert torch.equal(joined.contiguous().view(torch.uint8), _field_bytes(pages, layout, name)[block]), name


@pytest.mark.parametrize("form", ["x", "latent"])
@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_fused_decode_equals_the_torch_path(form, bits, kv_heads):
    """fused_decode (the op over the pages, here its CPU kernel) gives the torch path's decode output
    (gather + attend, values absorbed or rebuilt), NaN bytes in every unused place; a wrong block table
    gives a wrong answer."""
    pages, batch, layout, xquant, proj, query, inv_freq = _decode_step(form, bits, kv_heads)
    rope = lambda pos, keys: _rope(pos, keys, proj.head_dim)  # noqa: E731
    rows, valid = paged.gather(pages, batch, layout, xquant, torch.float32)
    got = paged.fused_decode(query, pages, batch, layout, xquant, proj, inv_freq)
    assert torch.isfinite(got).all()
    for absorb in (True, False):
        want = paged.attend(query, rows, valid, batch, proj, rope, absorb)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    table = batch.block_table.clone()
    table[1, [0, 1]] = table[1, [1, 0]]
    wrong = paged.fused_decode(query, pages, dataclasses.replace(batch, block_table=table), layout, xquant, proj,
                               inv_freq)
    assert torch.equal(wrong[[0, 2]], got[[0, 2]]) and not torch.allclose(wrong[1], got[1], atol=1e-3)


def _windowed_decode_step(form: str, bits: int = 4):
    """:func:`_decode_step` as a Gemma layer sees it: a window of 5 rows, so request 1 (13 rows) no longer
    sees its first two blocks, which vLLM frees (their table entries point at the null block, NaN bytes
    here); a soft cap of 0.5 on the scaled scores; and a per-head key RMSNorm. Returns the step (in
    fused_decode's argument order), the options of fused_decode, and the torch path's RoPE (the key norm
    in it, as _keys_at applies the model's)."""
    pages, batch, layout, xquant, proj, query, inv_freq = _decode_step(form, bits, kv_heads=2, seed=1)
    table = batch.block_table.clone()
    table[1, :2] = 0
    batch = dataclasses.replace(batch, block_table=table)
    norm = paged.KeyNorm(weight=0.5 + torch.rand(proj.head_dim), eps=1e-6)

    def rope(positions, keys):
        heads = keys.unflatten(-1, (-1, proj.head_dim))
        normed = heads * torch.rsqrt(heads.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight
        return _rope(positions, normed.flatten(-2), proj.head_dim)

    return (query, pages, batch, layout, xquant, proj, inv_freq), dict(window=5, soft_cap=0.5, key_norm=norm), rope


@pytest.mark.parametrize("form", ["x", "latent"])
def test_fused_decode_applies_window_cap_and_key_norm(form):
    """With a sliding window, a soft cap and a key norm (Gemma 2/3, Qwen3, Mistral's window), fused_decode
    (the op's CPU kernel) gives the torch path's output, and never reads the freed blocks behind the
    window (NaN there would show); leaving out any of the three gives another answer."""
    step, options, rope = _windowed_decode_step(form)
    query, pages, batch, layout, xquant, proj, inv_freq = step
    got = paged.fused_decode(*step, **options)
    assert torch.isfinite(got).all()
    rows, valid = paged.gather(pages, batch, layout, xquant, torch.float32, window=options["window"])
    for absorb in (True, False):
        want = paged.attend(query, rows, valid, batch, proj, rope, absorb, window=options["window"],
                            soft_cap=options["soft_cap"])
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    for left_out in ("soft_cap", "key_norm"):
        other = paged.fused_decode(*step, **{**options, left_out: None})
        assert not torch.allclose(other, got, atol=1e-3), left_out
    # without the window, request 1 reads its freed blocks: NaN
    assert not torch.isfinite(paged.fused_decode(*step, **{**options, "window": None})[1]).all()


def test_fused_decode_refuses_what_it_does_not_read():
    pages, batch, layout, xquant, proj, query, inv_freq = _decode_step("x", 4, kv_heads=2)
    with pytest.raises(ValueError, match="one new token per request"):
        paged.fused_decode(torch.cat([query, query]), pages, batch, layout, xquant, proj, inv_freq)
    plain = token_state_layout(XQuantConfig(bits=None), 128, torch.float32)
    assert paged.pages_readable(layout) and not paged.pages_readable(plain)
    with pytest.raises(ValueError, match="bits=None.*torch path"):
        paged.page_sources(torch.zeros(2, 1, 4, bytes_per_token(plain), dtype=torch.uint8), plain,
                           XQuantConfig(bits=None), proj)
    padded = torch.zeros(2, 1, 4, bytes_per_token(layout) + 1, dtype=torch.uint8)[..., 1:]  # a gap after each token
    with pytest.raises(ValueError, match="one contiguous run"):
        paged.page_sources(padded, layout, xquant, proj)
    odd_codes = token_state_layout(XQuantConfig(bits=3, group_size=8), 40, torch.float32)  # 15 code bytes
    with pytest.raises(ValueError, match="not torch.float16-aligned.*even block_size"):  # scales at byte 3 x 15
        field_views(torch.zeros(2, 1, 3, bytes_per_token(odd_codes), dtype=torch.uint8), odd_codes)
    assert field_views(torch.zeros(2, 1, 4, bytes_per_token(odd_codes), dtype=torch.uint8), odd_codes)["scale"].shape \
        == (2, 4, 5)
