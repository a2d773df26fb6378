"""The Gluon K rebuild (``xq_compile.kernels.gluon_rebuild``: ``dequant_project``'s semantics, not
dispatched).

Gluon kernels do not run under the Triton interpreter. On CPU: their values under the Gluon emulator
(``tests/gluon_emulator.py``: the kernels' own code, program by program, with the asynchronous MMAs,
copies and mbarriers checked for races and deadlocks), and what they compile to for sm_90
(``tests/test_compile_report.py`` runs ``benchmarks/compile_report.py --check``, which includes them: wgmma
with ``wait_group 1`` in the loop, not serialized, no spills). On a Hopper GPU (skipped without one;
``scripts/gpu_check.sh`` runs these with the other ``-k cuda`` tests): their values on the hardware.
"""

from __future__ import annotations

import pytest
import torch

from xq_compile import quant
from xq_compile.kernels import dequant_project  # noqa: F401 - registers the op
from xq_compile.kernels import gluon_rebuild as gr

OP = torch.ops.xq_compile.dequant_project.default
if gr.HAS_GLUON:
    from gluon_emulator import EmulationError, emulated
needs_hopper = pytest.mark.skipif(
    not (gr.HAS_GLUON and torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9),
    reason="needs triton with Gluon and a Hopper GPU (sm_90)",
)

# (B, L, channels, N, bits, group) of the CUDA test: SmolLM2's 4-bit K rebuild over 1000 rows, batch 2
CUDA_SHAPE = (2, 1000, 576, 576, 4, 64)


def _inputs(B, L, C, N, bits, group, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes, scale, zero = quant.quantize(torch.randn(B, L, C, generator=g), bits, group)
    w = (torch.randn(N, C, generator=g) / C ** 0.5).to(dtype)
    bias = torch.randn(N, generator=g).to(dtype)
    return quant.pack(codes, bits), scale, zero, w, bias


def test_supports_and_rejects():
    if not gr.HAS_GLUON:
        pytest.skip("triton without Gluon")
    packed, scale, zero, w, bias = _inputs(1, 8, 128, 64, 4, 64, torch.bfloat16)
    assert gr.supports(w, 4, 64) and not gr.supports(w, 3, 64) and not gr.supports(w.float(), 4, 64)
    assert not gr.supports(w, 4, 32)  # a scale group smaller than the 64-channel step
    with pytest.raises(ValueError, match="use dequant_project"):
        gr.dequant_project_gluon_launch(packed, scale, zero, w.float(), None, torch.tensor(8), 4, 64)
    with pytest.raises(ValueError, match="inner strides"):
        gr.dequant_project_gluon_launch(packed, scale, zero, w.T.contiguous().T, None, torch.tensor(8), 4, 64)
    kernel, grid, args, kwargs, out = gr.dequant_project_gluon_launch(packed, scale, zero, w, bias,
                                                                      torch.tensor(8), 4, 64)
    assert grid == (1, 1) and out.shape == (1, 8, 64) and kwargs["HAS_BIAS"] and kernel is gr._gluon_rebuild_kernel
    kernel, *_ = gr.dequant_project_gluon_launch(packed, scale, zero, w, bias, torch.tensor(8), 4, 64,
                                                 warp_specialize=True)
    assert kernel is gr._gluon_rebuild_ws_kernel


@needs_hopper
@pytest.mark.parametrize("n", [0, 1, 100, 1000])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("warp_specialize", [False, True], ids=["one_warpgroup", "warp_specialized"])
def test_cuda_gluon_rebuild_matches_dequant_project(n, dtype, warp_specialize):
    """Against the op's CPU kernel (the torch reference): batch 2, L = 1000 rows of SmolLM2's 576
    channels, 4-bit in groups of 64, bias, the first n rows; rows past n exactly 0. Both forms: one
    warpgroup dequantizing and issuing the MMAs, and dequantizing warps handing two buffers to an MMA
    warpgroup through mbarriers (9 channel steps: each buffer changes hands 4-5 times)."""
    packed, scale, zero, w, bias = _inputs(*CUDA_SHAPE, dtype, seed=n)
    length = torch.tensor(n)
    expected = OP(packed, scale, zero, w, bias, length, 4, 64)
    out = gr.dequant_project_gluon(*(t.cuda() for t in (packed, scale, zero, w, bias, length)), 4, 64,
                                   warp_specialize=warp_specialize)
    torch.cuda.synchronize()
    torch.testing.assert_close(out.cpu().float(), expected.float(), rtol=2e-2, atol=2e-2)
    assert (out[:, n:] == 0).all(), "rows past n must be 0"


@pytest.mark.skipif(not gr.HAS_GLUON, reason="triton without Gluon")
@pytest.mark.parametrize("n", [0, 1, 100, 300])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("warp_specialize", [False, True], ids=["one_warpgroup", "warp_specialized"])
def test_emulated_gluon_rebuild_matches_dequant_project(n, dtype, warp_specialize):
    """The kernels' code under the emulator, against the op's reference: batch 2, 300 rows (5 row blocks, the
    last partial) of 576 channels (9 steps: each buffer changes hands 4-5 times, every MMA's buffer
    rewritten only after it has retired, the mbarrier phases of the warp-specialized form in turn), 192
    features (a second, half-filled feature block), bias; rows past n exactly 0."""
    packed, scale, zero, w, bias = _inputs(2, 300, 576, 192, 4, 64, dtype, seed=n)
    length = torch.tensor(n)
    kernel, grid, args, kwargs, out = gr.dequant_project_gluon_launch(packed, scale, zero, w, bias, length, 4, 64,
                                                                      warp_specialize=warp_specialize)
    emulated(kernel)[grid](*args, **kwargs)
    expected = OP(packed, scale, zero, w, bias, length, 4, 64)
    torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2, atol=2e-2)
    assert (out[:, n:] == 0).all(), "rows past n must be 0"


@pytest.mark.skipif(not gr.HAS_GLUON, reason="triton without Gluon")
@pytest.mark.parametrize("warp_specialize, error", [
    (False, "written while an MMA reading it is in flight"),
    (True, "deadlock"),
], ids=["one_warpgroup", "warp_specialized"])
def test_emulated_gluon_rebuild_needs_two_buffers(warp_specialize, error):
    """With one buffer the one-warpgroup loop would overwrite the X̂ tile that the MMA left in flight still
    reads, and the warp-specialized one would wait for a buffer that is handed back only after the next
    MMA: what the emulator reports (and why ``num_buf`` is 2)."""
    packed, scale, zero, w, bias = _inputs(1, 64, 256, 128, 4, 64, torch.bfloat16)
    kernel, grid, args, kwargs, _ = gr.dequant_project_gluon_launch(packed, scale, zero, w, bias, torch.tensor(64), 4,
                                                                    64, warp_specialize=warp_specialize, num_buf=1)
    with pytest.raises(EmulationError, match=error):
        emulated(kernel)[grid](*args, **kwargs)
