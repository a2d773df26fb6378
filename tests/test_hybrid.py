"""Hybrid models: full-attention layers get the XQuant form; sliding-window layers keep an X window where its
rows are smaller (4-bit here), else the model's own K/V window (transformers' static sliding-window layer,
exact: unquantized here, where X and K/V rows of these GQA models are the same size). Sequences run past
the window. The X window's own tests (MHA, every layer sliding) are in test_x_window.py."""

import pytest
import torch
import transformers as tf

import xq_compile as xq
from xq_compile.backend import collect_records
from xq_compile.cache import ModelWindowLayer, XQuantLayer, XWindowLayer

from conftest import (compiled_run, decode_inputs, errors_against_simulation, generates_as_transformers, max_error,
                      random_model, reference_logits, run_calls)

WINDOW = 8
CAPACITY = 32
COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512)
ALTERNATING = ["sliding_attention", "full_attention"] * 2
FAMILIES = {
    "qwen2": lambda: tf.Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=WINDOW, layer_types=ALTERNATING),
    "gemma2": lambda: tf.Gemma2Config(**COMMON, head_dim=16, sliding_window=WINDOW, layer_types=ALTERNATING),
}
AOT_EAGER = xq.make_xquant_backend("aot_eager")
KEPT = (f"sliding-window layer (window {WINDOW}): K/V kept in the model's own window cache (128 B/row in fp16, "
        "an X window 128 B/row)")


def build(family, seed=0):
    return random_model(FAMILIES[family](), "eager" if family == "gemma2" else "sdpa", seed)


def compiled(model, xquant, calls, backend=AOT_EAGER):
    return compiled_run(model, calls, xquant, backend, CAPACITY)


@pytest.mark.parametrize("family", ["qwen2", "gemma2"])
def test_unquantized_hybrid_is_exact_past_the_window(family):
    model = build(family)
    calls = decode_inputs(steps=12)  # 6-token prompt + 12 decode steps: 18 tokens > window 8
    torch.compiler.reset()
    with collect_records() as records:
        out, cache = compiled(model, xq.XQuantConfig(bits=None, group_size=16), calls)
    reference = reference_logits(model, calls, CAPACITY)  # transformers' StaticCache: windows on sliding layers
    assert max_error(out, reference) < 1e-4
    # the window matters: the same model with every layer attending to everything differs
    model.config.layer_types = ["full_attention"] * 4
    assert max_error(reference_logits(model, calls, CAPACITY), reference) > 1e-2
    assert [type(layer) for layer in cache.layers] == [ModelWindowLayer, XQuantLayer] * 2
    for record in records:  # prefill, decode before and after the window fills: every layer reported
        assert [(r.layer, r.status) for r in record.reports] == [
            (0, "kept"), (1, "rewritten"), (2, "kept"), (3, "rewritten")]
        assert {r.reason for r in record.reports if r.status == "kept"} == {KEPT}
        assert record.skipped == 0
    assert int(cache.layers[0].cumulative_length_int) == 18


@pytest.mark.parametrize("family", ["qwen2", "gemma2"])
def test_quantized_hybrid_matches_the_simulation(family):
    error, quantization, cache = errors_against_simulation(build(family), decode_inputs(steps=12),
                                                           xq.XQuantConfig(bits=4, group_size=16), AOT_EAGER, CAPACITY)
    assert error < 2e-4 < quantization
    # 4-bit X rows (48 B) are smaller than fp16 K/V rows (2 x 32 x 2 B): the sliding layers keep an X window
    assert [type(layer) for layer in cache.layers] == [XWindowLayer, XQuantLayer] * 2


def test_memory_counts_the_window_exactly():
    config = FAMILIES["qwen2"]()
    for bits, capacity in ((None, 4), (4, 4), (4, 32), (2, 200)):
        xquant = xq.XQuantConfig(bits=bits, group_size=16)
        cache = xq.XQuantCache(config, max_batch_size=2, max_cache_len=capacity, xquant=xquant)
        report = xq.memory_report(config, xquant, capacity, batch=2)
        assert cache.nbytes() == report.xquant.total_at
        # the two sliding layers, min(capacity, window) rows of 2 sequences: unquantized the model's K and V
        # (2 heads x 16, fp32); quantized an X window (64 channels: codes + fp16 scale/zero per 16)
        row = {None: 2 * 2 * 16 * 4, 4: 32 + 4 * 2 * 2, 2: 16 + 4 * 2 * 2}[bits]
        window = sum(t.nbytes for layer in cache.layers[::2] for t in layer.state.values())
        assert window == 2 * 2 * row * min(capacity, WINDOW)
        assert sum(report.xquant_layers[i].total_at for i in (0, 2)) == window
        # fp16 K/V as the model's own cache holds it: full layers n rows, sliding layers their window
        fp16 = 2 * (2 * 2 * 32 * 2) * (capacity + min(capacity, WINDOW))
        assert report.fp16_kv.total_at == xq.fp16_kv_cache_bytes(config, 2, capacity) == fp16
    # past the window, a token costs only the full layers' X state (+ its position)
    assert report.xquant_layers[0].per_token == 0 and report.xquant_layers[1].per_token > 0


def test_refusals_name_the_fix():
    config = FAMILIES["qwen2"]()
    with pytest.raises(ValueError, match="cross_layer=False"):
        xq.XQuantCache(config, max_batch_size=1, max_cache_len=16, xquant=xq.XQuantConfig(cross_layer=True,
                                                                                            group_size=16))


