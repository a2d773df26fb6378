"""The usual mistakes of a new user end in an error that names the cause and the fix, as the user sees it
(the exception type and its exact text, not wrapped by Dynamo or Inductor), raised before anything is
written; transformers' cache conventions hold; xq.compile_model is the one-call form."""

import pytest
import torch
from transformers import StaticCache

import xq_compile as xq
from xq_compile.cache import cache_kwargs

from conftest import decode_inputs, reference_logits, run_calls, tiny_llama

AOT_EAGER = xq.make_xquant_backend("aot_eager")
UNQUANTIZED = xq.XQuantConfig(bits=None, group_size=16)


def prompt(batch=2, length=5, seed=3):
    ids = torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids))


def explicit(model, cache, backend="xquant", **kwargs):
    """The explicit form, as the README writes it."""
    model.forward = torch.compile(model.forward, backend=backend, fullgraph=True)
    with torch.no_grad():
        return model.generate(**kwargs, **cache_kwargs(model, cache), disable_compile=True, pad_token_id=0)


def untouched(cache) -> bool:
    return all(layer.host_length == 0 and all(t.count_nonzero() == 0 for t in layer.state.values())
               for layer in cache.layers)


def test_prompt_longer_than_the_cache_is_refused_before_inductor():
    model = tiny_llama(num_kv_heads=2)
    cache = xq.XQuantCache(model.config, max_batch_size=2, max_cache_len=4, xquant=xq.XQuantConfig(group_size=16))
    with pytest.raises(ValueError) as caught:
        explicit(model, cache, **prompt(), max_new_tokens=2)  # the real backend: Inductor inside
    assert str(caught.value) == (
        "XQuantCache overflow: a call with 5 new tokens does not fit in max_cache_len=4. Create the cache with "
        "max_cache_len >= the prompt length + max_new_tokens.")
    assert untouched(cache)


def test_cache_dtype_other_than_the_models_says_which_to_use():
    model = tiny_llama(num_kv_heads=2)
    cache = xq.XQuantCache(model.config, max_batch_size=2, max_cache_len=16, xquant=xq.XQuantConfig(group_size=16),
                           dtype=torch.bfloat16)
    with pytest.raises(TypeError) as caught:
        explicit(model, cache, **prompt(), max_new_tokens=2)
    assert str(caught.value) == (
        "XQuantCache was created with dtype=torch.bfloat16, device=cpu, but layer 0 runs in dtype=torch.float32 "
        "on cpu: create the cache with dtype=torch.float32, device='cpu' (the model's).")
    assert untouched(cache)


def test_beam_search_needs_batch_times_beams_rows_and_then_matches_transformers():
    model, reference = tiny_llama(num_kv_heads=2), tiny_llama(num_kv_heads=2)
    one_row = xq.XQuantCache(model.config, max_batch_size=1, max_cache_len=16, xquant=UNQUANTIZED)
    with pytest.raises(ValueError) as caught:
        explicit(model, one_row, AOT_EAGER, **prompt(batch=1), num_beams=2, max_new_tokens=3)
    assert str(caught.value) == (
        "XQuantCache was created with max_batch_size=1, but this call has 2 rows, and its rows are fixed, as in "
        "transformers' StaticCache. generate() runs batch x num_beams x num_return_sequences rows, so "
        "max_batch_size must be at least batch x num_beams: create the cache with max_batch_size=2.")
    assert untouched(one_row)
    # with batch x num_beams rows, beam search (reorder_cache every step) gives transformers' beams
    torch._dynamo.reset()
    model = tiny_llama(num_kv_heads=2)
    two_rows = xq.XQuantCache(model.config, max_batch_size=2, max_cache_len=16, xquant=UNQUANTIZED)
    got = explicit(model, two_rows, AOT_EAGER, **prompt(batch=1), num_beams=2, max_new_tokens=6)
    with torch.no_grad():
        expected = reference.generate(**prompt(batch=1), num_beams=2, max_new_tokens=6, pad_token_id=0)
    assert torch.equal(got, expected)


