"""Absorbed values: (softmax·X̂)·W_vᵀ equals SDPA over the rebuilt V, and the backend uses it in decode."""

import pytest
import torch
import torch.nn.functional as F

import xq_compile as xq
from xq_compile.attention import absorbed_attention

from conftest import decode_inputs, max_error, reference_logits, run_calls, tiny_llama


@pytest.mark.parametrize("q_heads, kv_heads", [(4, 4), (6, 2)])
@pytest.mark.parametrize("seq", [1, 3])
@pytest.mark.parametrize("mask_kind", ["bool", "float", None])
@pytest.mark.parametrize("bias", [False, True])
def test_absorbed_attention_equals_sdpa_over_rebuilt_values(q_heads, kv_heads, seq, mask_kind, bias):
    g = torch.Generator().manual_seed(0)
    batch, n, d, head_dim = 2, 7, 24, 8
    q = torch.randn(batch, q_heads, seq, head_dim, generator=g)
    k = torch.randn(batch, kv_heads, n, head_dim, generator=g)
    x = torch.randn(batch, n, d, generator=g)
    w = torch.randn(kv_heads * head_dim, d, generator=g)
    b = torch.randn(kv_heads * head_dim, generator=g) if bias else None
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(batch, 1, seq, n, generator=g) > 0.3
        mask[..., 0] = True
    elif mask_kind == "float":
        mask = torch.randn(batch, 1, seq, n, generator=g)
    v = F.linear(x, w, b).unflatten(-1, (kv_heads, head_dim)).transpose(1, 2)
    group = q_heads // kv_heads
    expected = F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                              attn_mask=mask, scale=0.3)
    got = absorbed_attention(q, k, x, w, b, mask, scale=0.3, query_heads=q_heads, kv_heads=kv_heads,
                             head_dim=head_dim, seq_len=seq, mask_is_bool=mask_kind == "bool")
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_fully_masked_query_row_gives_zero_like_sdpa():
    q, k = torch.randn(1, 2, 1, 4), torch.randn(1, 2, 3, 4)
    x, w = torch.randn(1, 3, 6), torch.randn(8, 6)
    mask = torch.zeros(1, 1, 1, 3, dtype=torch.bool)
    got = absorbed_attention(q, k, x, w, torch.randn(8), mask, scale=None, query_heads=2, kv_heads=2,
                             head_dim=4, seq_len=1, mask_is_bool=True)
    assert torch.equal(got, torch.zeros_like(got))


@pytest.mark.parametrize("num_kv_heads", [4, 2], ids=["mha", "gqa"])
def test_decode_absorbs_values_and_matches_rebuilding_them(num_kv_heads):
    model = tiny_llama(num_kv_heads=num_kv_heads, bias=True)
    calls = decode_inputs(steps=4)
    outputs, codes = {}, {}
    for absorb in (True, False):
        torch._dynamo.reset()
        config = xq.XQuantConfig(bits=4, group_size=16, absorb_values=absorb)
        cache = xq.XQuantCache(model.config, max_batch_size=2, max_cache_len=32, xquant=config)
        outputs[absorb] = run_calls(torch.compile(model.forward, backend="xquant", fullgraph=True), cache, calls)
        codes[absorb] = xq.COMPILE_LOG[-1].code_after  # the decode graph
    assert max_error(outputs[True], outputs[False]) < 1e-5
    assert "scaled_dot_product_attention" not in codes[True] and "softmax" in codes[True]
    # Without absorption V is rebuilt: one more projection of the cached rows per layer.
    assert codes[False].count("linear(") == codes[True].count("linear(") + 2
    unquantized = xq.XQuantConfig(bits=None, group_size=16)
    torch._dynamo.reset()
    cache = xq.XQuantCache(model.config, max_batch_size=2, max_cache_len=32, xquant=unquantized)
    exact = run_calls(torch.compile(model.forward, backend="xquant", fullgraph=True), cache, calls)
    assert max_error(exact, reference_logits(model, calls, 32)) < 1e-4


def test_short_prefill_chunks_absorb_values_under_inductor():
    """Chunks of a few tokens also take the absorbed path (4·S·Hq <= Hkv·D); with Inductor this once
    failed on the real model (a bmm layout check on the data-dependent n)."""
    model = tiny_llama(num_kv_heads=4)  # Hkv·D = 64: chunks of up to 4 tokens absorb (4 heads)
    calls = decode_inputs(batch=1, prompt=3, steps=3)
    config = xq.XQuantConfig(bits=None, group_size=16)
    cache = xq.XQuantCache(model.config, max_batch_size=1, max_cache_len=32, xquant=config)
    out = run_calls(torch.compile(model.forward, backend="xquant", fullgraph=True), cache, calls)
    prefill_code = xq.COMPILE_LOG[-2].code_after
    assert "scaled_dot_product_attention" not in prefill_code  # the 2-token prefill absorbed V too
    assert max_error(out, reference_logits(model, calls, 32)) < 1e-4
