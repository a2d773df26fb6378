"""A Gluon K rebuild for Hopper (sm_90): K = X̂ · Wᵀ from 4-bit per-token codes, with the MMA of one
channel step in flight while the next step is dequantized. **Compile-only prototype**: Gluon kernels do
not run under the Triton interpreter, so on CPU this is checked by what it compiles to
(``benchmarks/compile_report.py --gluon``: ``wgmma.wait_group 1`` in the PTX), and its correctness test
(``tests/test_gluon_rebuild.py``) needs a GPU. The tested kernels are the plain-Triton ones
(``dequant_project``, ``decode_attention``); nothing dispatches here yet.

Why Gluon: Triton's pipeliner makes a dot asynchronous only when its shared-memory operand comes from a
pipelined load; a tile dequantized in the loop never is (``docs/kernels.md``). In Gluon the kernel owns
the shared memory and the waits: the dequantized X̂ tile goes into one of ``NUM_BUF`` (>= 2) bf16
buffers, the MMA reading it is issued asynchronously, and the wait that follows leaves one group
pending (``warpgroup_mma_wait(1)``), so step i's MMA runs while step i + 1 is dequantized; the buffer
step i + 1 overwrites belonged to MMA i - 1, which that wait has retired.

Layout: ``packed`` uint8 [L, C/2] (two codes per byte, low nibble first, as :mod:`xq_compile.quant`),
``scale``/``zero`` fp16 [L, C / GROUP], ``weight`` [N, C] in the model dtype (bf16), ``out`` fp32 [L, N].
Rows >= n (``length`` on the device) are not written.
"""

from __future__ import annotations

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, warpgroup_mma,
                                                                   warpgroup_mma_wait)
except ImportError:  # triton < 3.4 (or without Gluon): the plain-Triton kernels are the only path
    gluon = None

HAS_GLUON = gluon is not None