def test_crop_keeps_a_positive_count_and_removes_a_negative_one():
    model = tiny_llama(num_kv_heads=2)
    cache = xq.XQuantCache(model.config, max_batch_size=2, max_cache_len=16, xquant=UNQUANTIZED)
    forward = torch.compile(model.forward, backend=AOT_EAGER, fullgraph=True)
    calls = decode_inputs(prompt=6, steps=4)  # 10 tokens
    first = run_calls(forward, cache, calls)
    cache.crop(12)  # more than it holds: nothing to drop (transformers: crop(max_length) keeps max_length)
    assert int(cache.get_seq_length()) == 10
    cache.crop(8)  # keep the prompt and the first two steps, then redo the last two
    assert int(cache.get_seq_length()) == 8 and cache.layers[1].host_length == 8
    redo = run_calls(forward, cache, calls[3:])
    torch.testing.assert_close(redo, first[3:], atol=1e-6, rtol=0)
    cache.crop(-3)  # negative: remove that many
    assert int(cache.get_seq_length()) == 7
    cache.crop(0)  # transformers' generate calls crop(0): no change
    assert int(cache.get_seq_length()) == 7


def test_options_with_a_lazily_allocated_static_cache_raise_instead_of_running_full_kv():
    model = tiny_llama(num_kv_heads=2)
    cache = StaticCache(config=model.config, max_cache_len=16)  # the usual way: allocated on first use
    compiled = torch.compile(model, backend="xquant", options={"bits": 4, "group_size": 16}, fullgraph=True)
    with torch.no_grad(), pytest.raises(ValueError) as caught:
        compiled(input_ids=prompt()["input_ids"], **cache_kwargs(model, cache), use_cache=True)
    message = str(caught.value)
    assert message.startswith(
        "xquant was asked for XQuant 4-bit g16, rotation=hadamard (options=), but none of this graph's 2 attention sites "
        "could be rewritten, so the model would run with its full K/V cache:\n  layer 0: skipped: the K/V cache "
        "tensors are not graph inputs")
    assert "cache.early_initialization(batch_size=..., num_heads=config.num_key_value_heads" in message
    assert int(cache.get_seq_length()) == 0  # nothing ran: not even the allocation


def test_generate_of_a_torch_compiled_module_says_it_runs_uncompiled():
    model = tiny_llama(num_kv_heads=2)
    cache = xq.XQuantCache(model.config, max_batch_size=2, max_cache_len=16, xquant=UNQUANTIZED)
    compiled = torch.compile(model, backend=AOT_EAGER, fullgraph=True)
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"cm.generate\(\) runs the original, uncompiled model; "
                                                            r"use model.compile\(backend='xquant'"):
        compiled.generate(**prompt(), **cache_kwargs(model, cache), max_new_tokens=2, disable_compile=True)
    # doing what it says works
    model.compile(backend=AOT_EAGER, fullgraph=True)
    reference = tiny_llama(num_kv_heads=2)
    with torch.no_grad():
        got = model.generate(**prompt(), **cache_kwargs(model, cache), max_new_tokens=4, disable_compile=True,
                             pad_token_id=0)
        expected = reference.generate(**prompt(), max_new_tokens=4, pad_token_id=0)
    assert torch.equal(got, expected)


