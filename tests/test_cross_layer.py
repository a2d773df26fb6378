"""XQuant-CL: cross-layer deltas with an accumulator, as a graph rewrite."""

import pytest
import torch

import xq_compile as xq
from xq_compile import quant
from xq_compile.simulate import simulate_xquant

from conftest import decode_inputs, max_error, reference_logits, run_calls, tiny_llama

MAX_LEN = 32
AOT_EAGER = xq.make_xquant_backend("aot_eager")


def cl_config(bits, base_bits=4, **kw):
    return xq.XQuantConfig(bits=bits, group_size=16, cross_layer=True, base_layers=2, base_bits=base_bits, **kw)


def run(model, calls, config, backend="xquant"):
    cache = xq.XQuantCache(model.config, max_batch_size=2, max_cache_len=MAX_LEN, xquant=config)
    return run_calls(torch.compile(model.forward, backend=backend, fullgraph=True), cache, calls), cache


def test_unquantized_deltas_reproduce_the_model():
    model = tiny_llama(num_kv_heads=2, num_layers=4)
    calls = decode_inputs(steps=8)
    out, _ = run(model, calls, cl_config(None, base_bits=None))
    assert max_error(out, reference_logits(model, calls, MAX_LEN)) < 1e-4
    forms = [r.form for r in xq.COMPILE_LOG[-1].reports]
    assert forms == ["X (unquantized)"] * 2 + [f"X delta vs layer {i} (cross-layer, unquantized)" for i in (1, 2)]


@pytest.mark.parametrize("bits, base_bits", [(4, 4), (3, 8), (2, 4)])
def test_quantized_deltas_match_the_torch_reference(bits, base_bits):
    model = tiny_llama(num_kv_heads=4, num_layers=4)
    calls = decode_inputs(steps=5)
    config = cl_config(bits, base_bits)
    out, _ = run(model, calls, config, backend=AOT_EAGER)
    with simulate_xquant(model, config):
        simulated = reference_logits(model, calls, MAX_LEN)
    exact = reference_logits(model, calls, MAX_LEN)
    assert max_error(out, simulated) < 2e-4 < max_error(simulated, exact)


def test_closed_loop_beats_open_loop_deltas():
    """Deltas against the reconstructed X̂ (closed loop) keep errors from piling up over layers."""
    model = tiny_llama(num_kv_heads=4, num_layers=6)
    calls = decode_inputs(steps=2)
    exact = reference_logits(model, calls, MAX_LEN)
    with simulate_xquant(model, cl_config(2)):
        closed = max_error(reference_logits(model, calls, MAX_LEN), exact)
    out, _ = run(model, calls, cl_config(2), backend=AOT_EAGER)
    assert max_error(out, exact) < 1.5 * closed


def test_decode_stores_the_deltas_a_one_pass_prefill_would():
    model = tiny_llama(num_kv_heads=2, num_layers=4)
    calls = decode_inputs(batch=2, prompt=6, steps=6)
    _, incremental = run(model, calls, cl_config(4), backend=AOT_EAGER)
    whole = dict(input_ids=torch.cat([c["input_ids"] for c in calls], 1), attention_mask=calls[-1]["attention_mask"],
                 position_ids=torch.cat([c["position_ids"] for c in calls], 1))
    torch._dynamo.reset()
    _, one_pass = run(model, [whole], cl_config(4), backend=AOT_EAGER)
    for a, b in zip(incremental.layers, one_pass.layers):
        same = (a.state["codes"][:, :12] == b.state["codes"][:, :12]).float().mean().item()
        assert same > 0.99, f"layer {a.layer_idx}: only {same:.1%} of the stored codes agree"
        x_a = quant.dequantize(a.state["codes"][:, :12], a.state["scale"][:, :12], a.state["zero"][:, :12], 4, 16)
        x_b = quant.dequantize(b.state["codes"][:, :12], b.state["scale"][:, :12], b.state["zero"][:, :12], 4, 16)
        assert (x_a - x_b).abs().mean() < 1e-3


def test_cache_bytes_follow_the_per_layer_bits():
    model = tiny_llama(num_kv_heads=2, num_layers=4)
    config = cl_config(2, base_bits=4, rotation="none")
    cache = xq.XQuantCache(model.config, max_batch_size=2, max_cache_len=MAX_LEN, xquant=config)
    per_row = {4: 64 * 4 // 8 + 4 * (64 // 16), 2: 64 * 2 // 8 + 4 * (64 // 16)}
    rows = 2 * MAX_LEN
    expected = rows * (2 * per_row[4] + 2 * per_row[2] + 8) + 4 * (4 + 4 + 8)
    assert cache.nbytes() == expected
    assert [layer.bits for layer in cache.layers] == [4, 4, 2, 2]


def test_graph_split_between_layers_is_refused_clearly():
    model = tiny_llama(num_kv_heads=2, num_layers=3)
    model.model.layers[1].register_forward_pre_hook(lambda m, a: torch._dynamo.graph_break())
    cache = xq.XQuantCache(model.config, max_batch_size=2, max_cache_len=MAX_LEN, xquant=cl_config(4))
    forward = torch.compile(model.forward, backend=AOT_EAGER)
    # the part after the break gets RoPE tables instead of position ids: refused, naming the cause
    with pytest.raises(Exception, match="split by a graph break; compile with fullgraph=True"):
        run_calls(forward, cache, decode_inputs(steps=0))
