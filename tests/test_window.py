"""Full-precision recent and sink rows (XQuantConfig(recent=R, sink=S)): exact where they should be,
quantized once they leave the window, static shapes, exact crops, and bytes as the spec counts them."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import xq_compile as xq
from xq_compile.backend import collect_records
from xq_compile.memory import memory_report
from xq_compile.simulate import simulate_xquant

from conftest import compiled_run, decode_inputs, max_error, prefix_reference, reference_logits, run_calls, tiny_llama

EAGER = "aot_eager"
R, S = 4, 2


def history_free_model(num_kv_heads: int = 4, layers: int = 2) -> torch.nn.Module:
    """Layer 0's attention output zeroed: every layer's X depends on its token only, not on what the
    attention saw when that token was decoded. Then one eager pass over a prefix under the simulation
    is the exact reference of the compiled decode step ending there, rows leaving the window included."""
    model = tiny_llama(num_kv_heads=num_kv_heads, num_layers=layers)
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight.zero_()
    return model


CONFIGS = {  # name: (K/V heads of the tiny model (hidden 64, head dim 16), config, (window streams, width))
    "x": (4, xq.XQuantConfig(bits=2, group_size=16, recent=R, sink=S), (1, 64)),
    "x-cross-layer": (4, xq.XQuantConfig(bits=2, group_size=16, recent=R, sink=S, cross_layer=True, base_layers=1),
                      (1, 64)),
    "latent": (1, xq.XQuantConfig(bits=2, group_size=16, recent=R, sink=S), (2, 16)),  # key and value latents
    "joint-latent": (1, xq.XQuantConfig(bits=2, group_size=16, recent=R, sink=S, cross_layer=True, base_layers=1),
                     (1, 32)),  # K|V joint latent
}


def without_window(config):
    return dataclasses.replace(config, recent=0, sink=0)


@pytest.mark.parametrize("name", CONFIGS)
def test_decode_matches_the_reference_as_rows_leave_the_window(name):
    kv_heads, config, _ = CONFIGS[name]
    model, calls = history_free_model(kv_heads), decode_inputs(batch=2, prompt=6, steps=12)  # 18 rows > R + S
    with collect_records() as records:
        out, cache = compiled_run(model, calls, config, backend=xq.make_xquant_backend(EAGER))
    assert cache.layers[1].form.window is not None
    assert max_error(out, prefix_reference(model, calls, config)) < 2e-5
    # static shapes: one prefill graph and one decode graph for all the window's moves
    assert len(records) == 2 and all(r.rewritten == 2 for r in records)
    # the exact rows matter: without them the same decode is further from the unquantized model
    exact = reference_logits(model, calls, 32)
    without = compiled_run(model, calls, without_window(config), backend=xq.make_xquant_backend(EAGER))[0]
    assert max_error(out, exact) < 0.7 * max_error(without, exact)


@pytest.mark.parametrize("name", ["x", "latent"])
def test_device_length_strategies_fall_back_from_the_code_reading_ops(name):
    """rebuild="fused" (the CUDA default, forced here on CPU): the length stays on device, the rows are
    rebuilt over the whole capacity, and the fused attention and dequant_project ops, which read codes
    only, are not used for a layer with a window: the same logits as the plain rebuild."""
    kv_heads, config, _ = CONFIGS[name]
    model, calls = history_free_model(kv_heads), decode_inputs(batch=2, prompt=6, steps=12)
    with collect_records() as records:
        out, _ = compiled_run(model, calls, config, backend=xq.make_xquant_backend(EAGER, rebuild="fused"))
    assert max_error(out, prefix_reference(model, calls, config)) < 2e-5
    code = records[-1].code_after
    assert "decode_attention" not in code and "dequant_project" not in code


def test_a_long_prefill_keeps_only_its_last_rows_and_its_first_exact():
    """One call of 20 rows (> R + S): the ring takes the call's last R rows only; the simulation of
    that call (the eval's one-pass mode) is what the compiled rebuild gives."""
    model, calls = tiny_llama(), decode_inputs(batch=2, prompt=20, steps=2)
    config = CONFIGS["x"][1]
    out, cache = compiled_run(model, calls[:1], config, backend=xq.make_xquant_backend(EAGER))
    with simulate_xquant(model, config):
        assert max_error(out, reference_logits(model, calls[:1], 32)) < 2e-5
    rows = cache.layers[0].state["x_recent_rows"]
    assert rows[0].tolist() == [16, 17, 18, 19]  # row p at slot p % R
    # the window's copies hold the rotated X of those rows as the unquantized cache would, in fp16 for
    # this fp32 model (as the fp16 K/V cache the ratios count against)
    plain = compiled_run(model, calls[:1], xq.XQuantConfig(bits=None, group_size=16),
                         backend=xq.make_xquant_backend(EAGER))[1]
    assert cache.layers[0].state["x_recent"].dtype == torch.float16
    assert torch.equal(cache.layers[0].state["x_recent"], plain.layers[0].state["x"][:, 16:20].half())
    assert torch.equal(cache.layers[0].state["x_sink"], plain.layers[0].state["x"][:, :2].half())


def test_unquantized_parity_is_unchanged_and_a_window_without_bits_is_refused():
    model, calls = tiny_llama(), decode_inputs(steps=4)
    out, _ = compiled_run(model, calls, xq.XQuantConfig(bits=None), backend=xq.make_xquant_backend(EAGER))
    assert max_error(out, reference_logits(model, calls, 32)) < 1e-4
    with pytest.raises(ValueError, match="with bits=None every row is exact already"):
        xq.XQuantConfig(bits=None, recent=4)


@pytest.mark.parametrize("kwargs,message", [
    (dict(recent=-1), "recent must be an integer >= 0"),
    (dict(sink=-2), "sink must be an integer >= 0"),
    (dict(recent=2.5), "recent must be an integer >= 0"),
])
def test_bad_window_settings_say_what_to_do(kwargs, message):
    with pytest.raises(ValueError, match=message):
        xq.XQuantConfig(bits=2, **kwargs)


def test_a_window_as_large_as_the_cache_is_refused():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"recent=30 \+ sink=2 rows kept exact >= max_cache_len=32"):
        xq.XQuantCache(model.config, max_batch_size=1, max_cache_len=32, xquant=xq.XQuantConfig(recent=30, sink=2))


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bytes_are_the_specs_to_the_byte(name, dtype):
    kv_heads, config, (streams, width) = CONFIGS[name]
    model = tiny_llama(num_kv_heads=kv_heads)
    cache = xq.XQuantCache(model.config, max_batch_size=3, max_cache_len=40, xquant=config, dtype=dtype)
    dtype_bytes = torch.finfo(dtype).bits // 8
    assert cache.nbytes() == memory_report(model.config, config, 40, 3, dtype_bytes=dtype_bytes).xquant.total_at
    # the window adds per layer and stream R + S 16-bit rows (fp16 for an fp32 cache) and R int32 slot indices
    plain = xq.XQuantCache(model.config, max_batch_size=3, max_cache_len=40, xquant=without_window(config),
                           dtype=dtype)
    layers, batch = 2, 3
    added = layers * batch * streams * ((R + S) * width * 2 + R * 4)
    assert cache.nbytes() - plain.nbytes() == added
    # the per-token rate (what the ratio to fp16 K/V tends to) does not grow: the window is fixed
    assert (memory_report(model.config, config, 40).xquant.per_token
            == memory_report(model.config, without_window(config), 40).xquant.per_token)


def test_crop_drops_the_removed_rows_from_the_window():
    """A crop back into the window: slots that held removed rows are invalidated; the rows they had
    replaced fall back to their codes; once the removed steps are redone all is as before."""
    model, calls = history_free_model(), decode_inputs(batch=2, prompt=6, steps=10)
    config = CONFIGS["x"][1]
    cache = xq.XQuantCache(model.config, max_batch_size=2, max_cache_len=32, xquant=config)
    forward = torch.compile(model.forward, backend=xq.make_xquant_backend(EAGER), fullgraph=True)
    first = run_calls(forward, cache, calls)
    cache.crop(-3)  # 16 rows -> 13
    for layer in cache.layers:
        assert (layer.state["x_recent_rows"] < 13).all()
        assert sorted(layer.state["x_recent_rows"][0].tolist()) == [-1, -1, -1, 12]
    redo = run_calls(forward, cache, calls[-3:])
    # the last redone step's window is rows 12..15, all rewritten: as in the first run
    assert max_error(first[-1:], redo[-1:]) < 1e-6
    # the first redone step reads rows 10, 11 from their codes (their exact copies were overwritten)
    assert max_error(first[-3:-2], redo[:1]) > 1e-4
