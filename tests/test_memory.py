"""memory_report: the formulas against the bytes XQuantCache really allocates, and the fixed overhead."""

import pytest
import sympy
import torch
from transformers import LlamaConfig

import xq_compile as xq
from xq_compile.memory import N, fp16_kv_cache_bytes, memory_report, xquant_cache_bytes


def _config(kv_heads: int, hidden: int = 256) -> LlamaConfig:
    return LlamaConfig(vocab_size=50, hidden_size=hidden, intermediate_size=64, num_hidden_layers=3,
                       num_attention_heads=8, num_key_value_heads=kv_heads)


CASES = [
    # (bits, group, rotation, kv_heads, batch, seq_len)
    (2, 32, "hadamard", 8, 1, 17),
    (3, 64, "none", 8, 2, 40),
    (3, 128, "hadamard", 2, 1, 33),
    (4, 64, "hadamard", 8, 1, 64),
    (4, 128, "none", 2, 2, 5),
    (8, 32, "none", 2, 1, 100),
    (8, 128, "hadamard", 8, 2, 7),
    (None, 64, "none", 8, 1, 12),
    (None, 32, "hadamard", 2, 2, 9),
]


@pytest.mark.parametrize("bits,group,rotation,kv_heads,batch,seq_len", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_formula_equals_allocated_bytes(bits, group, rotation, kv_heads, batch, seq_len, dtype):
    config = _config(kv_heads)
    # form="x" on the GQA cases too: this test is about the X form (test_latent_formula_... below)
    xcfg = xq.XQuantConfig(bits=bits, group_size=group, rotation=rotation, form="x")
    cache = xq.XQuantCache(config, max_batch_size=batch, max_cache_len=seq_len, xquant=xcfg, dtype=dtype)
    dtype_bytes = torch.finfo(dtype).bits // 8
    report = memory_report(config, xcfg, seq_len, batch, dtype_bytes=dtype_bytes)
    # nbytes() measures the storages the cache allocated: the formula must match it to the byte.
    assert report.xquant.total_at == cache.nbytes()
    # The fixed part is what nbytes() holds beyond the per-token rows, counted, not ignored.
    fixed = config.num_hidden_layers * (2 * dtype_bytes + 8) + (group * group * 4 if rotation == "hadamard" else 0)
    assert report.xquant.fixed == fixed
    # xquant_cache_bytes (used elsewhere) is the growing part of the same formula.
    assert xquant_cache_bytes(config, xcfg, batch, seq_len, dtype_bytes) == report.xquant.total_at - fixed
    assert report.fp16_kv.total_at == fp16_kv_cache_bytes(config, batch, seq_len)
    # The sympy expression is linear in n with the per-token rate as slope.
    assert sympy.expand(report.xquant.total - report.xquant.per_token * batch * N) == fixed


LATENT_CASES = [
    # (bits, group, rotation, keep_channel0, batch, seq_len): GQA 8 query / 2 KV heads of 32, d = 256
    (4, 32, "hadamard", False, 1, 17),
    (4, 64, "none", True, 2, 64),
    (2, 16, "hadamard", True, 1, 65),
    (3, 32, "none", False, 2, 100),
    (8, 64, "hadamard", False, 1, 1),
    (None, 32, "none", False, 2, 9),
]


@pytest.mark.parametrize("bits,group,rotation,channel0,batch,seq_len", LATENT_CASES)
def test_latent_formula_equals_allocated_bytes(bits, group, rotation, channel0, batch, seq_len):
    config = _config(2)  # X (256) is wider than K+V (2·64): "auto" picks the latent form
    xcfg = xq.XQuantConfig(bits=bits, group_size=group, rotation=rotation, keep_channel0=channel0)
    cache = xq.XQuantCache(config, max_batch_size=batch, max_cache_len=seq_len, xquant=xcfg)
    assert all(layer.form.name == "latent" for layer in cache.layers)
    report = memory_report(config, xcfg, seq_len, batch)
    assert report.xquant.total_at == cache.nbytes()
    r, layers = 64, 3
    if bits is None:
        assert report.xquant.per_token == layers * 2 * r * 4 + 8
        return
    # Hand count at large n: two latents of r codes, per-token value scale/zero, per-group key scale/zero.
    rate = layers * (2 * r * bits / 8 + 4 * r / group + 4 * r / group + 2 * channel0) + 8
    assert float(report.xquant.per_token) == pytest.approx(rate)
    # Asymptotically the latent costs what KIVI-style KV quantization at the same bits does (+ position,
    # + channel 0): the latent is exactly as wide as K (V).
    assert float(report.xquant.per_token) == pytest.approx(float(report.kivi_kv.per_token) + 8 + 6 * channel0)


def test_latent_cache_pays_off_at_short_contexts():
    """GQA with 2 K/V heads at 4 bits (shaped like Qwen2.5-0.5B: 24 layers, 14 heads of 64), a 576-token
    cache: at least 3.3x smaller than fp16 K/V, measured (it was 2.81x with an fp16 open key group and
    a spare group). The key latent's only fixed cost is the open group's low code bits: g·r/2 bytes."""
    config = LlamaConfig(vocab_size=50, hidden_size=896, intermediate_size=64, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2)
    xcfg = xq.XQuantConfig(bits=4, group_size=64)
    cache = xq.XQuantCache(config, max_batch_size=1, max_cache_len=576, xquant=xcfg, dtype=torch.float16)
    assert all(layer.form.name == "latent" for layer in cache.layers)
    report = memory_report(config, xcfg, 576, dtype_bytes=2)
    assert report.xquant.total_at == cache.nbytes()
    assert report.ratio_to_fp16(report.xquant) >= 3.3
    r, g, layers = 128, 64, 24
    per_token = 2 * r // 2 + 4 * r // g + 4 * r // g  # codes of both latents, value and key scale/zero
    fixed = g * r // 2 + 2 * 2 + 8  # the open group's low bits; the layer's K/V placeholders and length
    hadamard = g * g * 4
    assert cache.nbytes() == layers * (576 * per_token + fixed) + 576 * 8 + hadamard  # + the position ids


def test_kivi_formula_partial_group_and_rates():
    config = _config(8)
    xcfg = xq.XQuantConfig(bits=4, group_size=64, rotation="none")
    kv_dim, layers = 256, 3
    for n in (1, 64, 65, 128):
        r = memory_report(config, xcfg, n)
        key_groups = -(-n // 64)  # a partial last token-group of the keys still has its scale+zero
        expected = layers * (2 * kv_dim * n * 4 // 8 + 4 * kv_dim * key_groups + 4 * (kv_dim // 64) * n)
        assert r.kivi_kv.total_at == expected
    # Large n: KIVI at b bits costs (b + 32/g)/16 of fp16 KV; MHA XQuant half that (+ the int64 position).
    r = memory_report(config, xcfg, 4096)
    assert r.ratio_to_fp16_limit(r.kivi_kv) == sympy.Rational(16, 4 + sympy.Rational(32, 64))
    assert float(r.ratio_to_fp16_limit(r.xquant)) == pytest.approx(
        (2 * layers * kv_dim * 2) / (layers * (256 * 4 / 8 + 4 * 256 / 64) + 8))
    assert memory_report(config, xq.XQuantConfig(bits=None), 10).kivi_kv is None


def test_smollm2_mha_numbers():
    """SmolLM2-135M as MHA (d = 576, 30 layers, 9 KV heads of 64): the README's headline numbers."""
    config = LlamaConfig(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=9,
                         head_dim=64)
    r = memory_report(config, xq.XQuantConfig(bits=4, group_size=64), 512)
    assert r.fp16_kv.per_token_at == 2 * 30 * 576 * 2
    assert r.xquant.per_token == 30 * (288 + 36) + 8
    assert 7.0 < r.ratio_to_fp16(r.xquant) < r.ratio_to_fp16_limit(r.xquant) < 7.11
    d = r.as_dict()
    assert set(d["caches"]) == {"fp16_kv", "kivi_kv", "xquant"}


def test_cross_layer_formula_counts_base_layers_and_the_accumulator():
    config = _config(kv_heads=8)
    cl = xq.XQuantConfig(bits=2, group_size=32, cross_layer=True, base_layers=2, base_bits=4)
    cache = xq.XQuantCache(config, max_batch_size=2, max_cache_len=24, xquant=cl)
    report = memory_report(config, cl, seq_len=24, batch=2)
    assert report.xquant.total_at == cache.nbytes()
    plain = memory_report(config, xq.XQuantConfig(bits=2, group_size=32), seq_len=24, batch=2)
    assert report.xquant.total_at > plain.xquant.total_at  # base layers cost 4 bits, not 2
    # the accumulator is working memory: one fp32 [batch, n, hidden] (plus one delta), whatever the depth
    assert report.rebuild_working_at == 2 * 4 * 2 * 24 * config.hidden_size