if HAS_GLUON:

    @gluon.jit
    def _gluon_rebuild_kernel(
        packed_ptr, scale_ptr, zero_ptr, w_ptr, out_ptr, length_ptr,
        L, s_pl, s_sl, s_wn, s_ol,
        C: gl.constexpr, N: gl.constexpr, GROUP: gl.constexpr,
        BLOCK_N: gl.constexpr, BLOCK_C: gl.constexpr, BLOCK_F: gl.constexpr, NUM_BUF: gl.constexpr,
        num_warps: gl.constexpr,
    ):
        r0 = gl.program_id(0) * BLOCK_N
        f0 = gl.program_id(1) * BLOCK_F
        n = gl.minimum(gl.maximum(gl.load(length_ptr).to(gl.int32), 0), L)
        if r0 >= n:
            return

        # registers: the dequantization (8 consecutive channels per thread) and the wgmma accumulator
        dq: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                             instr_shape=[16, BLOCK_F, 16])
        # shared memory: NUM_BUF bf16 tiles of X̂ [BLOCK_N, BLOCK_C] and of W [BLOCK_F, BLOCK_C]
        x_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_C], gl.bfloat16)
        w_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_F, BLOCK_C], gl.bfloat16)
        x_buf = gl.allocate_shared_memory(gl.bfloat16, [NUM_BUF, BLOCK_N, BLOCK_C], x_sl)
        w_buf = gl.allocate_shared_memory(gl.bfloat16, [NUM_BUF, BLOCK_F, BLOCK_C], w_sl)

        half: gl.constexpr = gl.BlockedLayout([1, 4], [4, 8], [num_warps, 1], [1, 0])  # the packed bytes
        rows_h = (r0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, half))).to(gl.int64)
        row_ok_h = rows_h < n
        rows = r0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, dq))
        row_ok = rows < n
        rows64 = rows.to(gl.int64)
        cols_in = gl.arange(0, BLOCK_C, layout=gl.SliceLayout(0, dq))
        feats = f0 + gl.arange(0, BLOCK_F, layout=gl.SliceLayout(1, dq))
        acc = gl.zeros((BLOCK_N, BLOCK_F), gl.float32, acc_layout)
        for i in range(C // BLOCK_C):
            slot = i % NUM_BUF
            cols = i * BLOCK_C + cols_in
            # X̂ = code · scale + zero in fp32 (as quant.dequantize), rounded to bf16
            # a row's BLOCK_C / 2 bytes, split into low and high nibbles and interleaved (join + reshape)
            byte_idx = i * (BLOCK_C // 2) + gl.arange(0, BLOCK_C // 2, layout=gl.SliceLayout(0, half))
            byte = gl.load(packed_ptr + rows_h[:, None] * s_pl + byte_idx[None, :], mask=row_ok_h[:, None],
                           other=0).to(gl.int32)
            code = gl.convert_layout(gl.reshape(gl.join(byte & 15, byte >> 4), [BLOCK_N, BLOCK_C]), dq)
            # one scale group per step (GROUP % BLOCK_C == 0): a scale and a zero per row, broadcast
            sz_off = rows64 * s_sl + (i * BLOCK_C) // GROUP
            s = gl.load(scale_ptr + sz_off, mask=row_ok, other=0.0).to(gl.float32)[:, None]
            z = gl.load(zero_ptr + sz_off, mask=row_ok, other=0.0).to(gl.float32)[:, None]
            code_f = (code | 0x4B000000).to(gl.float32, bitcast=True) - 8388608.0
            x = (code_f * s + z).to(gl.bfloat16)
            w = gl.load(w_ptr + feats[:, None].to(gl.int64) * s_wn + cols[None, :],
                        mask=(feats < N)[:, None], other=0.0)
            # the slot was last read by MMA i - NUM_BUF, retired by the wait of step i - NUM_BUF + 1
            x_buf.index(slot).store(x)
            w_buf.index(slot).store(w)
            fence_async_shared()  # the generic-proxy stores before the async-proxy (wgmma) reads
            acc = warpgroup_mma(x_buf.index(slot), w_buf.index(slot).permute((1, 0)), acc, is_async=True)
            # keep this MMA in flight while the next step dequantizes
            acc, _, _ = warpgroup_mma_wait(num_outstanding=1, deps=(acc, x_buf.index(slot), w_buf.index(slot)))
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))

        out_l: gl.constexpr = gl.BlockedLayout([1, 4], [4, 8], [num_warps, 1], [1, 0])
        res = gl.convert_layout(acc, out_l)
        o_rows = r0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, out_l))
        o_cols = f0 + gl.arange(0, BLOCK_F, layout=gl.SliceLayout(0, out_l))
        gl.store(out_ptr + o_rows.to(gl.int64)[:, None] * s_ol + o_cols[None, :], res,
                 mask=(o_rows < n)[:, None] & (o_cols < N)[None, :])


def gluon_rebuild_launch_args(packed, scale, zero, weight, out, length, group: int, block_n: int = 64,
                              block_c: int = 64, block_f: int = 128, num_buf: int = 2, num_warps: int = 4):
    """(kernel, grid, args, kwargs) of one launch: what a caller (or the compile report) launches as
    ``kernel[grid](*args, **kwargs)``."""
    L, C = packed.shape[0], weight.shape[1]
    N = weight.shape[0]
    if C % block_c or group % block_c:
        raise ValueError(f"C={C} and the scale group {group} must be multiples of block_c={block_c}")
    grid = (-(-L // block_n), -(-N // block_f))
    args = (packed, scale, zero, weight, out, length, L, packed.stride(0), scale.stride(0), weight.stride(0),
            out.stride(0))
    kwargs = dict(C=C, N=N, GROUP=group, BLOCK_N=block_n, BLOCK_C=block_c, BLOCK_F=block_f, NUM_BUF=num_buf,
                  num_warps=num_warps)
    return _gluon_rebuild_kernel, grid, args, kwargs
