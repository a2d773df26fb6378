"""The Gluon emulator (``tests/gluon_emulator.py``), which runs the Gluon kernels' values on CPU: Triton's
integer semantics, bounds checks, and each ordering rule of the asynchronous operations caught when a small
pipelined matmul breaks it (and that matmul right when it does not)."""

from __future__ import annotations

import pytest
import torch

try:
    from gluon_emulator import EmulationError, emulated
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait
except ImportError:
    pytest.skip("triton without Gluon (triton >= 3.4 has it)", allow_module_level=True)

_cp_async = async_copy.async_load if hasattr(async_copy, "async_load") else async_copy.async_copy_global_to_shared


@gluon.jit
def _integers(out_ptr, big):
    """Rows of out [6, 4] (int64): int32 wrap-around, an int64 scalar argument promoting an int32 tensor,
    C division and remainder, a shift past bit 31, a bitcast."""
    l: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
    i = gl.arange(0, 4, layout=l)
    gl.store(out_ptr + i, i + 2147483646)
    gl.store(out_ptr + 4 + i, i * big)
    gl.store(out_ptr + 8 + i, (i - 2) // 3)
    gl.store(out_ptr + 12 + i, (i - 2) % 3)
    gl.store(out_ptr + 16 + i, (i + 1) << 30)
    gl.store(out_ptr + 20 + i, ((i + 1).to(gl.float32) * 0.5).to(gl.int32, bitcast=True))


def test_integer_semantics_are_triton_s():
    out = torch.zeros(24, dtype=torch.int64)
    emulated(_integers)[(1,)](out, 2 ** 33)
    wrap = lambda v: (v + 2 ** 31) % 2 ** 32 - 2 ** 31  # noqa: E731
    assert out[:4].tolist() == [wrap(2147483646 + i) for i in range(4)]  # [.., 2**31 - 1, -2**31, ..]
    assert out[4:8].tolist() == [i * 2 ** 33 for i in range(4)]  # int64, not wrapped at 32 bits
    assert out[8:12].tolist() == [0, 0, 0, 0] and out[12:16].tolist() == [-2, -1, 0, 1]  # toward zero
    assert out[16:20].tolist() == [2 ** 30, wrap(2 ** 31), wrap(3 * 2 ** 30), 0]
    halves = torch.tensor([0.5, 1.0, 1.5, 2.0]).view(torch.int32)
    assert out[20:24].tolist() == halves.tolist()


@gluon.jit
def _copy(x_ptr, out_ptr, n, SIZE: gl.constexpr, MASKED: gl.constexpr):
    l: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
    i = gl.arange(0, SIZE, layout=l)
    if MASKED:
        gl.store(out_ptr + i, gl.load(x_ptr + i, mask=i < n, other=-1.0), mask=i < n)
    else:
        gl.store(out_ptr + i, gl.load(x_ptr + i))


def test_loads_and_stores_stay_inside_their_tensors():
    x = torch.arange(10, dtype=torch.float32)
    out = torch.full((16,), 7.0)
    emulated(_copy)[(1,)](x, out, 10, SIZE=16, MASKED=True)
    assert out.tolist() == list(range(10)) + [7.0] * 6
    with pytest.raises(EmulationError, match=r"load through x_ptr out of bounds: element offsets 10..15 of a "
                                             r"storage of 10 torch.float32 elements \(6 accesses\)"):
        emulated(_copy)[(1,)](x, out, 10, SIZE=16, MASKED=False)
    view = torch.arange(20, dtype=torch.float32)[4:14]  # a view reads its storage, not only the view
    emulated(_copy)[(1,)](view, out, 10, SIZE=16, MASKED=True)
    assert out[:10].tolist() == list(range(4, 14))


@gluon.jit
def _pipelined_matmul(a_ptr, b_ptr, out_ptr, K: gl.constexpr, M: gl.constexpr, N: gl.constexpr,
                      BLOCK_K: gl.constexpr, BUFS: gl.constexpr, MMAS_IN_FLIGHT: gl.constexpr,
                      COPIES_IN_FLIGHT: gl.constexpr, FENCE: gl.constexpr, FINAL_WAIT: gl.constexpr):
    """out [M, N] = a [M, K] · b [N, K]ᵀ, the way the Gluon rebuild pipelines it: per step the A tile is
    stored to shared memory, the B tile copied there by cp.async, the MMA issued asynchronously and waited
    for until MMAS_IN_FLIGHT remain. Correct with BUFS=2, MMAS_IN_FLIGHT=1, COPIES_IN_FLIGHT=0, FENCE and
    FINAL_WAIT; each other setting breaks one rule."""
    l: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, N, 16])
    a_buf = gl.allocate_shared_memory(gl.bfloat16, [BUFS, M, BLOCK_K],
                                      gl.NVMMASharedLayout.get_default_for([M, BLOCK_K], gl.bfloat16))
    b_buf = gl.allocate_shared_memory(gl.bfloat16, [BUFS, N, BLOCK_K],
                                      gl.NVMMASharedLayout.get_default_for([N, BLOCK_K], gl.bfloat16))
    rows = gl.arange(0, M, layout=gl.SliceLayout(1, l))
    feats = gl.arange(0, N, layout=gl.SliceLayout(1, l))
    cols = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, l))
    acc = gl.zeros((M, N), gl.float32, acc_l)
    for i in range(K // BLOCK_K):
        s = i % BUFS
        _cp_async(b_buf.index(s), b_ptr + feats[:, None] * K + i * BLOCK_K + cols[None, :])
        async_copy.commit_group()
        a_buf.index(s).store(gl.load(a_ptr + rows[:, None] * K + i * BLOCK_K + cols[None, :]))
        if FENCE:
            fence_async_shared()
        async_copy.wait_group(COPIES_IN_FLIGHT)
        acc = warpgroup_mma(a_buf.index(s), b_buf.index(s).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=MMAS_IN_FLIGHT, deps=(acc,))
    if FINAL_WAIT:
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    gl.store(out_ptr + rows[:, None] * N + gl.arange(0, N, layout=gl.SliceLayout(0, l))[None, :],
             gl.convert_layout(acc, l))


_RIGHT = dict(BUFS=2, MMAS_IN_FLIGHT=1, COPIES_IN_FLIGHT=0, FENCE=True, FINAL_WAIT=True)


def _matmul(**settings) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, 256, generator=g).to(torch.bfloat16)
    b = torch.randn(32, 256, generator=g).to(torch.bfloat16)
    out = torch.zeros(64, 32)
    emulated(_pipelined_matmul)[(1,)](a, b, out, K=256, M=64, N=32, BLOCK_K=64, **{**_RIGHT, **settings})
    return out, a.float() @ b.float().T


