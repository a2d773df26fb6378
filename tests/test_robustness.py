"""Unsupported inputs fail with a message that says what to do, or run unmodified -- never silently wrong.

(Already covered elsewhere: bf16 model with a float32 cache and overflow of direct forward calls in
test_cache.py; a graph break under XQuant-CL in test_cross_layer.py.)
"""

import warnings

import pytest
import torch
from transformers import StaticCache

import xq_compile as xq

from conftest import decode_inputs, max_error, reference_logits, run_calls, tiny_llama
from xq_compile.cache import cache_kwargs

AOT_EAGER = xq.make_xquant_backend("aot_eager")


def test_model_without_attention_runs_unmodified_and_reports_no_sites():
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4)).eval()
    x = torch.randn(3, 16)
    counters = torch._dynamo.utils.counters
    counters.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = torch.compile(mlp, backend="xquant", fullgraph=True)(x)  # the real backend, Inductor inside
    assert not [w for w in caught if "xquant" in str(w.message)]  # nothing skipped: nothing to rewrite
    torch.testing.assert_close(out, mlp(x))
    record = xq.COMPILE_LOG[-1]
    assert record.reports == [] and "no attention K/V cache write found" in record.summary()
    assert counters["xquant"]["graphs"] == 1 and counters["xquant"]["sites_rewritten"] == 0
    torch._dynamo.reset()
    e = xq.explain(mlp, (x,))
    assert e.layers == [] and "no attention sites" in str(e)
    torch.testing.assert_close(e.logits[0], mlp(x))


def test_float64_model_with_a_float32_cache_says_which_dtype_to_use():
    model = tiny_llama(num_kv_heads=2, dtype=torch.float64)
    calls = decode_inputs(steps=3)
    forward = torch.compile(model.forward, backend=AOT_EAGER, fullgraph=True)
    wrong = xq.XQuantCache(model.config, max_batch_size=2, max_cache_len=16, xquant=xq.XQuantConfig(group_size=16))
    with pytest.raises(Exception, match=r"create the cache with dtype=torch.float64"):
        run_calls(forward, wrong, calls)
    assert all(t.count_nonzero() == 0 for t in wrong.layers[0].state.values()) and wrong.layers[0].host_length == 0
    # doing what the message says works, and reproduces the model exactly (unquantized X)
    torch._dynamo.reset()
    right = xq.XQuantCache(model.config, max_batch_size=2, max_cache_len=16, dtype=torch.float64,
                           xquant=xq.XQuantConfig(bits=None, group_size=16))
    out = run_calls(torch.compile(model.forward, backend=AOT_EAGER, fullgraph=True), right, calls)
    # (1e-6, not float64 round-off: the cache's Hadamard rotation matrix is stored in float32)
    assert max_error(out, reference_logits(model, calls, 16)) < 1e-6


def test_generate_past_max_cache_len_raises_before_writing():
    model = tiny_llama(num_kv_heads=2)
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(3))
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = model.generate(**kwargs, max_new_tokens=4)
    cache = xq.XQuantCache(model.config, max_batch_size=2, max_cache_len=8,
                           xquant=xq.XQuantConfig(bits=None, group_size=16))
    model.forward = torch.compile(model.forward, backend=AOT_EAGER, fullgraph=True)
    with torch.no_grad(), pytest.raises(ValueError, match="1 more do not fit in max_cache_len=8"):
        model.generate(**kwargs, max_new_tokens=10, **cache_kwargs(model, cache), disable_compile=True)
    # refused before the 9th row was written: the cache holds exactly what fits, and stays usable
    assert all(layer.host_length == 8 and int(layer.cumulative_length) == 8 for layer in cache.layers)
    cache.reset()
    with torch.no_grad():
        got = model.generate(**kwargs, max_new_tokens=4, **cache_kwargs(model, cache), disable_compile=True)
    assert torch.equal(got, expected)


def break_inside(model, where: str):
    """A graph break at the start of decoder layer 1 (or of its attention), as a user hook might cause."""
    layer = model.model.layers[1]
    (layer if where == "decoder layer" else layer.self_attn).register_forward_pre_hook(
        lambda module, args: torch._dynamo.graph_break())


@pytest.mark.parametrize("where", ["decoder layer", "attention"])
def test_graph_break_with_a_static_cache_keeps_the_model_exact(where):
    model = tiny_llama(num_kv_heads=2, num_layers=3)
    break_inside(model, where)
    calls = decode_inputs(steps=3)
    forward = torch.compile(model.forward, backend=AOT_EAGER)  # fullgraph=False: Dynamo splits the graph
    cache = StaticCache(config=model.config, max_cache_len=16)
    with pytest.warns(UserWarning, match="skipped"):
        out = run_calls(forward, cache, calls)
    assert max_error(out, reference_logits(model, calls, 16)) < 1e-5
    assert all(r.status == "skipped" for r in xq.COMPILE_LOG[-1].reports)


@pytest.mark.parametrize("where", ["decoder layer", "attention"])
def test_graph_break_with_an_xquant_cache_says_to_compile_with_fullgraph(where):
    model = tiny_llama(num_kv_heads=2, num_layers=3)
    break_inside(model, where)
    cache = xq.XQuantCache(model.config, max_batch_size=2, max_cache_len=16, xquant=xq.XQuantConfig(group_size=16))
    forward = torch.compile(model.forward, backend=AOT_EAGER)
    with pytest.raises(Exception, match=r"split by a graph break; compile with fullgraph=True"):
        run_calls(forward, cache, decode_inputs(steps=0))
    # and fullgraph=True itself names the break instead of compiling a wrong split
    torch._dynamo.reset()
    with pytest.raises(Exception, match="graph_break"):
        run_calls(torch.compile(model.forward, backend=AOT_EAGER, fullgraph=True), cache, decode_inputs(steps=0))
