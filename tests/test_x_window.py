"""The X window of sliding-window layers (forms/window.py XWindowForm, cache.XWindowLayer): the last
``sliding_window`` rows of X in a ring buffer, where they are smaller than the model's K/V window. MHA
models (X rows half the size of K/V rows even unquantized), a Qwen2 hybrid and a Mistral model whose every
layer slides; prompts shorter and longer than the window, then decode steps past twice the window."""

import pytest
import torch
import transformers as tf

import xq_compile as xq
from xq_compile.backend import collect_records
from xq_compile.cache import ModelWindowLayer, XQuantLayer, XWindowLayer
from xq_compile.simulate import simulate_xquant

from conftest import (compiled_run, decode_inputs, generates_as_transformers, max_error, random_model,
                      reference_logits, run_calls)

WINDOW = 8
CAPACITY = 40
COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4,
              max_position_embeddings=512)
FAMILIES = {
    "qwen2": lambda: tf.Qwen2Config(**COMMON, num_hidden_layers=4, use_sliding_window=True, sliding_window=WINDOW,
                                    layer_types=["sliding_attention", "full_attention"] * 2),
    "mistral": lambda: tf.MistralConfig(**COMMON, num_hidden_layers=2, sliding_window=WINDOW),  # every layer slides
}
LAYERS = {"qwen2": [XWindowLayer, XQuantLayer] * 2, "mistral": [XWindowLayer] * 2}
AOT_EAGER = xq.make_xquant_backend("aot_eager")


def build(family, config=None, seed=0):
    return random_model(config or FAMILIES[family](), "sdpa", seed)


def compiled(model, xquant, calls, backend=AOT_EAGER):
    return compiled_run(model, calls, xquant, backend, CAPACITY)


def x_window_text(bits_text, x_bytes, kv_bytes=256):
    return f"X window ({bits_text}, last {WINDOW} rows: {x_bytes} B/row, the model's fp16 K/V window {kv_bytes} B/row)"


@pytest.mark.parametrize("prompt", [6, 12])  # shorter and longer than the window
@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_unquantized_x_window_is_exact_past_the_window(family, prompt):
    model = build(family)
    calls = decode_inputs(prompt=prompt, steps=14)  # 20 or 26 tokens: past twice the window
    torch.compiler.reset()
    with collect_records() as records:
        out, cache = compiled(model, xq.XQuantConfig(bits=None, group_size=16), calls)
    reference = reference_logits(model, calls, CAPACITY)  # transformers' StaticCache: windows on sliding layers
    assert max_error(out, reference) < 1e-4
    assert [type(layer) for layer in cache.layers] == LAYERS[family]
    for record in records:
        assert [r.status for r in record.reports] == ["rewritten"] * len(LAYERS[family])
        assert record.reports[0].form == x_window_text("unquantized", 128)  # 64 x fp16 against 2 x 64 x fp16
    # the window matters: without it the same model differs
    if family == "mistral":
        model.config.sliding_window = None
    else:
        model.config.layer_types = ["full_attention"] * len(LAYERS[family])
    assert max_error(reference_logits(model, calls, CAPACITY), reference) > 1e-2


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_quantized_x_window_matches_the_simulation(family):
    model = build(family)
    calls = decode_inputs(prompt=12, steps=10)
    config = xq.XQuantConfig(bits=4, group_size=16)
    torch.compiler.reset()
    out, cache = compiled(model, config, calls)
    with simulate_xquant(model, config):
        simulated = reference_logits(model, calls, CAPACITY)
    assert max_error(out, simulated) < 2e-4 < 1e-2 < max_error(simulated, reference_logits(model, calls, CAPACITY))
    # the ring really holds packed 4-bit codes of its 8 rows: 64 channels -> 32 bytes a row
    assert cache.layers[0].state["codes"].shape == (2, WINDOW, 32)
    assert cache.layers[0].state["codes"].dtype == torch.uint8


