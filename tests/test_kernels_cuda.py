"""``xq_compile::dequant_project`` on a real GPU: the compiled Triton kernel against the CPU reference.

Skipped without CUDA (and Triton). ``scripts/gpu_check.sh`` runs it on the GPU machine.
Set ``XQ_CUDA_TEST_DEVICE=cpu`` to dry-run the test code itself on CPU (the op then takes its CPU
kernel, so this checks the tests, not the kernel).
"""

from __future__ import annotations

import importlib.util
import inspect
import os

import pytest
import torch

from xq_compile import quant
from xq_compile.kernels import dequant_project as dp
from xq_compile.kernels.tiles import scale_broadcast

from conftest import decode_inputs, tiny_llama
from test_kernels import make_inputs, reference, selection_expected
from xq_compile.cache import cache_kwargs

DEVICE = os.environ.get("XQ_CUDA_TEST_DEVICE", "cuda")
ON_CUDA = DEVICE == "cuda"
OP = torch.ops.xq_compile.dequant_project.default
BITS = (2, 3, 4, 8)

pytestmark = pytest.mark.skipif(
    ON_CUDA and (not torch.cuda.is_available() or importlib.util.find_spec("triton") is None),
    reason="needs a CUDA GPU and triton",
)

# (B, L, d, N, group_size, n): small ragged shapes, and SmolLM2's real rebuild shape at several fills.
SHAPES = [
    (1, 37, 48, 20, 16, 21),
    (3, 20, 40, 33, 8, 20),
    (2, 18, 48, 17, 48, 0),
    (1, 1024, 576, 576, 64, 1),
    (2, 4096, 576, 576, 64, 3000),
    (1, 4096, 576, 192, 64, 4096),
]
# (B, L, d, N, group_size, n) of test_cuda_op_selection_is_exact; (B, L, d, N, bits, group_size) of the graph replay
SELECTION_SHAPE = (2, 300, 576, 96, 64, 257)
GRAPH_REPLAY_SHAPE = (1, 512, 576, 576, 4, 64)


def to_dev(*ts):
    return [None if t is None else t.to(DEVICE) for t in ts]


def tol(dtype):
    return {torch.float32: dict(rtol=1e-4, atol=1e-3), torch.float16: dict(rtol=3e-3, atol=3e-3),
            torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}[dtype]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_L{}_d{}_N{}_g{}_n{}".format(*s))
def test_cuda_op_matches_cpu_reference(bits, dtype, shape):
    B, L, d, N, gs, n = shape
    packed, scale, zero, w, b = make_inputs(B, L, d, N, bits, gs, dtype=dtype, poison_tail_from=n, seed=bits + n)
    length = torch.tensor(n)
    cpu = OP(packed, scale, zero, w, b, length, bits, gs)  # CPU kernel = the torch reference
    out = OP(*to_dev(packed, scale, zero, w, b, length), bits, gs)
    assert out.device.type == DEVICE and out.shape == (B, L, N) and out.dtype == dtype
    out = out.cpu()
    assert torch.isfinite(out).all()
    assert (out[:, n:] == 0).all(), "rows past the fill must be exactly zero"
    ref = reference(packed, scale, zero, w, b, n, bits, gs)
    # TF32 may be on for fp32 dots only when the user allowed it; the default is exact fp32.
    scale_ = max(1.0, ref.abs().max().item())
    torch.testing.assert_close(out.double() / scale_, ref / scale_, **tol(dtype))
    torch.testing.assert_close(out.float() / scale_, cpu.float() / scale_, **tol(dtype))


