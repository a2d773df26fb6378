"""The K rebuild of ``xq_compile::dequant_project`` written in Gluon for Hopper (sm_90): the MMA of one
channel step stays in flight while the next step is dequantized. **Not dispatched, not yet run on a
GPU.** Gluon kernels do not run under the Triton interpreter; on CPU ``tests/test_gluon_rebuild.py`` runs
this code under the Gluon emulator (``tests/gluon_emulator.py``: the values, and the buffers' hand-overs
checked for races and deadlocks) and ``benchmarks/compile_report.py`` checks what it compiles to
(``wgmma.wait_group 1`` in its loop). On a Hopper GPU the same tests check its values on the hardware
(``scripts/gpu_check.sh`` runs them; ``benchmarks/rebuild_op.py`` times it next to the op there). The op's
CUDA kernel stays the plain-Triton ``_dequant_project_kernel``, the tested path and the fallback.

Why Gluon: Triton's pipeliner makes a dot asynchronous only when its shared-memory operand comes from a
pipelined load; a tile dequantized in the loop never is (``docs/kernels.md``). In Gluon the kernel owns
the shared memory and the waits: the dequantized X̂ tile goes into one of ``NUM_BUF`` (>= 2) bf16
buffers, the MMA reading it is issued asynchronously, and the wait that follows leaves one group
pending (``warpgroup_mma_wait(1)``), so step i's MMA runs while step i + 1 is dequantized; the buffer
step i + 1 overwrites belonged to MMA i - 1, which that wait has retired.

Semantics: those of ``dequant_project`` (``out[:, :n] = dequantize(...)[:, :n] @ weight.T + bias``,
``out[:, n:] = 0``, ``n`` read on the device) for the case :func:`supports` accepts: 4-bit codes, a
16-bit model dtype, scale groups and the hidden size multiples of 64.
"""

from __future__ import annotations

from typing import Optional

import torch

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, warpgroup_mma,
                                                                   warpgroup_mma_wait)
    # a barrier of the calling warps (a partition's): gl.barrier in triton 3.9, gl.thread_barrier in 3.6
    partition_barrier = gl.barrier if hasattr(gl, "barrier") else gl.thread_barrier
except (ImportError, AttributeError):  # triton < 3.4, or a Gluon API this code does not know: Triton only
    gluon = None

HAS_GLUON = gluon is not None
BLOCK_C = 64  # channels per step: one scale group per step (groups are multiples of it)