@pytest.mark.parametrize("rebuild", ["op", "fused"])
def test_device_strategies_of_the_full_layers_read_the_length_the_window_emitted(rebuild):
    """What a CUDA device runs (forced on CPU): layer 0, an X window, is the graph's first site and emits the
    cached length, on the device; the full layers' rebuild reads it there."""
    model = build("qwen2")
    calls = decode_inputs(prompt=12, steps=6)
    config = xq.XQuantConfig(bits=4, group_size=16)
    torch.compiler.reset()
    out, _ = compiled(model, config, calls, backend=xq.make_xquant_backend("aot_eager", rebuild=rebuild))
    with simulate_xquant(model, config):
        simulated = reference_logits(model, calls, CAPACITY)
    assert max_error(out, simulated) < 2e-4


def test_inductor_x_window_matches_the_simulation():
    model = build("mistral")
    calls = decode_inputs(prompt=12, steps=2)  # a prefill past the window, then decode steps
    config = xq.XQuantConfig(bits=4, group_size=16)
    torch.compiler.reset()
    out, _ = compiled(model, config, calls, backend="xquant")
    with simulate_xquant(model, config):
        simulated = reference_logits(model, calls, CAPACITY)
    assert max_error(out, simulated) < 1e-3


def test_no_recompiles_as_the_window_moves():
    model = build("mistral")
    calls = decode_inputs(prompt=6, steps=24)
    cache = xq.XQuantCache(model.config, max_batch_size=2, max_cache_len=CAPACITY,
                           xquant=xq.XQuantConfig(bits=4, group_size=16))
    forward = torch.compile(model.forward, backend=AOT_EAGER, fullgraph=True)
    torch.compiler.reset()
    with collect_records() as filling:  # prefill, decode steps while the window fills, the first full one
        run_calls(forward, cache, calls[:6])
    with collect_records() as moving:  # 19 more steps: the window moves by 19 rows
        run_calls(forward, cache, calls[6:])
    assert len(filling) <= 4 and len(moving) == 0
    assert cache.layers[0].get_seq_length() == 30


@pytest.mark.parametrize("bits", [None, 4])
def test_bytes_stop_growing_at_the_window(bits):
    config = FAMILIES["mistral"]()
    xquant = xq.XQuantConfig(bits=bits, group_size=16)
    row = {None: 64 * 4, 4: 32 + 4 * 2 * 2}[bits]  # fp32 X, or 4-bit codes + fp16 scale/zero per 16 channels
    totals = {}
    for capacity in (4, WINDOW, CAPACITY, 200):
        cache = xq.XQuantCache(config, max_batch_size=2, max_cache_len=capacity, xquant=xquant)
        report = xq.memory_report(config, xquant, capacity, batch=2)
        assert cache.nbytes() == report.xquant.total_at
        state = sum(t.nbytes for layer in cache.layers for t in layer.state.values())
        assert state == 2 * 2 * row * min(capacity, WINDOW) == sum(r.total_at for r in report.xquant_layers)
        assert all(r.per_token == 0 for r in report.xquant_layers)
        totals[capacity] = cache.nbytes()
    # past the window only the shared int64 position of each row grows
    assert totals[200] - totals[CAPACITY] == 2 * 8 * (200 - CAPACITY)


def mqa_config():
    return tf.MistralConfig(**{**COMMON, "num_key_value_heads": 1}, num_hidden_layers=2, sliding_window=WINDOW)


def test_the_smaller_window_is_chosen():
    """MQA, one K/V head of 16: fp16 K+V rows are 64 B. 4-bit X rows (48 B) are smaller, 8-bit ones (80 B) not."""
    config = mqa_config()
    four = xq.XQuantCache(config, max_batch_size=1, max_cache_len=CAPACITY,
                          xquant=xq.XQuantConfig(bits=4, group_size=16))
    eight = xq.XQuantCache(config, max_batch_size=1, max_cache_len=CAPACITY,
                           xquant=xq.XQuantConfig(bits=8, group_size=16))
    assert [type(layer) for layer in four.layers] == [XWindowLayer] * 2
    assert four.layers[0].form.describe() == x_window_text("4-bit", 48, kv_bytes=64)
    assert [type(layer) for layer in eight.layers] == [ModelWindowLayer] * 2
    assert eight.layers[0].form.describe() == (f"sliding-window layer (window {WINDOW}): K/V kept in the model's own "
                                               "window cache (64 B/row in fp16, an X window 80 B/row)")