@pytest.mark.skipif(not ON_CUDA, reason="calls the launcher: a GPU (the interpreter runs both forms)")
@pytest.mark.parametrize("x_as_b", [False, True])
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_both_operand_forms_match_the_reference(x_as_b, bits, dtype):
    """out = X̂·Wᵀ (Hopper's form) and outᵀ = W·X̂ᵀ (the mma.sync GPUs') compiled for this GPU, whichever it
    is: the op takes only this GPU's default form, so the other is compiled and checked nowhere else."""
    B, L, d, N, gs, n = SHAPES[4]
    packed, scale, zero, w, b = make_inputs(B, L, d, N, bits, gs, dtype=dtype, poison_tail_from=n, seed=bits)
    out = dp.dequant_project_triton(*to_dev(packed, scale, zero, w, b, torch.tensor(n)), bits, gs,
                                    x_as_b=x_as_b).cpu()
    assert (out[:, n:] == 0).all(), "rows past the fill must be exactly zero"
    ref = reference(packed, scale, zero, w, b, n, bits, gs)
    scale_ = max(1.0, ref.abs().max().item())
    torch.testing.assert_close(out.double() / scale_, ref / scale_, **tol(dtype))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cuda_op_selection_is_exact(bits, dtype):
    B, L, d, N, gs, n = SELECTION_SHAPE
    packed, scale, zero, w, _ = make_inputs(B, L, d, N, bits, gs, dtype=dtype, bias=False, weight="selection")
    out = OP(*to_dev(packed, scale, zero, w), None, torch.tensor(n, device=DEVICE), bits, gs).cpu()
    # The op's launch (its default blocks) dequantizes with one scale and zero per row and tile, by
    # tiles.fma_code, whose rounding test_kernels.dequantize_folded reproduces bit for bit.
    blocks = inspect.signature(dp.dequant_project_triton).parameters
    folded = ON_CUDA and scale_broadcast("per_token", gs, blocks["block_m"].default, blocks["block_k"].default)
    expected = selection_expected(packed, scale, zero, w, n, bits, gs, folded=folded)
    bad = (out != expected).nonzero()
    assert bad.numel() == 0, f"{len(bad)} wrong entries, first {bad[:5].tolist()}"


@pytest.mark.skipif(not ON_CUDA, reason="CUDA graphs")
def test_cuda_graph_replay_follows_the_device_length():
    """The kernel reads n on the device: one captured graph serves every fill."""
    B, L, d, N, bits, gs = GRAPH_REPLAY_SHAPE
    packed, scale, zero, w, b = to_dev(*make_inputs(B, L, d, N, bits, gs, seed=3))
    length = torch.tensor(1, device=DEVICE)
    OP(packed, scale, zero, w, b, length, bits, gs)  # compile the kernel outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = OP(packed, scale, zero, w, b, length, bits, gs)
    for n in (5, 300, 512, 17):
        length.fill_(n)
        graph.replay()
        torch.cuda.synchronize()
        ref = OP(packed.cpu(), scale.cpu(), zero.cpu(), w.cpu(), b.cpu(), torch.tensor(n), bits, gs)
        torch.testing.assert_close(out.cpu(), ref, rtol=1e-4, atol=1e-3)
        assert (out[:, n:] == 0).all()