# -- xq.compile_model: the one-call form ---------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compile_model_generate_with_its_defaults_is_the_unmodified_model(dtype):
    model, reference = tiny_llama(num_kv_heads=2, dtype=dtype), tiny_llama(num_kv_heads=2, dtype=dtype)
    xq.compile_model(model, UNQUANTIZED, max_cache_len=32, max_batch_size=2, backend=AOT_EAGER)
    assert model.xquant_cache.dtype == dtype
    with torch.no_grad():
        expected = reference.generate(**prompt(), pad_token_id=0)  # generate's defaults: max_length 20, greedy
        got = model.generate(**prompt(), pad_token_id=0)
        again = model.generate(**prompt(seed=7, length=3), pad_token_id=0)  # an unrelated prompt: a fresh cache
        expected_again = reference.generate(**prompt(seed=7, length=3), pad_token_id=0)
    assert torch.equal(got, expected)
    # bf16: K rebuilt from the cached X by a matmul over all cached rows rounds differently from the
    # model's per-call projection, so a near tie late in a greedy run may flip; fp32 is exact throughout
    agree = again.shape[1] if dtype == torch.float32 else 3 + 8
    assert again.shape == expected_again.shape and torch.equal(again[:, :agree], expected_again[:, :agree])
    # generate's default: 20 new tokens after the 3-token prompt; the last one is returned, never cached
    assert model.xquant_cache.layers[0].host_length == again.shape[1] - 1 == 22


def test_compile_model_refuses_before_the_first_token_and_sizes_rows_per_call():
    model, reference = tiny_llama(num_kv_heads=2), tiny_llama(num_kv_heads=2)
    xq.compile_model(model, UNQUANTIZED, max_cache_len=16, max_batch_size=2, backend=AOT_EAGER)
    records = len(xq.COMPILE_LOG)
    with torch.no_grad():
        with pytest.raises(ValueError) as too_long:
            model.generate(**prompt(), max_new_tokens=20, pad_token_id=0)
        with pytest.raises(ValueError) as too_wide:
            model.generate(**prompt(), num_beams=2, max_new_tokens=3, pad_token_id=0)
    assert str(too_long.value) == (
        "generate() would cache 24 tokens (prompt 5 + max_new_tokens 20 - 1) but the XQuantCache has "
        "max_cache_len=16: lower max_new_tokens, or call xq.compile_model(..., max_cache_len=24).")
    assert str(too_wide.value).startswith("generate() needs 4 cache rows (batch 2 x num_beams 2")
    assert len(xq.COMPILE_LOG) == records and untouched(model.xquant_cache)  # nothing compiled, nothing written
    with torch.no_grad():  # one row: a cache sized for it
        got = model.generate(**prompt(batch=1), max_new_tokens=4, pad_token_id=0)
        expected = reference.generate(**prompt(batch=1), max_new_tokens=4, pad_token_id=0)
    assert torch.equal(got, expected) and model.xquant_cache.max_batch_size == 1


def test_compile_model_checks_direct_calls_before_dynamo():
    model = tiny_llama(num_kv_heads=2)
    xq.compile_model(model, UNQUANTIZED, max_cache_len=8, max_batch_size=2, backend=AOT_EAGER)
    cache = model.xquant_cache
    with torch.no_grad():
        model(**prompt(length=6), **cache_kwargs(model, cache))
        with pytest.raises(ValueError, match=r"it holds 6 tokens and 3 more do not fit in max_cache_len=8"):
            model(**prompt(length=3), **cache_kwargs(model, cache))
        with pytest.raises(ValueError, match=r"no new tokens for the XQuantCache, which holds 6"):
            model(input_ids=prompt()["input_ids"][:, :0], **cache_kwargs(model, cache))
    assert cache.layers[0].host_length == 6


def test_compile_model_many_configurations_on_one_model_in_one_process():
    """A notebook trying configurations on one model object: more graphs than Dynamo's default limit (8)."""
    model = tiny_llama(num_kv_heads=2)
    calls = decode_inputs(steps=2)
    expected = reference_logits(model, calls, 24)
    for i, bits in enumerate([None, 8, 4, 3, 2, None]):
        xq.compile_model(model, xq.XQuantConfig(bits=bits, group_size=16), max_cache_len=20 + i, max_batch_size=2,
                         backend=AOT_EAGER)
        out = run_calls(model.forward, model.xquant_cache, calls)
        assert xq.COMPILE_LOG[-1].rewritten == 2
        if bits is None:
            torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)
    assert torch._dynamo.config.recompile_limit == 8  # raised only around compile_model's own calls