def test_every_layer_keeping_the_model_window_runs_exactly():
    model = build("mistral", mqa_config())
    calls = decode_inputs(prompt=12, steps=8)
    torch.compiler.reset()
    with collect_records() as records:
        out, cache = compiled(model, xq.XQuantConfig(bits=8, group_size=16), calls)
    assert max_error(out, reference_logits(model, calls, CAPACITY)) < 1e-4
    assert all(r.status == "kept" for record in records for r in record.reports)
    # compile_model too (its call checks have no X layer to ask)
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(3))
    expected = model.generate(ids, max_new_tokens=12, do_sample=False, cache_implementation="static",
                              disable_compile=True)
    xq.compile_model(model, xq.XQuantConfig(bits=8, group_size=16), max_cache_len=CAPACITY, backend=AOT_EAGER)
    assert torch.equal(model.generate(ids, max_new_tokens=12, do_sample=False), expected)


def test_an_x_window_and_a_model_window_share_the_models_sliding_mask():
    """transformers builds one sliding mask for all sliding layers: an X window returns its rows in the order
    of the model's window, so both read it right (MQA at layer_bits 4 and 8: one of each)."""
    model = build("mistral", mqa_config())
    calls = decode_inputs(prompt=12, steps=8)
    config = xq.XQuantConfig(bits=4, layer_bits=[4, 8], group_size=16)
    torch.compiler.reset()
    out, cache = compiled(model, config, calls)
    assert [type(layer) for layer in cache.layers] == [XWindowLayer, ModelWindowLayer]
    with simulate_xquant(model, config):
        simulated = reference_logits(model, calls, CAPACITY)
    assert max_error(out, simulated) < 2e-4 < 1e-2 < max_error(simulated, reference_logits(model, calls, CAPACITY))


def test_compile_model_generates_past_the_window_as_transformers_does():
    assert generates_as_transformers(build("mistral"), 18, CAPACITY, AOT_EAGER)  # 24 tokens, window 8
    assert xq.COMPILE_LOG[-1].rewritten == 2


def test_mask_sizes_are_transformers_own():
    from transformers.cache_utils import StaticSlidingWindowLayer

    from xq_compile.cache import sliding_mask_sizes

    for capacity in (4, WINDOW, CAPACITY):
        theirs = StaticSlidingWindowLayer(max_cache_len=capacity, sliding_window=WINDOW)
        for length in range(0, 2 * WINDOW + 2):
            for query_length in (1, 2, WINDOW - 1, WINDOW, WINDOW + 3):
                theirs.cumulative_length_int = length
                assert sliding_mask_sizes(length, min(capacity, WINDOW), query_length) == \
                    theirs.get_mask_sizes(query_length)


def test_crop_refuses_rows_the_ring_overwrote():
    cache = xq.XQuantCache(FAMILIES["mistral"](), max_batch_size=1, max_cache_len=CAPACITY,
                           xquant=xq.XQuantConfig(bits=4, group_size=16))
    layer = cache.layers[0]
    layer.host_length = layer.cumulative_length_int = 12  # as after 12 tokens: the ring holds rows 4..11
    layer.cumulative_length.fill_(12)
    layer.crop(11)  # a query at 11 attends to rows 4..11: all in the ring
    assert layer.get_seq_length() == 11 and int(layer.cumulative_length) == 11
    with pytest.raises(NotImplementedError, match="last 8 rows of X.*Reset the cache"):
        layer.crop(5)
