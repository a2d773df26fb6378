"""End to end on tiny random Llama models: torch.compile(backend="xquant") against the unmodified model."""

import subprocess
import sys

import pytest
import torch

import xq_compile as xq
from xq_compile.backend import collect_records
from xq_compile.simulate import simulate_xquant

from conftest import compiled_run, decode_inputs, max_error, reference_logits, run_calls, tiny_llama
from xq_compile.cache import cache_kwargs

MAX_LEN = 32  # conftest.compiled_run's default capacity


@pytest.mark.parametrize("num_kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("rotation", ["hadamard", "none"])
def test_unquantized_x_reproduces_the_model(num_kv_heads, rotation):
    model = tiny_llama(num_kv_heads=num_kv_heads)
    calls = decode_inputs(batch=2, steps=16, pad=2)
    with collect_records() as records:  # (xq.COMPILE_LOG is bounded: slicing it by position is fragile)
        out, _ = compiled_run(model, calls, xq.XQuantConfig(bits=None, group_size=16, rotation=rotation))
    ref = reference_logits(model, calls, MAX_LEN)
    assert max_error(out, ref) < 1e-4
    # One graph for the prefill, one for every decode step: no per-token recompiles.
    assert len(records) == 2
    assert all(r.rewritten == 2 and len(r.reports) == 2 for r in records)


def test_bias_projections_are_rebuilt_exactly():
    model = tiny_llama(num_kv_heads=2, bias=True)
    calls = decode_inputs(batch=2, steps=4)
    out, _ = compiled_run(model, calls, xq.XQuantConfig(bits=None, group_size=16))
    assert max_error(out, reference_logits(model, calls, MAX_LEN)) < 1e-4


def test_quantized_paths_match_the_torch_reference_and_errors_grow_with_fewer_bits():
    model = tiny_llama(num_kv_heads=2)
    calls = decode_inputs(batch=2, steps=6)
    exact = reference_logits(model, calls, MAX_LEN)
    errors = []
    for bits in (8, 4, 3, 2):
        config = xq.XQuantConfig(bits=bits, group_size=16)
        # aot_eager: the rewrite itself, no code generation (Inductor is covered by the other tests)
        out, _ = compiled_run(model, calls, config, backend=xq.make_xquant_backend("aot_eager"))
        with simulate_xquant(model, config):
            simulated = reference_logits(model, calls, MAX_LEN)
        assert max_error(out, simulated) < 2e-4, f"{bits}-bit differs from the torch reference"
        errors.append(max_error(out, exact))
    assert errors == sorted(errors), f"error should grow as bits shrink: {errors}"
    assert errors[0] < 0.02 < errors[-1]


def _compiler_failing_on_data_dependent_rows(compiled: list, error: Exception | None = None):
    """An inner compiler that cannot lower the rows rebuilt over n = .item() cached rows (the CPU's inline
    form), as torch 2.12's Inductor cannot where a model's RoPE stacks its rotated halves (a guard on n in
    ConcatKernel.create): it raises that guard error wrapped as Inductor wraps it. Graphs without .item()
    run as they are; ``compiled`` gets the code of each."""
    import sympy
    from torch._inductor.exc import InductorError
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    def inner(gm, example_inputs):
        if ".item()" in gm.code:
            guard = GuardOnDataDependentSymNode(sympy.Eq(sympy.Symbol("u1"), 1), "Eq(1, u1) & Eq(8, 8*u1)")
            raise error if error is not None else InductorError(guard, None)
        compiled.append(gm.code)
        return gm.forward

    return inner


def test_a_graph_that_cannot_compile_over_n_rows_is_rewritten_over_max_cache_len_rows(caplog):
    model = tiny_llama(num_kv_heads=2)
    calls = decode_inputs(batch=2, steps=4)
    compiled = []
    with collect_records() as records, caplog.at_level("WARNING", logger="xq_compile"):
        out, _ = compiled_run(model, calls, xq.XQuantConfig(bits=None, group_size=16),
                              backend=xq.make_xquant_backend(_compiler_failing_on_data_dependent_rows(compiled)))
    assert max_error(out, reference_logits(model, calls, MAX_LEN)) < 1e-4
    # prefill and decode, each retried once and published once: the record is the graph that runs
    assert len(compiled) == 2 and [r.code_after for r in records] == compiled
    assert all(r.rewritten == 2 for r in records)
    assert sum("rebuild='op'" in m for m in caplog.messages) == 2


@pytest.mark.parametrize("rebuild, error", [
    ("inline", None),  # asked for by name: the user's choice stands, and the compile error with it
    ("auto", RuntimeError("an error of the inner compiler's own")),
])
def test_other_compile_failures_are_not_retried_and_show_the_graph_that_failed(rebuild, error):
    model = tiny_llama(num_kv_heads=2)
    calls = decode_inputs(batch=2, steps=1)
    compiled = []
    backend = xq.make_xquant_backend(_compiler_failing_on_data_dependent_rows(compiled, error), rebuild=rebuild)
    torch.compiler.reset()
    with collect_records() as records, pytest.raises(Exception) as raised:
        compiled_run(model, calls, xq.XQuantConfig(bits=None, group_size=16), backend=backend)
    assert ("inner compiler's own" if error is not None else "Eq(1, u1)") in str(raised.value)
    assert compiled == [] and len(records) == 1 and ".item()" in records[0].code_after


def test_inductor_quantized_decode_matches_reference():
    """The fused C++ kernels must keep quantize's fp16 rounding of scale/zero (emulate_precision_casts):
    without it codes flip at rounding edges and the cache no longer matches its own scales."""
    model = tiny_llama(num_kv_heads=4)
    calls = decode_inputs(batch=2, steps=16)
    config = xq.XQuantConfig(bits=3, group_size=32)
    out, _ = compiled_run(model, calls, config)
    with simulate_xquant(model, config):
        simulated = reference_logits(model, calls, MAX_LEN)
    assert max_error(out, simulated) < 2e-4


def test_generate_with_left_padding_matches_unquantized_greedy():
    model = tiny_llama(num_kv_heads=2)
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = model.generate(**kwargs)
        cache = xq.XQuantCache(model.config, max_batch_size=2, max_cache_len=16,
                               xquant=xq.XQuantConfig(bits=None, group_size=16))
        model.forward = torch.compile(model.forward, backend="xquant", fullgraph=True)
        got = model.generate(**kwargs, **cache_kwargs(model, cache), disable_compile=True)
    assert torch.equal(got, expected)


def test_skipped_sites_are_reported_and_keep_the_original_computation():
    """A plain StaticCache is not an XQuantCache: every site is reported, and the result is unchanged."""
    from transformers import StaticCache

    model = tiny_llama(num_kv_heads=2)
    calls = decode_inputs(batch=2, steps=2)
    forward = torch.compile(model.forward, backend=xq.make_xquant_backend("aot_eager"), fullgraph=True)
    with pytest.warns(UserWarning, match="layer 0: skipped: the cache is not an XQuantCache"):
        out = run_calls(forward, StaticCache(config=model.config, max_cache_len=MAX_LEN), calls)
    assert max_error(out, reference_logits(model, calls, MAX_LEN)) < 1e-5
    assert xq.COMPILE_LOG[-1].rewritten == 0


def test_backend_resolves_from_the_entry_point_without_import():
    code = (
        "import torch, sys\n"
        "assert 'xquant' in torch._dynamo.list_backends(), 'entry point not found'\n"
        "assert 'xq_compile' not in sys.modules or True\n"
        "f = torch.compile(lambda x: x * 2, backend='xquant', fullgraph=True)\n"
        "assert torch.equal(f(torch.ones(3)), torch.full((3,), 2.0))\n"
        "import xq_compile\n"  # importing afterwards must not register a duplicate
        "g = torch.compile(lambda x: x + 1, backend='xquant')\n"
        "assert torch.equal(g(torch.ones(2)), torch.full((2,), 2.0))\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")


def test_a_cache_with_other_settings_recompiles_instead_of_reusing_the_graph():
    model = tiny_llama(num_kv_heads=2)
    calls = decode_inputs(steps=1)
    forward = torch.compile(model.forward, backend=xq.make_xquant_backend("aot_eager"), fullgraph=True)
    outputs = {}
    for bits in (None, 2):
        config = xq.XQuantConfig(bits=bits, group_size=16)
        cache = xq.XQuantCache(model.config, max_batch_size=2, max_cache_len=MAX_LEN, xquant=config)
        outputs[bits] = run_calls(forward, cache, calls)
        with simulate_xquant(model, config):
            assert max_error(outputs[bits], reference_logits(model, calls, MAX_LEN)) < 1e-4


@pytest.mark.parametrize("cross_layer", [False, True])
def test_the_cuda_graph_form_is_exact_on_cpu(cross_layer):
    """rebuild='op' emits what a CUDA device gets (the dequant_project op over max_cache_len rows, length
    read on device, rebuilt rows padded with zeros); its CPU kernel lets the graph be checked here."""
    model = tiny_llama(num_kv_heads=2, num_layers=3)
    calls = decode_inputs(steps=4)
    config = xq.XQuantConfig(bits=4, group_size=16, cross_layer=cross_layer, base_layers=1)
    out, _ = compiled_run(model, calls, config, backend=xq.make_xquant_backend("aot_eager", rebuild="op"))
    code = xq.COMPILE_LOG[-1].code_after
    assert ("dequant_project" in code) != cross_layer and ".item()" not in code
    with simulate_xquant(model, config):
        assert max_error(out, reference_logits(model, calls, MAX_LEN)) < 2e-4


def test_inductor_fx_graph_cache_hits_on_the_second_compile():
    """Nothing we do per compile (the rewrite, the emulate_precision_casts patch) breaks Inductor's FX
    graph cache: compiling the same model again from a fresh Dynamo hits it for both graphs."""
    from torch._dynamo.utils import counters

    model = tiny_llama(num_kv_heads=2)
    calls = decode_inputs(steps=2)
    hits = []
    for _ in range(2):
        torch._dynamo.reset()
        before = counters["inductor"]["fxgraph_cache_hit"]
        compiled_run(model, calls, xq.XQuantConfig(bits=4, group_size=16))
        hits.append(counters["inductor"]["fxgraph_cache_hit"] - before)
    assert hits[1] == 2, hits


@pytest.mark.parametrize("num_kv_heads,bias", [(4, False), (2, True)], ids=["mha", "gqa-bias"])
def test_fused_decode_attention_form_equals_the_op_form(num_kv_heads, bias):
    """rebuild="fused" (what CUDA decode steps run: one xq_compile::decode_attention op over the packed
    cache, RoPE and absorbed values inside) computes what the unfused op form does. One layer: with
    more, rounding differences would flip codes in the layers above and blur the comparison."""
    model = tiny_llama(num_kv_heads=num_kv_heads, bias=bias, num_layers=1)
    calls = decode_inputs(batch=2, steps=8, pad=2)
    config = xq.XQuantConfig(bits=4, group_size=16)
    outs, codes = {}, {}
    for rebuild in ("fused", "op"):
        torch._dynamo.reset()
        outs[rebuild], _ = compiled_run(model, calls, config, backend=xq.make_xquant_backend("aot_eager", rebuild=rebuild))
        codes[rebuild] = [r.code_after for r in list(xq.COMPILE_LOG)[-2:]]
    assert max_error(outs["fused"], outs["op"]) < 1e-5
    prefill, decode = codes["fused"]
    assert "decode_attention" in decode and "scaled_dot_product_attention" not in decode
    assert "decode_attention" in prefill  # a 6-token prompt is within the kernel's 16 query rows too
    assert "decode_attention" not in "".join(codes["op"])