def test_a_pipelined_matmul_that_keeps_the_rules_is_right():
    out, want = _matmul()
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("broken, error", [
    (dict(BUFS=1), "written by cp.async while an MMA reading it is in flight"),
    (dict(MMAS_IN_FLIGHT=2), "written by cp.async while an MMA reading it is in flight"),
    (dict(COPIES_IN_FLIGHT=1), "read by wgmma while a cp.async copy into it has not landed"),
    (dict(FENCE=False), "without fence_async_shared"),
    (dict(FINAL_WAIT=False), "accumulator of an MMA still in flight is used"),
], ids=["one_buffer", "two_mmas_in_flight_on_two_buffers", "copy_not_waited_for", "no_fence", "no_final_wait"])
def test_each_broken_rule_is_caught(broken, error):
    with pytest.raises(EmulationError, match=error):
        _matmul(**broken)


def test_an_injected_fault_is_caught():
    """``replace``: the kernel's own code, one of its globals swapped (here the wait leaving one more MMA in
    flight than asked), which is how the real kernels' tests show their races would be caught."""
    from gluon_emulator import warpgroup_mma_wait as wait

    a, b, out = torch.zeros(64, 256, dtype=torch.bfloat16), torch.zeros(32, 256, dtype=torch.bfloat16), \
        torch.zeros(64, 32)
    looser = {"warpgroup_mma_wait": lambda num_outstanding=0, deps=None: wait(num_outstanding + 1, deps)}
    with pytest.raises(EmulationError, match="in flight"):
        emulated(_pipelined_matmul, replace=looser)[(1,)](a, b, out, K=256, M=64, N=32, BLOCK_K=64, **_RIGHT)


def test_the_matmul_the_rules_are_checked_on_is_real_gluon():
    """The right ``_pipelined_matmul`` compiles for sm_90 (no GPU needed) to wgmma with one group kept in
    flight: the emulator's rules are checked on the kind of loop the GPU runs, not on a Python toy."""
    from test_compile_report import _benchmark_module, _cuobjdump_present

    if not _cuobjdump_present():
        pytest.skip("triton without its CUDA tools (cuobjdump, ptxas)")
    report = _benchmark_module()
    a, b, out = torch.zeros(64, 256, dtype=torch.bfloat16), torch.zeros(32, 256, dtype=torch.bfloat16), \
        torch.zeros(64, 32)
    compiled = report.compile_launch(report.Launch(_pipelined_matmul, (1,), (a, b, out),
                                                   dict(K=256, M=64, N=32, BLOCK_K=64, num_warps=4, **_RIGHT)))
    assert compiled.wgmma == 4 and 1 in compiled.wgmma_waits and not compiled.problems, compiled
