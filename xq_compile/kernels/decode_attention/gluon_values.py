"""The values stage of ``decode_attention`` (launch 2: Σ p·x̂v per split) in Gluon for Hopper, with its
MMAs in flight. **Opt-in, values checked on a GPU only** (``decode_attention_triton(...,
values_kernel="gluon")``; Gluon does not run under the Triton interpreter): the op's default and the
fallback stay the plain-Triton ``_values_kernel``.

Why: from 64 query rows on (e.g. 7B MHA at S ≥ 2, the GQA latent at S ≥ 4) Triton puts the values dot on
wgmma with the dequantized X̂v as its shared-memory operand and waits for every MMA
(``wait_group 0``, ``docs/kernels.md``). Here each step stores P and X̂v into one of two buffer pairs
and waits with ``warpgroup_mma_wait(1)``. An online softmax would rescale the accumulator every step --
impossible while an MMA into it is in flight -- so the softmax takes two passes over the split's scores
(they are in memory already, written by the scores kernel: R·n floats, next to the n rows of X): the
split's maximum first, then p = exp(s − max) with no rescaling. The split's (acc, max, sum) are those of
the Triton kernel, so the reduce kernel is shared.

Supported (:func:`supports`): a 4-bit per-token value source with scale groups and width multiples of
64, no col0 on the value rows, a 16-bit model dtype.
"""

from __future__ import annotations

import torch

from xq_compile.kernels import gluon_rebuild
from xq_compile.kernels.decode_attention.config import interpreted

HAS_GLUON = gluon_rebuild.HAS_GLUON
BLOCK_M = 64  # query rows per program: one wgmma M tile (4 warps)
BLOCK_N = 64  # cached rows per step
BLOCK_CV = 64  # value channels per program (one scale group)

