"""transformers caches that are not an XQuantCache: a StaticCache configured by torch.compile(options=...),
and DynamicCache, which is reported and left unmodified. (A model's own K/V buffers, gpt-fast style:
tests/test_gpt_fast.py.)"""

import pytest
import torch
from transformers import DynamicCache

import xq_compile as xq

from conftest import tiny_llama, decode_inputs, max_error, run_calls


def test_dynamic_cache_is_reported_and_runs_unmodified():
    model = tiny_llama(num_kv_heads=2)
    calls = decode_inputs(steps=2)
    forward = torch.compile(model.forward, backend=xq.make_xquant_backend("aot_eager"), fullgraph=True)
    with pytest.warns(UserWarning, match="grows by torch.cat every step"):
        out = run_calls(forward, DynamicCache(config=model.config), calls)
    expected = run_calls(model.forward, DynamicCache(config=model.config), calls)
    assert max_error(out, expected) < 1e-5


def test_static_cache_with_options_is_rewritten_and_exact():
    from transformers import StaticCache

    from conftest import reference_logits

    model = tiny_llama(num_kv_heads=2)
    calls = decode_inputs(steps=3)
    cache = StaticCache(config=model.config, max_cache_len=32)
    cache.early_initialization(2, 2, 16, torch.float32, torch.device("cpu"))  # allocated before compiling
    forward = torch.compile(model.forward, backend="xquant", options={"bits": None, "group_size": 16}, fullgraph=True)
    out = run_calls(forward, cache, calls)
    assert max_error(out, reference_logits(model, calls, 32)) < 1e-4
    assert xq.COMPILE_LOG[-1].rewritten == 2