def test_explain_counts_the_window_layers_as_allocated():
    model = build("qwen2")
    prompt = decode_inputs(batch=2, steps=0)[0]
    config = xq.XQuantConfig(bits=4, group_size=16)
    e = xq.explain(model, prompt, xquant=config, max_cache_len=CAPACITY, decode_steps=0)
    assert [(r.layer, r.status) for r in e.layers] == [(i, "rewritten") for i in range(4)]
    report = xq.memory_report(model.config, config, CAPACITY, batch=2)
    # measured: everything the cache allocated, the two X windows included
    measured = e.cache.nbytes() / (2 * CAPACITY)
    assert e.bytes_per_token == (report.fp16_kv.per_token_at, measured) and measured == report.xquant.per_token_at
    # fp16 K+V per token: full layers 2 x 2 heads x 16 x 2 bytes = 128, sliding layers 128 x 8 / 32 rows
    assert [r.kv_bytes_per_token for r in e.layers] == [32, 128, 32, 128]
    # X: 48 B a row (4-bit codes + fp16 scale/zero per 16), the window's 8 rows only on the sliding layers
    window = 48 * WINDOW / CAPACITY
    assert [r.x_bytes_per_token for r in e.layers] == [window, 48, window, 48]
    # as n grows only the full layers' X and the position count
    assert e.bytes_per_token_limit == (256, 8 + 2 * 48)
    text = e.report()
    assert "X window (4-bit, last 8 rows: 48 B/row, the model's fp16 K/V window 128 B/row)" in text
    assert "4/4 layers rewritten" in text
    assert [n for n, _, _ in e.ratio_by_capacity()][0] == CAPACITY


def test_explain_counts_the_model_windows_as_allocated():
    model = build("qwen2")
    prompt = decode_inputs(batch=2, steps=0)[0]
    config = xq.XQuantConfig(bits=None, group_size=16)  # X rows (64 x 2 B) no smaller than K/V rows: kept
    e = xq.explain(model, prompt, xquant=config, max_cache_len=CAPACITY, decode_steps=0)
    assert [(r.layer, r.status) for r in e.layers] == [(0, "kept"), (1, "rewritten"), (2, "kept"), (3, "rewritten")]
    report = xq.memory_report(model.config, config, CAPACITY, batch=2)
    measured = e.cache.nbytes() / (2 * CAPACITY)
    assert e.bytes_per_token == (report.fp16_kv.per_token_at, measured) and measured == report.xquant.per_token_at
    window = 2 * 2 * 16 * 4 * WINDOW / CAPACITY  # fp32 K and V of the window, per token of one sequence
    assert [r.x_bytes_per_token for r in e.layers] == [window, 64 * 4, window, 64 * 4]
    text = e.report()
    # the window is in the cache dtype (the model's: fp32 here), the fp16 column in fp16
    assert f"| 0 | kept | {KEPT} | 32 | 64 | 0.50x | 0 | - |" in text
    assert "2/4 layers rewritten, 2 kept as the model's own K/V window" in text


def test_static_cache_with_options_keeps_the_sliding_windows():
    """options= mode has no XQuantCache to say which layers slide: transformers' StaticCache gives a sliding
    layer a shorter buffer (the window) than the full layers, and the pass leaves those as they are."""
    from transformers import StaticCache

    model = build("qwen2")
    calls = decode_inputs(steps=12)
    cache = StaticCache(config=model.config, max_cache_len=CAPACITY)
    cache.early_initialization(2, 2, 16, torch.float32, torch.device("cpu"))  # allocated before compiling
    torch.compiler.reset()
    forward = torch.compile(model.forward, backend=AOT_EAGER, options={"bits": None, "group_size": 16},
                            fullgraph=True)
    with collect_records() as records:
        out = run_calls(forward, cache, calls)
    assert max_error(out, reference_logits(model, calls, CAPACITY)) < 1e-4
    assert len(records) >= 3  # prefill, decode, decode once the window is full (it rolls)
    for record in records:
        assert [(r.layer, r.status) for r in record.reports] == [
            (0, "kept"), (1, "rewritten"), (2, "kept"), (3, "rewritten")]
        assert "holds 8 rows, the full layers' 32" in record.reports[0].reason
    # the full layers' K/V were never written (their X state was); the windows were, by the model's code
    assert cache.layers[1].keys.count_nonzero() == 0 and cache.layers[0].keys.count_nonzero() > 0


def test_window_layers_reorder_in_place():
    cache = xq.XQuantCache(FAMILIES["qwen2"](), max_batch_size=2, max_cache_len=CAPACITY,
                           xquant=xq.XQuantConfig(bits=None, group_size=16))  # unquantized: the model's window
    window = cache.layers[0]
    keys = window.keys
    keys[1].fill_(1.0)
    cache.reorder_cache(torch.tensor([1, 0]))
    assert window.keys is keys and keys[0].eq(1).all() and keys[1].eq(0).all()
    assert xq.cache.window_layer_of(keys) is window


def test_compile_model_generates_past_the_window_as_transformers_does():
    assert generates_as_transformers(build("qwen2"), 14, CAPACITY, AOT_EAGER)  # 20 tokens, window 8
    assert xq.COMPILE_LOG[-1].kept == 2 and xq.COMPILE_LOG[-1].rewritten == 2