if HAS_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, warpgroup_mma,
                                                                   warpgroup_mma_wait)

    from xq_compile.kernels.gluon_rebuild import dequant_x4

    @gluon.jit
    def _values_step(sc_rows, vp_ptr, vs_ptr, vz_ptr, p_smem, x_smem, acc, l_i, m_safe, m_ok, j_in, b, j0, end, c0,
                     s_cl_, s_pb, s_pl, s_sb, s_sl, s_zb, s_zl, USE_ACC: gl.constexpr, GROUP: gl.constexpr,
                     BLOCK_N: gl.constexpr, BLOCK_CV: gl.constexpr, WARPS: gl.constexpr, DTYPE: gl.constexpr):
        """Rows j0 .. j0 + BLOCK_N of the split: p = exp(s - max) into p_smem, X̂v into x_smem, the MMA
        acc += P·X̂v issued and left in flight (only it pending on return); returns (acc, l + Σ p)."""
        rows = j0 + j_in
        s = gl.load(sc_rows + rows.to(gl.int64)[None, :] * s_cl_, mask=m_ok[:, None] & (rows < end)[None, :],
                    other=float("-inf"))
        p = gl.exp(s - m_safe[:, None])
        p_smem.store(p.to(DTYPE))
        x_smem.store(dequant_x4(vp_ptr, vs_ptr, vz_ptr, b, j0, end, c0, s_pb, s_pl, s_sb, s_sl, s_zb, s_zl, GROUP,
                                BLOCK_N, BLOCK_CV, WARPS, DTYPE))
        fence_async_shared()
        acc = warpgroup_mma(p_smem, x_smem, acc, use_acc=USE_ACC, is_async=True)
        acc, _, _ = warpgroup_mma_wait(num_outstanding=1, deps=(acc, p_smem, x_smem))
        return acc, l_i + gl.sum(p, axis=1)

    @gluon.jit
    def _gluon_values_kernel(
        sc_ptr, vp_ptr, vs_ptr, vz_ptr, length_ptr, acc_ptr, m_ptr, l_ptr,
        L, M_ALL,
        s_cb_, s_cm_, s_cl_, s_pb, s_pl, s_sb, s_sl, s_zb, s_zl,
        s_ab, s_as, s_am, s_ac, s_mb, s_ms, s_mm,
        DTYPE: gl.constexpr, GROUP: gl.constexpr, NUM_SPLITS: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
        BLOCK_CV: gl.constexpr, NUM_BUF: gl.constexpr, num_warps: gl.constexpr,
    ):
        pid_bm = gl.program_id(0)
        split = gl.program_id(1)
        c0 = gl.program_id(2) * BLOCK_CV
        num_mb = gl.cdiv(M_ALL, BLOCK_M)
        b = (pid_bm // num_mb).to(gl.int64)
        m0 = (pid_bm % num_mb) * BLOCK_M
        n = gl.minimum(gl.maximum(gl.load(length_ptr).to(gl.int32), 0), L)
        # this split's rows, as the Triton values kernel cuts them (from the n on the device)
        per_split = gl.cdiv(gl.cdiv(n, NUM_SPLITS), BLOCK_N) * BLOCK_N
        start = split * per_split
        end = gl.minimum(start + per_split, n)

        sl: gl.constexpr = gl.BlockedLayout([1, 4], [2, 16], [num_warps, 1], [1, 0])  # scores [M, N]
        m_idx = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, sl))
        m_ok = m_idx < M_ALL
        ml_off = b * s_mb + split * s_ms + m_idx * s_mm
        if start >= end:  # an empty split (n small): an empty partial result, as the Triton kernel writes
            out_e: gl.constexpr = gl.BlockedLayout([1, 4], [4, 8], [num_warps, 1], [1, 0])
            e_m = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, out_e))
            e_c = c0 + gl.arange(0, BLOCK_CV, layout=gl.SliceLayout(0, out_e))
            gl.store(acc_ptr + b * s_ab + split * s_as + e_m[:, None] * s_am + e_c[None, :] * s_ac,
                     gl.zeros((BLOCK_M, BLOCK_CV), gl.float32, out_e), mask=(e_m < M_ALL)[:, None])
            if c0 == 0:
                gl.store(m_ptr + ml_off, gl.full((BLOCK_M,), float("-inf"), gl.float32, gl.SliceLayout(1, sl)),
                         mask=m_ok)
                gl.store(l_ptr + ml_off, gl.zeros((BLOCK_M,), gl.float32, gl.SliceLayout(1, sl)), mask=m_ok)
            return
        sc_rows = sc_ptr + b * s_cb_ + m_idx.to(gl.int64)[:, None] * s_cm_
        j_in = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, sl))

        # pass 1: the split's maximum per query row
        m_i = gl.full((BLOCK_M,), float("-inf"), gl.float32, gl.SliceLayout(1, sl))
        for j0 in range(start, end, BLOCK_N):
            rows = j0 + j_in
            s = gl.load(sc_rows + rows.to(gl.int64)[None, :] * s_cl_, mask=m_ok[:, None] & (rows < end)[None, :],
                        other=float("-inf"))
            m_i = gl.maximum(m_i, gl.max(s, axis=1))
        m_safe = gl.where(m_i == float("-inf"), 0.0, m_i)  # a row masked so far: p = 0, not NaN

        # pass 2: p = exp(s - max) and acc += p · x̂v (P and X̂v rounded to the model dtype DTYPE), the MMA
        # of step i in flight while step i + 1 is built. The first step is peeled off: with the loop
        # possibly running zero times, its accumulator would otherwise be defined by plain moves on the
        # skip path, and ptxas serializes such wgmmas (C7515).
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                             instr_shape=[16, BLOCK_CV, 16])
        p_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_N], DTYPE)
        x_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_CV], DTYPE)
        p_buf = gl.allocate_shared_memory(DTYPE, [NUM_BUF, BLOCK_M, BLOCK_N], p_sl)
        x_buf = gl.allocate_shared_memory(DTYPE, [NUM_BUF, BLOCK_N, BLOCK_CV], x_sl)
        acc = gl.zeros((BLOCK_M, BLOCK_CV), gl.float32, acc_layout)
        acc, l_i = _values_step(sc_rows, vp_ptr, vs_ptr, vz_ptr, p_buf.index(0), x_buf.index(0), acc,
                                gl.zeros((BLOCK_M,), gl.float32, gl.SliceLayout(1, sl)), m_safe, m_ok, j_in, b,
                                start, end, c0, s_cl_, s_pb, s_pl, s_sb, s_sl, s_zb, s_zl, False, GROUP, BLOCK_N,
                                BLOCK_CV, num_warps, DTYPE)
        for step in range(1, gl.cdiv(end - start, BLOCK_N)):
            # the slot was last read by the MMA two steps back, retired by the previous step's wait(1)
            slot = step % NUM_BUF
            acc, l_i = _values_step(sc_rows, vp_ptr, vs_ptr, vz_ptr, p_buf.index(slot), x_buf.index(slot), acc,
                                    l_i, m_safe, m_ok, j_in, b, start + step * BLOCK_N, end, c0, s_cl_, s_pb, s_pl,
                                    s_sb, s_sl, s_zb, s_zl, True, GROUP, BLOCK_N, BLOCK_CV, num_warps, DTYPE)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))

        out_l: gl.constexpr = gl.BlockedLayout([1, 4], [4, 8], [num_warps, 1], [1, 0])
        res = gl.convert_layout(acc, out_l)
        o_m = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, out_l))
        o_c = c0 + gl.arange(0, BLOCK_CV, layout=gl.SliceLayout(0, out_l))
        gl.store(acc_ptr + b * s_ab + split * s_as + o_m[:, None] * s_am + o_c[None, :] * s_ac, res,
                 mask=(o_m < M_ALL)[:, None])
        if c0 == 0:
            gl.store(m_ptr + ml_off, m_i, mask=m_ok)
            gl.store(l_ptr + ml_off, l_i, mask=m_ok)


def supports(values, col0, dtype: torch.dtype, v_width: int) -> bool:
    """Whether the Gluon values kernel takes this value source (else: the Triton one). Never under the
    Triton interpreter, which cannot run Gluon."""
    return (HAS_GLUON and not interpreted() and values.layout == "per_token" and values.bits == 4 and values.group % BLOCK_CV == 0
            and v_width % BLOCK_CV == 0 and col0 is None and dtype in (torch.bfloat16, torch.float16)
            and values.packed.stride(2) == 1 and values.scale.stride(2) == 1 and values.zero.stride(2) == 1)