if HAS_GLUON:

    @gluon.jit
    def dequant_x4(packed_ptr, scale_ptr, zero_ptr, b, r0, row_end, c0, s_pb, s_pl, s_sb, s_sl, s_zb, s_zl,
                   GROUP: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_C: gl.constexpr, WARPS: gl.constexpr,
                   dtype: gl.constexpr):
        """Rows r0 .. r0 + BLOCK_N (0 from row_end on), channels c0 .. c0 + BLOCK_C of a 4-bit per-token
        source, dequantized in fp32 (as quant.dequantize) and rounded to ``dtype``; the channels lie in
        one scale group (GROUP % BLOCK_C == 0, c0 a multiple of BLOCK_C)."""
        # registers: the packed bytes, the dequantization (8 consecutive channels per thread)
        half: gl.constexpr = gl.BlockedLayout([1, 4], [4, 8], [WARPS, 1], [1, 0])
        dq: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [WARPS, 1], [1, 0])
        rows_h = (r0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, half))).to(gl.int64)
        rows = r0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, dq))
        row_ok = rows < row_end
        rows64 = rows.to(gl.int64)
        # a row's BLOCK_C / 2 bytes, split into low and high nibbles and interleaved (join + reshape)
        byte_idx = c0 // 2 + gl.arange(0, BLOCK_C // 2, layout=gl.SliceLayout(0, half))
        byte = gl.load(packed_ptr + b * s_pb + rows_h[:, None] * s_pl + byte_idx[None, :],
                       mask=(rows_h < row_end)[:, None], other=0).to(gl.int32)
        code = gl.convert_layout(gl.reshape(gl.join(byte & 15, byte >> 4), [BLOCK_N, BLOCK_C]), dq)
        # one scale and one zero per row, broadcast over the channels
        group = c0 // GROUP
        s = gl.load(scale_ptr + b * s_sb + rows64 * s_sl + group, mask=row_ok, other=0.0).to(gl.float32)
        z = gl.load(zero_ptr + b * s_zb + rows64 * s_zl + group, mask=row_ok, other=0.0).to(gl.float32)
        code_f = (code | 0x4B000000).to(gl.float32, bitcast=True) - 8388608.0
        return (code_f * s[:, None] + z[:, None]).to(dtype)

    @gluon.jit
    def _dequant_step(packed_ptr, scale_ptr, zero_ptr, w_ptr, x_smem, w_smem, b, r0, f0, n, i,
                      s_pb, s_pl, s_sb, s_sl, s_zb, s_zl, s_wn, N: gl.constexpr, GROUP: gl.constexpr,
                      BLOCK_N: gl.constexpr, BLOCK_C: gl.constexpr, BLOCK_F: gl.constexpr, WARPS: gl.constexpr):
        """Channel step ``i``: X̂ [BLOCK_N, BLOCK_C] of rows r0.. (0 past n) and the W tile
        [BLOCK_F, BLOCK_C] of features f0.., stored into the given shared-memory buffers."""
        x_smem.store(dequant_x4(packed_ptr, scale_ptr, zero_ptr, b, r0, n, i * BLOCK_C, s_pb, s_pl, s_sb, s_sl,
                                s_zb, s_zl, GROUP, BLOCK_N, BLOCK_C, WARPS, x_smem.dtype))
        dq: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [WARPS, 1], [1, 0])
        cols = i * BLOCK_C + gl.arange(0, BLOCK_C, layout=gl.SliceLayout(0, dq))
        feats = f0 + gl.arange(0, BLOCK_F, layout=gl.SliceLayout(1, dq))
        w_smem.store(gl.load(w_ptr + feats[:, None].to(gl.int64) * s_wn + cols[None, :],
                             mask=(feats < N)[:, None], other=0.0))

    @gluon.jit
    def _store_rows(acc, bias_ptr, o_ptrs, o_rows, o_cols, o_mask, n, N: gl.constexpr, HAS_BIAS: gl.constexpr,
                    out_l: gl.constexpr):
        """The epilogue: + bias, rows past n exactly 0 (no bias), rounded to the output dtype."""
        res = gl.convert_layout(acc, out_l)
        if HAS_BIAS:
            res += gl.load(bias_ptr + o_cols, mask=o_cols < N, other=0.0).to(gl.float32)[None, :]
        res = gl.where((o_rows < n)[:, None], res, 0.0)
        gl.store(o_ptrs, res.to(o_ptrs.dtype.element_ty), mask=o_mask)

    @gluon.jit
    def _gluon_rebuild_kernel(
        packed_ptr, scale_ptr, zero_ptr, w_ptr, bias_ptr, out_ptr, length_ptr,
        L, s_pb, s_pl, s_sb, s_sl, s_zb, s_zl, s_wn, s_ob, s_ol,
        C: gl.constexpr, N: gl.constexpr, GROUP: gl.constexpr, HAS_BIAS: gl.constexpr,
        BLOCK_N: gl.constexpr, BLOCK_C: gl.constexpr, BLOCK_F: gl.constexpr, NUM_BUF: gl.constexpr,
        num_warps: gl.constexpr,
    ):
        num_row_blocks = gl.cdiv(L, BLOCK_N)
        b = (gl.program_id(0) // num_row_blocks).to(gl.int64)
        r0 = (gl.program_id(0) % num_row_blocks) * BLOCK_N
        f0 = gl.program_id(1) * BLOCK_F
        n = gl.minimum(gl.maximum(gl.load(length_ptr).to(gl.int32), 0), L)

        out_l: gl.constexpr = gl.BlockedLayout([1, 4], [4, 8], [num_warps, 1], [1, 0])
        o_rows = r0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, out_l))
        o_cols = f0 + gl.arange(0, BLOCK_F, layout=gl.SliceLayout(0, out_l))
        o_ptrs = out_ptr + b * s_ob + o_rows.to(gl.int64)[:, None] * s_ol + o_cols[None, :]
        o_mask = (o_rows < L)[:, None] & (o_cols < N)[None, :]
        if r0 >= n:  # a row block past the fill: zeros (one CUDA graph serves every fill)
            gl.store(o_ptrs, gl.zeros((BLOCK_N, BLOCK_F), out_ptr.dtype.element_ty, out_l), mask=o_mask)
            return

        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                             instr_shape=[16, BLOCK_F, 16])
        # shared memory: NUM_BUF tiles of X̂ [BLOCK_N, BLOCK_C] and of W [BLOCK_F, BLOCK_C]
        dtype: gl.constexpr = w_ptr.dtype.element_ty
        x_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_C], dtype)
        w_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_F, BLOCK_C], dtype)
        x_buf = gl.allocate_shared_memory(dtype, [NUM_BUF, BLOCK_N, BLOCK_C], x_sl)
        w_buf = gl.allocate_shared_memory(dtype, [NUM_BUF, BLOCK_F, BLOCK_C], w_sl)

        acc = gl.zeros((BLOCK_N, BLOCK_F), gl.float32, acc_layout)
        for i in range(C // BLOCK_C):
            slot = i % NUM_BUF
            # the slot was last read by MMA i - NUM_BUF, retired by the wait of step i - NUM_BUF + 1
            _dequant_step(packed_ptr, scale_ptr, zero_ptr, w_ptr, x_buf.index(slot), w_buf.index(slot), b, r0, f0,
                          n, i, s_pb, s_pl, s_sb, s_sl, s_zb, s_zl, s_wn, N, GROUP, BLOCK_N, BLOCK_C, BLOCK_F,
                          num_warps)
            fence_async_shared()  # the generic-proxy stores before the async-proxy (wgmma) reads
            acc = warpgroup_mma(x_buf.index(slot), w_buf.index(slot).permute((1, 0)), acc, is_async=True)
            # keep this MMA in flight while the next step dequantizes
            acc, _, _ = warpgroup_mma_wait(num_outstanding=1, deps=(acc, x_buf.index(slot), w_buf.index(slot)))
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        _store_rows(acc, bias_ptr, o_ptrs, o_rows, o_cols, o_mask, n, N, HAS_BIAS, out_l)

    @gluon.jit
    def _ws_mma_partition(x_buf, w_buf, ready, empty, NUM_STEPS: gl.constexpr, NUM_BUF: gl.constexpr,
                          BLOCK_N: gl.constexpr, BLOCK_F: gl.constexpr, acc_layout: gl.constexpr):
        """The MMA warpgroup: waits for step i's buffers, issues its MMA asynchronously, waits until only
        that one is pending (wait(1)) and hands the buffers of MMA i - 1 back to the dequantizing warps."""
        acc = gl.zeros((BLOCK_N, BLOCK_F), gl.float32, acc_layout)
        for i in range(NUM_STEPS):
            slot = i % NUM_BUF
            mbarrier.wait(ready.index(slot), (i // NUM_BUF) & 1)
            acc = warpgroup_mma(x_buf.index(slot), w_buf.index(slot).permute((1, 0)), acc, is_async=True)
            acc, _, _ = warpgroup_mma_wait(num_outstanding=1, deps=(acc, x_buf.index(slot), w_buf.index(slot)))
            if i > 0:
                mbarrier.arrive(empty.index((i - 1) % NUM_BUF))
        # a tuple, which triton 3.6's warp_specialize requires of a partition's results (3.9 takes either)
        return (warpgroup_mma_wait(num_outstanding=0, deps=(acc,)),)

    @gluon.jit
    def _ws_dequant_partition(packed_ptr, scale_ptr, zero_ptr, w_ptr, x_buf, w_buf, ready, empty, b, r0, f0, n,
                              s_pb, s_pl, s_sb, s_sl, s_zb, s_zl, s_wn, N: gl.constexpr, GROUP: gl.constexpr,
                              NUM_STEPS: gl.constexpr, NUM_BUF: gl.constexpr, BLOCK_N: gl.constexpr,
                              BLOCK_C: gl.constexpr, BLOCK_F: gl.constexpr, WARPS: gl.constexpr):
        """The dequantizing warps: fill buffer i % NUM_BUF once MMA i - NUM_BUF has retired (a fresh
        barrier passes the first round at once), then signal it ready."""
        for i in range(NUM_STEPS):
            slot = i % NUM_BUF
            mbarrier.wait(empty.index(slot), ((i // NUM_BUF) & 1) ^ 1)
            _dequant_step(packed_ptr, scale_ptr, zero_ptr, w_ptr, x_buf.index(slot), w_buf.index(slot), b, r0, f0,
                          n, i, s_pb, s_pl, s_sb, s_sl, s_zb, s_zl, s_wn, N, GROUP, BLOCK_N, BLOCK_C, BLOCK_F, WARPS)
            fence_async_shared()  # each thread's generic-proxy stores before the async-proxy reads ...
            partition_barrier()  # ... and all of this partition's stores before its one arrive (thread 0)
            mbarrier.arrive(ready.index(slot))

    @gluon.jit
    def _gluon_rebuild_ws_kernel(
        packed_ptr, scale_ptr, zero_ptr, w_ptr, bias_ptr, out_ptr, length_ptr,
        L, s_pb, s_pl, s_sb, s_sl, s_zb, s_zl, s_wn, s_ob, s_ol,
        C: gl.constexpr, N: gl.constexpr, GROUP: gl.constexpr, HAS_BIAS: gl.constexpr,
        BLOCK_N: gl.constexpr, BLOCK_C: gl.constexpr, BLOCK_F: gl.constexpr, NUM_BUF: gl.constexpr,
        DEQUANT_WARPS: gl.constexpr, DEQUANT_REGS: gl.constexpr, num_warps: gl.constexpr,
    ):
        """The same rebuild, warp-specialized: ``DEQUANT_WARPS`` warps dequantize into the NUM_BUF
        buffers while the kernel's own warpgroup (``num_warps`` = 4) issues the MMAs; ready/empty
        mbarriers per buffer hand them over."""
        num_row_blocks = gl.cdiv(L, BLOCK_N)
        b = (gl.program_id(0) // num_row_blocks).to(gl.int64)
        r0 = (gl.program_id(0) % num_row_blocks) * BLOCK_N
        f0 = gl.program_id(1) * BLOCK_F
        n = gl.minimum(gl.maximum(gl.load(length_ptr).to(gl.int32), 0), L)

        out_l: gl.constexpr = gl.BlockedLayout([1, 4], [4, 8], [num_warps, 1], [1, 0])
        o_rows = r0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, out_l))
        o_cols = f0 + gl.arange(0, BLOCK_F, layout=gl.SliceLayout(0, out_l))
        o_ptrs = out_ptr + b * s_ob + o_rows.to(gl.int64)[:, None] * s_ol + o_cols[None, :]
        o_mask = (o_rows < L)[:, None] & (o_cols < N)[None, :]
        if r0 >= n:  # a row block past the fill: zeros
            gl.store(o_ptrs, gl.zeros((BLOCK_N, BLOCK_F), out_ptr.dtype.element_ty, out_l), mask=o_mask)
            return

        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                             instr_shape=[16, BLOCK_F, 16])
        dtype: gl.constexpr = w_ptr.dtype.element_ty
        x_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_C], dtype)
        w_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_F, BLOCK_C], dtype)
        x_buf = gl.allocate_shared_memory(dtype, [NUM_BUF, BLOCK_N, BLOCK_C], x_sl)
        w_buf = gl.allocate_shared_memory(dtype, [NUM_BUF, BLOCK_F, BLOCK_C], w_sl)
        ready = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
        for k in gl.static_range(NUM_BUF):
            mbarrier.init(ready.index(k), count=1)
            mbarrier.init(empty.index(k), count=1)

        NUM_STEPS: gl.constexpr = C // BLOCK_C
        # DEQUANT_REGS: the dequantizing warps' register count, 0 for none (no reallocation between the
        # partitions). Triton 3.6 requires a count; the partitions are written out twice because a Gluon
        # kernel cannot hold the list of (function, arguments) in a variable.
        if DEQUANT_REGS == 0:
            results = gl.warp_specialize([
                (_ws_mma_partition, (x_buf, w_buf, ready, empty, NUM_STEPS, NUM_BUF, BLOCK_N, BLOCK_F, acc_layout)),
                (_ws_dequant_partition, (packed_ptr, scale_ptr, zero_ptr, w_ptr, x_buf, w_buf, ready, empty, b, r0,
                                         f0, n, s_pb, s_pl, s_sb, s_sl, s_zb, s_zl, s_wn, N, GROUP, NUM_STEPS,
                                         NUM_BUF, BLOCK_N, BLOCK_C, BLOCK_F, DEQUANT_WARPS)),
            ], [DEQUANT_WARPS])
        else:
            results = gl.warp_specialize([
                (_ws_mma_partition, (x_buf, w_buf, ready, empty, NUM_STEPS, NUM_BUF, BLOCK_N, BLOCK_F, acc_layout)),
                (_ws_dequant_partition, (packed_ptr, scale_ptr, zero_ptr, w_ptr, x_buf, w_buf, ready, empty, b, r0,
                                         f0, n, s_pb, s_pl, s_sb, s_sl, s_zb, s_zl, s_wn, N, GROUP, NUM_STEPS,
                                         NUM_BUF, BLOCK_N, BLOCK_C, BLOCK_F, DEQUANT_WARPS)),
            ], [DEQUANT_WARPS], [DEQUANT_REGS])
        acc = results[0]
        for k in gl.static_range(NUM_BUF):
            mbarrier.invalidate(ready.index(k))
            mbarrier.invalidate(empty.index(k))
        _store_rows(acc, bias_ptr, o_ptrs, o_rows, o_cols, o_mask, n, N, HAS_BIAS, out_l)