def test_cuda_op_under_inductor():
    packed, scale, zero, w, b = to_dev(*make_inputs(2, 64, 96, 48, 3, 32, seed=5))

    def rebuild(packed, scale, zero, length):
        return torch.relu(dp.dequant_project(packed, scale, zero, w, b, length, 3, 32)) * 2

    compiled = torch.compile(rebuild, backend="inductor", fullgraph=True)
    for n in (1, 40, 64):
        length = torch.tensor(n, device=DEVICE)
        torch.testing.assert_close(compiled(packed, scale, zero, length), rebuild(packed, scale, zero, length),
                                   rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_xquant_decode_on_device_matches_simulation(dtype):
    """End to end on the device: backend="xquant" (the dequant_project op path on CUDA) against the eager
    model with simulated quantization of X, same inputs."""
    import xq_compile as xq
    from transformers import StaticCache
    from xq_compile.simulate import simulate_xquant

    torch._dynamo.reset()
    model = tiny_llama(num_kv_heads=4).to(DEVICE, dtype)
    calls = [{k: v.to(DEVICE) for k, v in c.items()} for c in decode_inputs(batch=2, steps=8)]
    config = xq.XQuantConfig(bits=4, group_size=32)
    cache = xq.XQuantCache(model.config, max_batch_size=2, max_cache_len=32, xquant=config, dtype=dtype, device=DEVICE)
    forward = torch.compile(model.forward, backend="xquant", fullgraph=True)
    with torch.no_grad():
        out = [forward(**c, **cache_kwargs(forward, cache), use_cache=True).logits.float() for c in calls]
        with simulate_xquant(model, config):
            sim_cache = StaticCache(config=model.config, max_cache_len=32)
            sim = [model(**c, **cache_kwargs(model, sim_cache), use_cache=True).logits.float() for c in calls]
        exact_cache = StaticCache(config=model.config, max_cache_len=32)
        exact = [model(**c, **cache_kwargs(model, exact_cache), use_cache=True).logits.float() for c in calls]

    mean_out = sum((x - y).abs().mean().item() for x, y in zip(out, sim)) / len(out)
    mean_exact = sum((x - y).abs().mean().item() for x, y in zip(sim, exact)) / len(out)
    # Same bar as tests/test_backend.py::test_inductor_quantized_decode_matches_reference (fp32); bf16
    # rounds X and the rebuilt K/V differently from the simulation, so it gets a looser one.
    factor = 0.25 if dtype == torch.float32 else 1.0
    assert mean_out < factor * mean_exact + (0 if dtype == torch.float32 else 2e-2), (mean_out, mean_exact)
    assert torch.isfinite(torch.stack([o.abs().max() for o in out])).all()


def test_quant_roundtrip_on_device():
    """quantize/pack on the device (what the store emits) give the CPU codes."""
    x = torch.randn(2, 33, 576)
    for bits in BITS:
        codes, scale, zero = quant.quantize(x, bits, 64)
        codes_d, scale_d, zero_d = quant.quantize(x.to(DEVICE), bits, 64)
        assert torch.equal(scale_d.cpu(), scale) and torch.equal(zero_d.cpu(), zero)
        # a code may flip at an exact rounding tie between devices; nothing more
        assert (codes_d.cpu().int() - codes.int()).abs().max() <= 1
        assert (codes_d.cpu() != codes).float().mean() < 1e-3
        assert torch.equal(quant.pack(codes.to(DEVICE), bits).cpu(), quant.pack(codes, bits))


@pytest.mark.parametrize("form", ["x", "latent"])
def test_fused_decode_on_device_matches_the_reference(form):
    """backend="xquant" on CUDA runs decode steps through the fused decode-attention kernel (checked in
    the graph), RoPE computed from the positions; one layer, fp32, against the eager torch reference of
    the same cache contents."""
    import xq_compile as xq
    from conftest import prefix_reference

    torch._dynamo.reset()
    model = tiny_llama(num_kv_heads=1, num_layers=1).to(DEVICE)
    calls = [{k: v.to(DEVICE) for k, v in c.items()} for c in decode_inputs(batch=2, steps=20, pad=2)]
    config = xq.XQuantConfig(bits=4, group_size=16, form=form)
    cache = xq.XQuantCache(model.config, max_batch_size=2, max_cache_len=48, xquant=config, device=DEVICE)
    # on CUDA "auto" picks the fused form; XQ_CUDA_TEST_DEVICE=cpu runs the same test through its CPU kernel
    backend = xq.make_xquant_backend("inductor", rebuild="auto" if ON_CUDA else "fused")
    forward = torch.compile(model.forward, backend=backend, fullgraph=True)
    with torch.no_grad():
        out = [forward(**c, **cache_kwargs(forward, cache), use_cache=True).logits for c in calls]
    assert "decode_attention" in xq.COMPILE_LOG[-1].code_after
    # the kernel computes cos/sin from the cached rows' positions (tests/test_fused_rope.py)
    assert all(r.form.endswith("RoPE from positions") for r in xq.COMPILE_LOG[-1].reports)
    ref = prefix_reference(model, calls, config)
    assert max((o - r).abs().max().item() for o, r in zip(out, ref)) < 1e-3


def test_reduce_overhead_cuda_graphs_give_the_same_decode():
    """mode="reduce-overhead" (CUDA graphs) replays the decode graph with the length read on device."""
    import xq_compile as xq

    model = tiny_llama(num_kv_heads=4).to(DEVICE)
    calls = [{k: v.to(DEVICE) for k, v in c.items()} for c in decode_inputs(batch=2, steps=12)]
    config = xq.XQuantConfig(bits=4, group_size=32)
    outs = {}
    for mode in (None, "reduce-overhead"):
        torch._dynamo.reset()
        cache = xq.XQuantCache(model.config, max_batch_size=2, max_cache_len=32, xquant=config, device=DEVICE)
        forward = torch.compile(model.forward, backend="xquant", mode=mode, fullgraph=True)
        with torch.no_grad():
            outs[mode] = [forward(**c, **cache_kwargs(forward, cache), use_cache=True).logits.clone() for c in calls]
    assert max((a - b).abs().max().item() for a, b in zip(outs[None], outs["reduce-overhead"])) < 1e-3