def supports(weight: torch.Tensor, bits: int, group_size: int) -> bool:
    """Whether the Gluon kernel handles this rebuild (else: the plain-Triton ``dequant_project``)."""
    return (HAS_GLUON and bits == 4 and weight.dtype in (torch.bfloat16, torch.float16)
            and group_size % BLOCK_C == 0 and weight.shape[1] % BLOCK_C == 0)


def worker_regs_optional() -> bool:
    """Whether ``gl.warp_specialize`` lets a kernel leave its worker partitions' register counts to the
    compiler (triton 3.9; 3.6 requires them). Leaving them out, the compiler sizes the whole kernel; giving
    them, triton 3.6 reserves 255 registers per thread for the kernel (one program of 8 warps per SM)."""
    import inspect

    return inspect.signature(gl.warp_specialize).parameters["worker_num_regs"].default is None


def dequant_warp_regs(requested: int | None) -> int:
    """The warp-specialized kernel's DEQUANT_REGS: ``requested``, else 0 (no register reallocation) where
    the count is optional (:func:`worker_regs_optional`), else 96 (what the whole kernel needs per thread
    without reallocation, compiled by 3.9)."""
    if requested is not None:
        return requested
    return 0 if worker_regs_optional() else 96


def dequant_project_gluon_launch(packed, scale, zero, weight, bias: Optional[torch.Tensor], length, bits: int,
                                 group_size: int, *, warp_specialize: bool = False, block_n: int = 64,
                                 block_f: int = 128, num_buf: int = 2, dequant_warps: int = 4,
                                 dequant_regs: int | None = None):
    """(kernel, grid, args, kwargs, out) of one launch with ``dequant_project``'s arguments and
    semantics; the caller launches ``kernel[grid](*args, **kwargs)`` (the compile report compiles it
    instead). ``warp_specialize``: the kernel whose ``dequant_warps`` warps dequantize for a separate
    MMA warpgroup, instead of one warpgroup doing both (``dequant_regs``: their register count, see
    :func:`dequant_warp_regs`). Raises ValueError for what :func:`supports` rejects."""
    from xq_compile.kernels.dequant_project import _check_inputs

    _check_inputs(packed, scale, zero, weight, bias, length, bits, group_size)
    if not supports(weight, bits, group_size):
        raise ValueError(f"the Gluon rebuild takes 4-bit codes, 16-bit weights and scale groups / widths that are "
                         f"multiples of {BLOCK_C} (got bits={bits}, {weight.dtype}, group {group_size}, "
                         f"width {weight.shape[1]}, Gluon {'present' if HAS_GLUON else 'absent'}): use "
                         "dequant_project")
    inner = {"packed": packed.stride(2), "scale": scale.stride(2), "zero": zero.stride(2), "weight": weight.stride(1)}
    if any(stride != 1 for stride in inner.values()):
        raise ValueError(f"the Gluon rebuild reads rows with unit inner strides, got {inner}: use dequant_project")
    batch, max_len, _ = packed.shape
    out_features, hidden = weight.shape
    out = torch.empty((batch, max_len, out_features), device=packed.device, dtype=weight.dtype)
    grid = (batch * -(-max_len // block_n), -(-out_features // block_f))
    args = (packed, scale, zero, weight, weight if bias is None else bias, out, length, max_len,
            packed.stride(0), packed.stride(1), scale.stride(0), scale.stride(1), zero.stride(0), zero.stride(1),
            weight.stride(0), out.stride(0), out.stride(1))
    kwargs = dict(C=hidden, N=out_features, GROUP=group_size, HAS_BIAS=bias is not None, BLOCK_N=block_n,
                  BLOCK_C=BLOCK_C, BLOCK_F=block_f, NUM_BUF=num_buf, num_warps=4)  # one MMA warpgroup
    if warp_specialize:
        return _gluon_rebuild_ws_kernel, grid, args, {**kwargs, "DEQUANT_WARPS": dequant_warps,
                                                       "DEQUANT_REGS": dequant_warp_regs(dequant_regs)}, out
    return _gluon_rebuild_kernel, grid, args, kwargs, out


def dequant_project_gluon(packed, scale, zero, weight, bias, length, bits: int, group_size: int,
                          **blocks) -> torch.Tensor:
    """``dequant_project`` through the Gluon kernel (CUDA tensors on sm_90; see :func:`supports`)."""
    kernel, grid, args, kwargs, out = dequant_project_gluon_launch(packed, scale, zero, weight, bias, length,
                                                                   bits, group_size, **blocks)
    if out.numel():
        kernel[grid](*args, **kwargs)
    return out
