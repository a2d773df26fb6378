"""The Triton kernels of ``xq_compile::decode_attention`` and their launcher,
:func:`decode_attention_triton` (what the op's CUDA kernel calls; see the package docstring for the
five launches and why).

Triton is optional: without it this module imports and :data:`HAS_TRITON` is False; only the launcher
raises (asking to install triton).
"""

from __future__ import annotations

import torch

from xq_compile.kernels.decode_attention import config as launch_config
from xq_compile.kernels.decode_attention.config import GLUON_AUTO, pow2_at_least_16
from xq_compile.kernels.decode_attention.inputs import DecodeAttentionInputs, QuantizedSource
from xq_compile.kernels.devices import GpuTarget, gpu_target
from xq_compile.kernels.tiles import next_power_of_2, scale_broadcast

try:  # Triton is an optional dependency (pip install 'xq-compile[triton]').
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised by a subprocess test that hides triton
    triton = None
    tl = None

HAS_TRITON = triton is not None

if HAS_TRITON:
    from xq_compile.kernels.tiles import dequant_tile, offset64

    @triton.jit
    def _dot(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        """tl.dot(a, b, acc). UPCAST (set for CPU tensors, i.e. under the Triton interpreter, whose bf16
        tl.dot is wrong in triton 3.x) first converts the operands to fp32, exactly: bf16·bf16 products
        are exact in fp32, so only the fp32 accumulation order can differ from the tensor cores."""
        if UPCAST:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            return tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    @triton.jit
    def _fill(length_ptr, b, s_len, L):
        """n, the cache fill of batch row ``b``, read on the device and clamped to [0, L] (``s_len`` 0: one
        fill for every row; else the stride of the per-row fills, e.g. vLLM's seq_lens)."""
        n = tl.load(length_ptr + b * s_len).to(tl.int32)
        return tl.minimum(tl.maximum(n, 0), L)

    @triton.jit
    def _first_row(n, S, window, WINDOWED: tl.constexpr):
        """The first of the n rows some query token sees (0 without a window): the first of the S tokens,
        at row n - S, sees the ``window - 1`` rows before its own (DecodeAttentionInputs.first_row)."""
        if WINDOWED:
            return tl.maximum(n - S + 1 - window, 0)
        else:
            return n * 0

    @triton.jit
    def _soft_capped(scores, soft_cap):
        """soft_cap · tanh(scores / soft_cap) (Gemma 2), tanh as 1 - 2 / (exp(2x) + 1): exact at both ends
        (exp overflowing to inf gives 1, underflowing to 0 gives -1) and in the interpreter, which has no
        libdevice."""
        return soft_cap * (1.0 - 2.0 / (tl.exp(2.0 * scores / soft_cap) + 1.0))

    @triton.jit
    def _rope_cos_sin(pos_ptr, freq_ptr, b, rows, row_ok, dh, f_ok, s_posb, s_posl, rope_scale,
                      dtype: tl.constexpr, FAST_TRIG: tl.constexpr):
        """HF's default rotary embedding at the cached rows, [rows, features] in fp32: cos/sin of the
        angle pos·inv_freq[dh] (an fp32 product, as transformers computes it), times ``rope_scale``,
        rounded to the model dtype like transformers' tables -- computed instead of read (a table row
        costs 4·D bytes of cos and sin; this costs a few instructions per element after the K loop).

        The angle is first reduced to [-π, π] (Cody-Waite, two FMAs with 2π split in two fp32 parts:
        exact to ~k·1e-14 for k turns), so the hardware's fast cos/sin (``FAST_TRIG``: MUFU, absolute
        error 2^-20.5 on that range) can be used; the interpreter has no libdevice and takes tl.cos/sin.
        """
        pos = tl.load(pos_ptr + b * s_posb + offset64(rows, s_posl), mask=row_ok, other=0).to(tl.float32)
        freq = tl.load(freq_ptr + dh, mask=f_ok, other=0.0)
        angle = pos[:, None] * freq[None, :]
        turns = tl.extra.cuda.libdevice.rint(angle * 0.15915494309189535) if FAST_TRIG else \
            tl.floor(angle * 0.15915494309189535 + 0.5)
        reduced = tl.fma(turns, -6.2831854820251465, angle)  # 2π rounded to fp32 ...
        reduced = tl.fma(turns, 1.7484556000744883e-07, reduced)  # ... and what that rounding left out
        if FAST_TRIG:
            c = tl.extra.cuda.libdevice.fast_cosf(reduced)
            s = tl.extra.cuda.libdevice.fast_sinf(reduced)
        else:
            c = tl.cos(reduced)
            s = tl.sin(reduced)
        c = (c * rope_scale).to(dtype).to(tl.float32)
        s = (s * rope_scale).to(dtype).to(tl.float32)
        return c, s

    @triton.jit
    def _rebuild_step(
        k, c0, kp_ptr, ks_ptr, kz_ptr, kt_ptr, c0_ptr, w_ptr, w_rows, f2_ok, b, r0, n, n_full, C: tl.constexpr, P,
        s_pb, s_pl, s_pp, s_sb, s_sl, s_sc, s_zb, s_zl, s_zc, s_tb, s_tl, s_tc, s_cb, s_cl, s_wn, s_wk,
        bt_ptr, s_btb, s_btr, PAGE_SIZE: tl.constexpr,
        BITS: tl.constexpr, GROUP: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_COL0: tl.constexpr,
        SCALE_BCAST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, PAGED: tl.constexpr,
        CLAMP_ROWS: tl.constexpr, X_AS_B: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):
        """k + X̂[:, c0 : c0 + BLOCK_C] · Wkᵀ[c0 : c0 + BLOCK_C, w_rows]: one step of :func:`_rebuild_k`
        (``X_AS_B``: the transpose, kᵀ + Wk[w_rows, c0 : c0 + BLOCK_C] · X̂ᵀ)."""
        # C a multiple of BLOCK_C (576, 1024, 4096, ...): no channel masks, the loads' predicates are the
        # rows', the same every step
        EVEN_C: tl.constexpr = C % BLOCK_C == 0
        x = dequant_tile(
            kp_ptr, ks_ptr, kz_ptr, kt_ptr, c0_ptr, b, r0, n, c0, n_full, C, P,
            s_pb, s_pl, s_pp, s_sb, s_sl, s_sc, s_zb, s_zl, s_zc, s_tb, s_tl, s_tc, s_cb, s_cl,
            bt_ptr, s_btb, s_btr, PAGE_SIZE,
            BITS, GROUP, PER_CHANNEL, HAS_COL0, SCALE_BCAST, BLOCK_N, BLOCK_C, PAGED, EVEN_C, CLAMP_ROWS,
        ).to(w_ptr.dtype.element_ty)  # X̂ rounded to the model dtype (as the reference), products in fp32
        cols = c0 + tl.arange(0, BLOCK_C)
        w_mask = ((cols < C) | EVEN_C)[:, None] & f2_ok[None, :]
        w = tl.load(w_ptr + cols[:, None] * s_wk + w_rows[None, :] * s_wn, mask=w_mask, other=0.0)
        # (if / else, not an early return: Triton compiles the statements after a constexpr branch's
        # return as well, and the untaken form's shapes do not fit a tile that is not square)
        if X_AS_B:
            k = _dot(tl.trans(w), tl.trans(x), k, DOT_PRECISION, UPCAST)
        else:
            k = _dot(x, w, k, DOT_PRECISION, UPCAST)
        return k

    @triton.jit
    def _rebuild_k(
        kp_ptr, ks_ptr, kz_ptr, kt_ptr, c0_ptr, w_ptr, w_rows, f2_ok, b, r0, n, n_full, C: tl.constexpr, P,
        s_pb, s_pl, s_pp, s_sb, s_sl, s_sc, s_zb, s_zl, s_zc, s_tb, s_tl, s_tc, s_cb, s_cl, s_wn, s_wk,
        bt_ptr, s_btb, s_btr, PAGE_SIZE: tl.constexpr,
        BITS: tl.constexpr, GROUP: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_COL0: tl.constexpr,
        SCALE_BCAST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, PAGED: tl.constexpr,
        F2: tl.constexpr, CLAMP_ROWS: tl.constexpr, X_AS_B: tl.constexpr, DOT_PRECISION: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        """K = X̂ · Wkᵀ for rows r0 .. r0 + BLOCK_N: fp32 [BLOCK_N, F2], column i the W row ``w_rows[i]``.

        The dequantized tile is the first operand, which wgmma reads from registers, and the Wkᵀ tile -- a
        plain load from global memory -- the second, which Triton's pipeliner prefetches into
        multi-buffered shared memory; so each step's MMAs stay in flight while the next tile is
        dequantized (docs/kernels.md). The loop bound C is a constexpr: with a runtime bound ptxas
        serializes the MMAs for some widths (C7515). ``CLAMP_ROWS``: rows past the fill read the last
        filled row, so no load needs a row mask (per channel: only for blocks below the open token group).
        ``HAS_COL0``: channel 0 comes from col0, in the first step only, which is peeled off the loop
        (selecting it in every step cost the GQA latent's loop a fifth of its instructions).

        ``X_AS_B`` (GPUs without wgmma; their dots are ``mma.sync`` on Ampere, Ada, RTX 50) computes Kᵀ = Wk·X̂ᵀ,
        the dequantized tile the second operand: there each operand fragment belongs to a warp, and Triton
        lays the 8 warps of a 128 x 128 tile out 2 x 4, so the first operand's rows are held -- and
        dequantized -- by 4 warps, the second's columns by 2 (docs/kernels.md). Returned as K all the same."""
        if X_AS_B:
            k = tl.zeros((F2, BLOCK_N), dtype=tl.float32)
        else:
            k = tl.zeros((BLOCK_N, F2), dtype=tl.float32)
        FIRST: tl.constexpr = BLOCK_C if HAS_COL0 else 0
        if HAS_COL0:
            k = _rebuild_step(k, 0, kp_ptr, ks_ptr, kz_ptr, kt_ptr, c0_ptr, w_ptr, w_rows, f2_ok, b, r0, n, n_full,
                              C, P, s_pb, s_pl, s_pp, s_sb, s_sl, s_sc, s_zb, s_zl, s_zc, s_tb, s_tl, s_tc, s_cb,
                              s_cl, s_wn, s_wk, bt_ptr, s_btb, s_btr, PAGE_SIZE, BITS, GROUP, PER_CHANNEL, True,
                              SCALE_BCAST, BLOCK_N, BLOCK_C, PAGED, CLAMP_ROWS, X_AS_B, DOT_PRECISION,
                              UPCAST)
        for c0 in range(FIRST, C, BLOCK_C):
            k = _rebuild_step(k, c0, kp_ptr, ks_ptr, kz_ptr, kt_ptr, c0_ptr, w_ptr, w_rows, f2_ok, b, r0, n, n_full,
                              C, P, s_pb, s_pl, s_pp, s_sb, s_sl, s_sc, s_zb, s_zl, s_zc, s_tb, s_tl, s_tc, s_cb,
                              s_cl, s_wn, s_wk, bt_ptr, s_btb, s_btr, PAGE_SIZE, BITS, GROUP, PER_CHANNEL, False,
                              SCALE_BCAST, BLOCK_N, BLOCK_C, PAGED, CLAMP_ROWS, X_AS_B, DOT_PRECISION,
                              UPCAST)
        if X_AS_B:
            k = tl.trans(k)
        return k

    @triton.jit
    def _scores_kernel(
        q_ptr, kp_ptr, ks_ptr, kz_ptr, kt_ptr, c0_ptr, w_ptr, bias_ptr, cos_ptr, sin_ptr, pos_ptr, freq_ptr,
        mask_ptr, length_ptr, bt_ptr, knw_ptr, out_ptr,
        L, HKV, C: tl.constexpr, P, R, S, GROUP_Q, HALF, qk_scale, rope_scale, s_len, s_btb, s_btr,
        window, soft_cap, k_norm_eps,
        s_qb, s_qh, s_qs, s_qd,
        s_pb, s_pl, s_pp, s_sb, s_sl, s_sc, s_zb, s_zl, s_zc, s_tb, s_tl, s_tc, s_cb, s_cl,
        s_wn, s_wk, s_cosb, s_cosl, s_cosd, s_sinb, s_sinl, s_sind, s_posb, s_posl,
        s_mb, s_mh, s_ms, s_ml,
        s_ob, s_oh, s_or, s_ol,
        BITS: tl.constexpr, GROUP: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_COL0: tl.constexpr,
        HAS_BIAS: tl.constexpr, MASK_KIND: tl.constexpr,  # 0 none, 1 bool (as uint8), 2 additive float
        ROPE_FROM_POSITIONS: tl.constexpr, FAST_TRIG: tl.constexpr,
        DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, SCALE_BCAST: tl.constexpr,
        R_PAD: tl.constexpr, HALF_PAD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_C: tl.constexpr, PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, X_AS_B: tl.constexpr,
        WINDOWED: tl.constexpr, SOFT_CAP: tl.constexpr, KEY_NORM: tl.constexpr,
    ):
        """Scores of BLOCK_H KV heads' query rows against cached rows r0 .. r0 + BLOCK_N.

        The K rebuild is one dequantize-GEMM tile: X̂ [BLOCK_N, C] (dequantized BLOCK_C channels at a
        time, once for all BLOCK_H heads) times the heads' Wkᵀ (:func:`_rebuild_k`), one accumulator of
        2·BLOCK_H·HALF_PAD features split after the loop into the first and the second half of every
        head, so RoPE's rotate_half pairs meet elementwise. The scores then come from one dot with a
        block-diagonal query (each head's rows see only its own features): no per-head slicing of
        registers is needed.

        ``WINDOWED``: a row block no query token sees returns at once (its rows may be freed pages), the
        others mask each token's rows behind its window; the softmax never reads the scores of unseen rows.
        ``KEY_NORM``: each head's keys are RMS-normalized (fp32) between the bias and RoPE; ``SOFT_CAP``:
        the scaled scores are capped before the mask.
        """
        pid_bh = tl.program_id(0)
        r0 = tl.program_id(1) * BLOCK_N
        num_ht = tl.cdiv(HKV, BLOCK_H)
        b = (pid_bh // num_ht).to(tl.int64)  # int64: B * L * stride may exceed 2**31
        n = _fill(length_ptr, b, s_len, L)
        if r0 >= n or r0 + BLOCK_N <= _first_row(n, S, window, WINDOWED):
            return  # past the fill or behind every window: nothing to do (one CUDA graph serves every fill)
        h0 = (pid_bh % num_ht) * BLOCK_H
        n_full = n // GROUP * GROUP
        dtype = w_ptr.dtype.element_ty

        # Features f: (head h0 + f // HALF_PAD, dh = f % HALF_PAD of its first half).
        f = tl.arange(0, BLOCK_H * HALF_PAD)
        dh = f % HALF_PAD
        f_ok = (h0 + f // HALF_PAD < HKV) & (dh < HALF)

        # K = X̂ · Wkᵀ (_rebuild_k). Both halves of every head share one accumulator: columns [0, F) are
        # the first halves' features f, columns [F, 2F) the second halves', so each step issues one dot
        # (one chain of wider MMAs, no copies of the X̂ registers for a second one) and the halves part
        # after the loop without moving data: the split is along the highest column bit, which wgmma's
        # accumulator layout keeps in each thread's registers.
        F: tl.constexpr = BLOCK_H * HALF_PAD
        f2 = tl.arange(0, 2 * F)
        w_rows = (h0 + (f2 % F) // HALF_PAD) * (2 * HALF) + (f2 // F) * HALF + (f2 % F) % HALF_PAD
        f2_ok = (h0 + (f2 % F) // HALF_PAD < HKV) & ((f2 % F) % HALF_PAD < HALF)
        # No row masks in the loop (CLAMP_ROWS: rows past the fill read the last filled row, and get no
        # weight): per token in every row block; per channel in the blocks below the open token group,
        # whose rows all come from codes. The block holding the open group reads its rows from the
        # model-dtype tail, with masks: the same loop compiled a second time (per channel only).
        if not PER_CHANNEL or r0 + BLOCK_N <= n_full:
            k = _rebuild_k(kp_ptr, ks_ptr, kz_ptr, kt_ptr, c0_ptr, w_ptr, w_rows, f2_ok, b, r0, n, n_full, C, P,
                           s_pb, s_pl, s_pp, s_sb, s_sl, s_sc, s_zb, s_zl, s_zc, s_tb, s_tl, s_tc, s_cb, s_cl,
                           s_wn, s_wk, bt_ptr, s_btb, s_btr, PAGE_SIZE,
                           BITS, GROUP, PER_CHANNEL, HAS_COL0, SCALE_BCAST, BLOCK_N, BLOCK_C, PAGED,
                           2 * F, True, X_AS_B, DOT_PRECISION, UPCAST)
        else:
            k = _rebuild_k(kp_ptr, ks_ptr, kz_ptr, kt_ptr, c0_ptr, w_ptr, w_rows, f2_ok, b, r0, n, n_full, C, P,
                           s_pb, s_pl, s_pp, s_sb, s_sl, s_sc, s_zb, s_zl, s_zc, s_tb, s_tl, s_tc, s_cb, s_cl,
                           s_wn, s_wk, bt_ptr, s_btb, s_btr, PAGE_SIZE,
                           BITS, GROUP, PER_CHANNEL, HAS_COL0, SCALE_BCAST, BLOCK_N, BLOCK_C, PAGED,
                           2 * F, False, X_AS_B, DOT_PRECISION, UPCAST)
        k1, k2 = tl.split(tl.permute(tl.reshape(k, (BLOCK_N, 2, F)), (0, 2, 1)))
        if HAS_BIAS:
            w1_rows = (h0 + f // HALF_PAD) * (2 * HALF) + dh
            w2_rows = w1_rows + HALF
            k1 += tl.load(bias_ptr + w1_rows, mask=f_ok, other=0.0).to(tl.float32)[None, :]
            k2 += tl.load(bias_ptr + w2_rows, mask=f_ok, other=0.0).to(tl.float32)[None, :]
        if KEY_NORM:  # mean of squares over each head's D features: its first and its second halves
            squares = tl.reshape(k1 * k1 + k2 * k2, (BLOCK_N, BLOCK_H, HALF_PAD))  # padding features are 0
            inv_rms = tl.rsqrt(tl.sum(squares, axis=2) / (2 * HALF) + k_norm_eps)
            inv_rms = tl.reshape(tl.broadcast_to(inv_rms[:, :, None], (BLOCK_N, BLOCK_H, HALF_PAD)), (BLOCK_N, F))
            k1 = k1 * inv_rms * tl.load(knw_ptr + dh, mask=f_ok, other=0.0)[None, :]
            k2 = k2 * inv_rms * tl.load(knw_ptr + HALF + dh, mask=f_ok, other=0.0)[None, :]

        # RoPE (HF rotate_half): [k1, k2] -> [k1·c1 - k2·s1, k2·c2 + k1·s2], in fp32.
        rows = r0 + tl.arange(0, BLOCK_N)
        row_ok = rows < n
        if ROPE_FROM_POSITIONS:  # HF's default RoPE: both halves share the frequency
            c, s = _rope_cos_sin(pos_ptr, freq_ptr, b, rows, row_ok, dh, f_ok, s_posb, s_posl, rope_scale,
                                 dtype, FAST_TRIG)
            kr1 = (k1 * c - k2 * s).to(dtype)
            kr2 = (k2 * c + k1 * s).to(dtype)
        else:
            t_mask = row_ok[:, None] & f_ok[None, :]
            cos_off = b * s_cosb + offset64(rows, s_cosl)[:, None] + dh[None, :] * s_cosd
            sin_off = b * s_sinb + offset64(rows, s_sinl)[:, None] + dh[None, :] * s_sind
            # (the tables stay in the model dtype until each product: fewer live registers after the loop)
            c1 = tl.load(cos_ptr + cos_off, mask=t_mask, other=0.0)
            s1 = tl.load(sin_ptr + sin_off, mask=t_mask, other=0.0)
            kr1 = (k1 * c1.to(tl.float32) - k2 * s1.to(tl.float32)).to(dtype)
            c2 = tl.load(cos_ptr + cos_off + HALF * s_cosd, mask=t_mask, other=0.0)
            s2 = tl.load(sin_ptr + sin_off + HALF * s_sind, mask=t_mask, other=0.0)
            kr2 = (k2 * c2.to(tl.float32) + k1 * s2.to(tl.float32)).to(dtype)

        # Query rows m: (head h0 + m // R_PAD, row r = g·S + s of the query heads sharing it, in repeat_kv
        # order), as a block-diagonal [BLOCK_H·HALF_PAD, BLOCK_H·R_PAD] operand Qᵀ (each head's rows see
        # only its own features), so the scores of every head of the tile are one product K·Qᵀ.
        m = tl.arange(0, BLOCK_H * R_PAD)
        m_head = h0 + m // R_PAD
        r = m % R_PAD
        m_ok = (m_head < HKV) & (r < R)
        q_head = m_head * GROUP_Q + r // S
        q_tok = r % S
        q_off = b * s_qb + q_head[None, :] * s_qh + q_tok[None, :] * s_qs + dh[:, None] * s_qd
        own = (f // HALF_PAD)[:, None] == (m // R_PAD)[None, :]  # the block-diagonal
        q_mask = f_ok[:, None] & m_ok[None, :] & own
        q1 = tl.load(q_ptr + q_off, mask=q_mask, other=0.0).to(dtype)
        q2 = tl.load(q_ptr + q_off + HALF * s_qd, mask=q_mask, other=0.0).to(dtype)
        sc = tl.zeros((BLOCK_N, BLOCK_H * R_PAD), dtype=tl.float32)
        sc = _dot(kr1, q1, sc, DOT_PRECISION, UPCAST)
        sc = _dot(kr2, q2, sc, DOT_PRECISION, UPCAST)  # [BLOCK_N, BLOCK_H·R_PAD]
        sc = sc * qk_scale
        if SOFT_CAP:
            sc = _soft_capped(sc, soft_cap)
        st_mask = row_ok[:, None] & m_ok[None, :]
        if MASK_KIND != 0:
            m_off = (b * s_mb + offset64(q_head, s_mh)[None, :] + offset64(q_tok, s_ms)[None, :]
                     + offset64(rows, s_ml)[:, None])
            mv = tl.load(mask_ptr + m_off, mask=st_mask, other=0)
            if MASK_KIND == 1:
                sc = tl.where(mv != 0, sc, float("-inf"))
            else:
                sc = sc + mv.to(tl.float32)
        if WINDOWED:  # token q_tok, at row n - S + q_tok, sees rows j > n - S + q_tok - window
            sc = tl.where(rows[:, None] > (n - S + q_tok - window)[None, :], sc, float("-inf"))
        o_off = b * s_ob + offset64(m_head, s_oh)[None, :] + offset64(r, s_or)[None, :] + rows[:, None] * s_ol
        tl.store(out_ptr + o_off, sc, mask=st_mask)

    @triton.jit
    def _query_row_block(pid, M_ALL, BLOCK: tl.constexpr):
        """(batch row b, its flattened query rows m, m < M_ALL) of program ``pid`` along a grid axis of
        B · cdiv(M_ALL, BLOCK) blocks of query rows (the softmax, values and combine kernels')."""
        num_mb = tl.cdiv(M_ALL, BLOCK)
        m = (pid % num_mb) * BLOCK + tl.arange(0, BLOCK)
        return (pid // num_mb).to(tl.int64), m, m < M_ALL

    @triton.jit
    def _split_rows(n, lo, split, NUM_SPLITS: tl.constexpr, ROW_BLOCK: tl.constexpr):
        """(start, end): the rows of split ``split`` -- rows ``lo`` (the first one seen, rounded down to a
        ROW_BLOCK boundary) to n cut into NUM_SPLITS chunks of whole ROW_BLOCK blocks, from the n on the
        device (so every fill spreads over all splits). The softmax and the values kernel cut alike, so a
        split's probabilities share one maximum."""
        first = lo // ROW_BLOCK * ROW_BLOCK
        per_split = tl.cdiv(tl.cdiv(n - first, NUM_SPLITS), ROW_BLOCK) * ROW_BLOCK
        start = first + split * per_split
        return start, tl.minimum(start + per_split, n)

    @triton.jit
    def _split_scores(sc_ptr, s_rows, cols, m_ok, end, lo, s_cl, WINDOWED: tl.constexpr):
        """One block of a split's scores, -inf past its end and, with a window, before the first row seen
        (``lo``: the scores kernel did not write those)."""
        ok = cols < end
        if WINDOWED:
            ok = ok & (cols >= lo)
        return tl.load(sc_ptr + s_rows + cols[None, :] * s_cl, mask=m_ok[:, None] & ok[None, :], other=float("-inf"))

    @triton.jit
    def _softmax_kernel(
        sc_ptr, p_ptr, m_ptr, l_ptr, length_ptr, L, M_ALL, s_len, S, window,
        s_cb, s_cm, s_cl, s_pb, s_pm, s_pl, s_mb, s_ms, s_mm,
        P_DTYPE: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr,
        ROW_BLOCK: tl.constexpr, WINDOWED: tl.constexpr,
    ):
        """The probabilities of BLOCK_M flattened query rows against one split's cached rows: the split's
        maximum per row, p = exp(s - max) written in the model dtype (the values kernel's MMA operand), the
        maximum and the sum of the unrounded p (fp32) for the reduce. With p in memory, the values kernel
        reads it as a plain tile (see ``_values_kernel``); one program per (rows, split) spreads the
        exponentials over the GPU (one per row would leave one multiprocessor to do them all at S = 1).

        p is written up to the split's end rounded up to ROW_BLOCK (the values kernel's row block; BLOCK_L
        is a multiple of it), zeros past n: the values kernel then loads whole blocks without a row mask.
        With a window, the rows of the first block before the first one seen (``lo``) read -inf: the scores
        kernel did not write them."""
        pid = tl.program_id(0)
        split = tl.program_id(1)
        b, m, m_ok = _query_row_block(pid, M_ALL, BLOCK_M)
        n = _fill(length_ptr, b, s_len, L)
        lo = _first_row(n, S, window, WINDOWED)
        start, end = _split_rows(n, lo, split, NUM_SPLITS, ROW_BLOCK)
        s_rows = b * s_cb + offset64(m, s_cm)[:, None]
        top = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        for j0 in range(start, end, BLOCK_L):
            cols = j0 + tl.arange(0, BLOCK_L)
            s = _split_scores(sc_ptr, s_rows, cols, m_ok, end, lo, s_cl, WINDOWED)
            top = tl.maximum(top, tl.max(s, axis=1))
        # A row with every score -inf (masked, or an empty split) keeps p = exp(-inf) = 0 instead of
        # exp(-inf + inf) = NaN: a maximum of at least the lowest finite fp32 changes nothing else (and the
        # reduce weighs such a split by exp(-FLT_MAX - max) = 0). One use of the loop's result, as triton
        # 3.6's thread-locality pass requires: a comparison and a select asserted there.
        top = tl.maximum(top, -3.4028234663852886e38)
        total = tl.zeros((BLOCK_M,), dtype=tl.float32)
        p_rows = b * s_pb + offset64(m, s_pm)[:, None]
        end_pad = tl.cdiv(end, ROW_BLOCK) * ROW_BLOCK
        for j0 in range(start, end, BLOCK_L):
            cols = j0 + tl.arange(0, BLOCK_L)
            s = _split_scores(sc_ptr, s_rows, cols, m_ok, end, lo, s_cl, WINDOWED)
            p = tl.exp(s - top[:, None])  # 0 past the split's end
            total += tl.sum(p, axis=1)
            tl.store(p_ptr + p_rows + cols[None, :] * s_pl, p.to(P_DTYPE),
                     mask=m_ok[:, None] & (cols < end_pad)[None, :])
        ml_off = b * s_mb + split * s_ms + m * s_mm
        tl.store(m_ptr + ml_off, top, mask=m_ok)
        tl.store(l_ptr + ml_off, total, mask=m_ok)

    @triton.jit
    def _value_tile(vp_ptr, vs_ptr, vz_ptr, vt_ptr, c0_ptr, b, j0, end, c0, n_full, C, P,
                    s_pb, s_pl, s_pp, s_sb, s_sl, s_sc, s_zb, s_zl, s_zc, s_tb, s_tl, s_tc, s_cb, s_cl,
                    bt_ptr, s_btb, s_btr, PAGE_SIZE: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr,
                    PER_CHANNEL: tl.constexpr, HAS_COL0: tl.constexpr, SCALE_BCAST: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_CV: tl.constexpr, PAGED: tl.constexpr, OUT_DTYPE: tl.constexpr):
        """Value rows j0 .. j0 + BLOCK_N (valid below ``end``), channels c0 .. c0 + BLOCK_CV, dequantized and
        rounded to the model dtype."""
        return dequant_tile(
            vp_ptr, vs_ptr, vz_ptr, vt_ptr, c0_ptr, b, j0, end, c0, n_full, C, P,
            s_pb, s_pl, s_pp, s_sb, s_sl, s_sc, s_zb, s_zl, s_zc, s_tb, s_tl, s_tc, s_cb, s_cl,
            bt_ptr, s_btb, s_btr, PAGE_SIZE,
            BITS, GROUP, PER_CHANNEL, HAS_COL0, SCALE_BCAST, BLOCK_N, BLOCK_CV, PAGED,
        ).to(OUT_DTYPE)

    @triton.jit
    def _values_kernel(
        p_ptr, vp_ptr, vs_ptr, vz_ptr, vt_ptr, c0_ptr, length_ptr, bt_ptr, acc_ptr,
        L, M_ALL, C, P, s_len, s_btb, s_btr, S, window,
        s_pb_, s_pm_, s_pl_,
        s_pb, s_pl, s_pp, s_sb, s_sl, s_sc, s_zb, s_zl, s_zc, s_tb, s_tl, s_tc, s_cb, s_cl,
        s_ab, s_as, s_am, s_ac,
        BITS: tl.constexpr, GROUP: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_COL0: tl.constexpr,
        SCALE_BCAST: tl.constexpr, OUT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
        NUM_SPLITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_CV: tl.constexpr,
        PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, WINDOWED: tl.constexpr,
    ):
        """accᵀ += x̂vᵀ · pᵀ over one split's rows, for one block of value channels and BLOCK_M query rows.

        The value rows are the same for every KV head (the X cache, or the one value latent), so the
        query rows of all heads -- M_ALL = Hkv·R, flattened -- share each dequantized tile: BLOCK_M of
        them per program (flash-decoding over the splits). The dequantized tile is the first operand,
        which wgmma reads from registers, and the probabilities -- already in memory, in the model
        dtype, relative to the split's maximum (``_softmax_kernel``) -- the second, a plain load that
        Triton's pipeliner prefetches into shared memory: each step's MMA stays in flight while the next
        tile is dequantized, as in the scores kernel. (With p computed here, by an online softmax, one
        operand computed in the loop had to be the shared-memory one, and every MMA was waited for;
        docs/kernels.md.) Value channels are the MMA's rows, so 64 of them fill a wgmma tile whatever the
        query rows.

        With a window, the splits start at the block of the first row seen (``lo``); that block's rows before
        it (p = 0) may be freed pages of any bytes, so the first step zeroes them (0 · NaN would be NaN)."""
        pid_bm = tl.program_id(0)
        split = tl.program_id(1)
        c0 = tl.program_id(2) * BLOCK_CV
        b, m, m_ok = _query_row_block(pid_bm, M_ALL, BLOCK_M)
        n = _fill(length_ptr, b, s_len, L)
        lo = _first_row(n, S, window, WINDOWED)
        start, end = _split_rows(n, lo, split, NUM_SPLITS, BLOCK_N)  # as the softmax cut them
        n_full = n // GROUP * GROUP
        p_cols = b * s_pb_ + offset64(m, s_pm_)[None, :]

        # The first step is peeled off the loop (and runs even for an empty split, its rows masked): with a
        # loop that may run zero times, the skip path defines the accumulator by plain moves and ptxas
        # serializes the wgmmas (C7515); a loop entered with the accumulator of a finished MMA does not.
        rows = start + tl.arange(0, BLOCK_N)
        p = tl.load(p_ptr + p_cols + rows[:, None] * s_pl_, mask=(rows < end)[:, None] & m_ok[None, :], other=0.0)
        x = _value_tile(vp_ptr, vs_ptr, vz_ptr, vt_ptr, c0_ptr, b, start, end, c0, n_full, C, P,
                        s_pb, s_pl, s_pp, s_sb, s_sl, s_sc, s_zb, s_zl, s_zc, s_tb, s_tl, s_tc, s_cb, s_cl,
                        bt_ptr, s_btb, s_btr, PAGE_SIZE, BITS, GROUP, PER_CHANNEL, HAS_COL0, SCALE_BCAST,
                        BLOCK_N, BLOCK_CV, PAGED, OUT_DTYPE)
        if WINDOWED:
            x = tl.where((rows >= lo)[:, None], x, 0.0)
        acc = _dot(tl.trans(x), p, tl.zeros((BLOCK_CV, BLOCK_M), dtype=tl.float32), DOT_PRECISION, UPCAST)
        for j0 in range(start + BLOCK_N, end, BLOCK_N):
            # (a whole number of blocks from row 0: told, so that the p tile's rows load 16 bytes at a time,
            # which is what lets the pipeliner copy it asynchronously)
            j0 = tl.multiple_of(j0, BLOCK_N)
            rows = j0 + tl.arange(0, BLOCK_N)
            # [BLOCK_N, BLOCK_M] of pᵀ, whole blocks: a split ends at a block boundary or at n, and p is 0
            # from n to the end of its block (``_softmax_kernel``), so no row mask (it would make every
            # element a separate 2-byte load, which the pipeliner does not copy asynchronously); the x̂
            # rows past n are finite
            p = tl.load(p_ptr + p_cols + rows[:, None] * s_pl_, mask=m_ok[None, :], other=0.0)
            x = _value_tile(vp_ptr, vs_ptr, vz_ptr, vt_ptr, c0_ptr, b, j0, end, c0, n_full, C, P,
                            s_pb, s_pl, s_pp, s_sb, s_sl, s_sc, s_zb, s_zl, s_zc, s_tb, s_tl, s_tc, s_cb, s_cl,
                            bt_ptr, s_btb, s_btr, PAGE_SIZE, BITS, GROUP, PER_CHANNEL, HAS_COL0, SCALE_BCAST,
                            BLOCK_N, BLOCK_CV, PAGED, OUT_DTYPE)
            acc = _dot(tl.trans(x), p, acc, DOT_PRECISION, UPCAST)
        cols = c0 + tl.arange(0, BLOCK_CV)
        a_off = b * s_ab + split * s_as + m[None, :] * s_am + cols[:, None] * s_ac
        tl.store(acc_ptr + a_off, acc, mask=m_ok[None, :] & (cols < C)[:, None])

    @triton.jit
    def _per_split(ptr, row_offsets, rows_ok, s0, NUM_SPLITS, s_split, other, SPLIT_STEP: tl.constexpr):
        """[rows, SPLIT_STEP] of a per-(split, row) partial (the maxima or the sums) for splits s0 ..
        s0 + SPLIT_STEP, ``other`` for padding rows and splits; and that tile's mask."""
        sp = s0 + tl.arange(0, SPLIT_STEP)
        ok = rows_ok[:, None] & (sp < NUM_SPLITS)[None, :]
        return tl.load(ptr + row_offsets[:, None] + sp[None, :] * s_split, mask=ok, other=other), ok

    @triton.jit
    def _combine_kernel(
        acc_ptr, m_ptr, l_ptr, mixed_ptr, M_ALL, C, NUM_SPLITS,
        s_ab, s_as, s_am, s_ac,
        s_mb, s_ms, s_mm,
        s_xb, s_xm, s_xc,
        R1: tl.constexpr, SPLITS_PAD: tl.constexpr, SPLIT_STEP: tl.constexpr, BLOCK_C1: tl.constexpr,
    ):
        """Rows m .. m + R1 (flattened query rows h·R + r of every KV head), channels c0 .. c0 + BLOCK_C1:
        combines the splits' partial Σ p·x̂v and Σ p, each relative to its split's maximum (weights
        exp(m_s - max)), and writes the normalized rows (``mixed``) rounded to the model dtype, as the
        reference rounds them before the Wv projection.

        Why a grid over rows and channels: the earlier reduce, one program per KV head looping over the
        channels, left 8-32 programs to read every split's partial sums (0.1-4 MB) and took 13-65 µs on
        an H200, latency-bound. The splits are loaded SPLIT_STEP at a time as one [R1, SPLIT_STEP, BLOCK_C1]
        tile (all of them in one load where the tile fits 4096 fp32 values): one load per step, not one per
        split."""
        pid_bm = tl.program_id(0)
        c0 = tl.program_id(1) * BLOCK_C1
        b, m, m_ok = _query_row_block(pid_bm, M_ALL, R1)
        ml_rows = b * s_mb + m * s_mm
        # The maximum over the splits, then each split's weight exp(m_s - max): an empty or fully masked
        # split has m_s = -FLT_MAX and l_s = 0 (weight 0, or 1 times nothing if every split is); padding
        # splits and rows read -inf and get weight 0 from the mask, never a NaN.
        top = tl.full((R1,), float("-inf"), dtype=tl.float32)
        for s0 in range(0, SPLITS_PAD, SPLIT_STEP):
            m_s, ok = _per_split(m_ptr, ml_rows, m_ok, s0, NUM_SPLITS, s_ms, float("-inf"), SPLIT_STEP)
            top = tl.maximum(top, tl.max(m_s, axis=1))
        cols = c0 + tl.arange(0, BLOCK_C1)
        c_ok = cols < C
        a_rows = b * s_ab + m * s_am
        total = tl.zeros((R1,), dtype=tl.float32)
        mixed = tl.zeros((R1, BLOCK_C1), dtype=tl.float32)
        for s0 in range(0, SPLITS_PAD, SPLIT_STEP):
            m_s, ok = _per_split(m_ptr, ml_rows, m_ok, s0, NUM_SPLITS, s_ms, float("-inf"), SPLIT_STEP)
            weight = tl.where(ok, tl.exp(m_s - top[:, None]), 0.0)
            l_s, ok = _per_split(l_ptr, ml_rows, m_ok, s0, NUM_SPLITS, s_ms, 0.0, SPLIT_STEP)
            total += tl.sum(l_s * weight, axis=1)
            sp = s0 + tl.arange(0, SPLIT_STEP)
            part = tl.load(acc_ptr + a_rows[:, None, None] + sp[None, :, None] * s_as + cols[None, None, :] * s_ac,
                           mask=ok[:, :, None] & c_ok[None, None, :], other=0.0)
            mixed += tl.sum(part * weight[:, :, None], axis=1)
        inv = tl.where(total > 0, 1.0 / total, 0.0)  # fully masked row (or n = 0): 0
        tl.store(mixed_ptr + b * s_xb + (m * s_xm)[:, None] + cols[None, :] * s_xc,
                 (mixed * inv[:, None]).to(mixed_ptr.dtype.element_ty), mask=m_ok[:, None] & c_ok[None, :])

    @triton.jit
    def _project_kernel(
        mixed_ptr, l_ptr, w_ptr, bias_ptr, out_ptr,
        HKV, C, R, S, GROUP_Q, D, NUM_SPLITS,
        s_xb, s_xm, s_xc,
        s_mb, s_ms, s_mm,
        s_wn, s_wk,
        s_ob, s_oh, s_os, s_od,
        HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
        R_PAD: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_CV: tl.constexpr, SPLIT_STEP: tl.constexpr,
    ):
        """KV head h's R query rows, output features d0 .. d0 + BLOCK_D: mixed · Wv[h·D + d]ᵀ (+ the bias
        for rows that attended to something), written to [B, Hq, S, D].

        A plain matmul of two loaded operands, so Triton pipelines it with its MMAs in flight. The grid
        splits D so that the W_v rows (32 MB on a 7B MHA layer) stream through every multiprocessor, not
        through one per KV head."""
        pid_bh = tl.program_id(0)
        d0 = tl.program_id(1) * BLOCK_D
        b = (pid_bh // HKV).to(tl.int64)
        h = pid_bh % HKV
        r = tl.arange(0, R_PAD)
        r_ok = r < R
        x_rows = b * s_xb + ((h * R + r) * s_xm)[:, None]
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < D
        w_rows = ((h * D + d) * s_wn)[None, :]
        out = tl.zeros((R_PAD, BLOCK_D), dtype=tl.float32)
        for c0 in range(0, C, BLOCK_CV):
            cols = c0 + tl.arange(0, BLOCK_CV)
            c_ok = cols < C
            mixed = tl.load(mixed_ptr + x_rows + cols[None, :] * s_xc, mask=r_ok[:, None] & c_ok[None, :], other=0.0)
            w = tl.load(w_ptr + w_rows + cols[:, None] * s_wk, mask=c_ok[:, None] & d_ok[None, :], other=0.0)
            out = _dot(mixed, w, out, DOT_PRECISION, UPCAST)
        if HAS_BIAS:
            bv = tl.load(bias_ptr + h * D + d, mask=d_ok, other=0.0).to(tl.float32)
            # rows with some attended token (l_s > 0 in some split: its top split has l >= 1), as total > 0
            l_rows = b * s_mb + (h * R + r) * s_mm
            filled = tl.zeros((R_PAD,), dtype=tl.float32)
            for s0 in range(0, NUM_SPLITS, SPLIT_STEP):
                l_s, ok = _per_split(l_ptr, l_rows, r_ok, s0, NUM_SPLITS, s_ms, 0.0, SPLIT_STEP)
                filled = tl.maximum(filled, tl.max(l_s, axis=1))
            out += tl.where(filled > 0, 1.0, 0.0)[:, None] * bv[None, :]
        q_head = h * GROUP_Q + r // S
        o_off = b * s_ob + (q_head * s_oh + (r % S) * s_os)[:, None] + d[None, :] * s_od
        tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=r_ok[:, None] & d_ok[None, :])

    _TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _combine_tiles(rows: int, splits: int, width: int, elements: int = 4096) -> dict:
    """The combine kernel's tiles: [R1 rows, SPLIT_STEP splits, BLOCK_C1 channels] of at most ``elements``
    fp32 values (32 registers per thread of 4 warps): 64 channels (256-byte segments of each partial
    row), as many splits per step as fit (all of them up to 64), then as many rows as fit."""
    block_c1 = max(16, min(64, next_power_of_2(width)))
    splits_pad = next_power_of_2(splits)
    step = max(1, min(splits_pad, elements // block_c1))
    r1 = max(1, min(next_power_of_2(rows), elements // (block_c1 * step)))
    return dict(R1=r1, SPLITS_PAD=splits_pad, SPLIT_STEP=step, BLOCK_C1=block_c1)


def _projection_step(rows: int, block_d: int, width: int, elements: int = 4096) -> int:
    """Channels per step of the projection kernel: its [rows, step] and [step, block_d] tiles of at most
    ``elements`` values each (16-256 channels). Wv streams from memory (32 MB on a 7B layer), so each
    program should have several KB of it in flight: 64-channel steps over 16 features were 2 KB."""
    return max(16, min(256, next_power_of_2(width), elements // max(rows, block_d)))


def combine_splits(acc: torch.Tensor, m_part: torch.Tensor, l_part: torch.Tensor, dtype: torch.dtype,
                   elements: int = 4096) -> torch.Tensor:
    """Stage 4: the normalized absorbed values [B, M, C] in ``dtype`` from the splits' partial sums ``acc``
    [B, splits, M, C] (fp32, each relative to its split's maximum ``m_part`` [B, splits, M], with
    Σ p ``l_part``). ``elements``: the combine tile's size (:func:`_combine_tiles`; the tests shrink it
    to make the splits take several steps)."""
    batch, splits, m_all, width = acc.shape
    mixed = torch.empty((batch, m_all, width), device=acc.device, dtype=dtype)
    tiles = _combine_tiles(m_all, splits, width, elements)
    _combine_kernel[(batch * triton.cdiv(m_all, tiles["R1"]), triton.cdiv(width, tiles["BLOCK_C1"]))](
        acc, m_part, l_part, mixed, m_all, width, splits,
        *acc.stride(), *m_part.stride(), *mixed.stride(), **tiles, num_warps=4,
    )
    return mixed


def _table_ptr(a: DecodeAttentionInputs) -> torch.Tensor:
    """The block table (unpaged: any valid pointer, never read)."""
    return a.length if a.block_table is None else a.block_table


def _paged_args(a: DecodeAttentionInputs) -> tuple:
    """(stride of the per-row fills, 0 for one fill; the block table's strides)."""
    s_len = a.length.stride(0) if a.length.numel() > 1 else 0
    return (s_len, 0, 0) if a.block_table is None else (s_len, *a.block_table.stride())


def _page_size(a: DecodeAttentionInputs) -> int:
    """Rows per page (a compile-time constant of the kernels; 1 when not paged)."""
    return 1 if a.block_table is None else a.keys.packed.shape[1]


def _tile_args(source: QuantizedSource, col0) -> tuple[tuple, tuple]:
    """Pointers and strides of a source for ``dequant_tile`` (absent tensors: any valid pointer, stride 0)."""
    tail = source.packed if source.tail is None else source.tail
    c = source.packed if col0 is None else col0
    t_strides = (0, 0, 0) if source.tail is None else source.tail.stride()
    c_strides = (0, 0) if col0 is None else col0.stride()
    return ((source.packed, source.scale, source.zero, tail, c),
            (*source.packed.stride(), *source.scale.stride(), *source.zero.stride(), *t_strides, *c_strides))


def _without_inner(k_strides: tuple) -> tuple:
    """``_tile_args``' strides less the codes' byte stride (the Gluon kernel requires it to be 1)."""
    return k_strides[:2] + k_strides[3:]


def _launch_scores(a: DecodeAttentionInputs, cfg: dict, batch: int, q_heads: int, kv_heads: int, max_len: int,
                   k_width: int, rows: int, seq: int, group_q: int, half: int, r_pad: int, precision: str,
                   upcast: bool, target: GpuTarget | None) -> torch.Tensor:
    """Stage 1: the scores [B, Hkv, rows, L] fp32 of every query row against the K rebuilt in tiles (by
    ``_scores_kernel``, or with ``cfg["gluon"]`` the Gluon kernel of :mod:`.gluon_scores`)."""
    keys, dev = a.keys, a.query.device
    scores = torch.empty((batch, kv_heads, rows, max_len), device=dev, dtype=torch.float32)
    k_ptrs, k_strides = _tile_args(keys, a.col0)
    if a.mask is None:
        mask_kind, mask_t, m_strides = 0, scores, (0, 0, 0, 0)
    else:
        mask_e = a.mask.expand(batch, q_heads, seq, max_len)  # broadcast dims get stride 0
        mask_kind = 1 if a.mask.dtype == torch.bool else 2
        mask_t = mask_e.view(torch.uint8) if mask_kind == 1 else mask_e
        m_strides = mask_e.stride()
    block_h = min(cfg["block_h"], next_power_of_2(kv_heads))  # an override may exceed the heads
    grid = (batch * triton.cdiv(kv_heads, block_h), triton.cdiv(max_len, cfg["block_n"]))
    # RoPE: the tables, or positions and inv_freq (absent tensors: any valid pointer, stride 0)
    if a.rope_from_positions:
        cos = sin = a.positions
        table_strides, pos_strides = (0,) * 6, a.positions.stride()
        freq = a.rope_inv_freq
    else:
        cos, sin, freq = a.cos, a.sin, a.cos
        table_strides, pos_strides = (*a.cos.stride(), *a.sin.stride()), (0, 0)
    if cfg["gluon"]:
        from xq_compile.kernels.decode_attention import gluon_scores

        half_pad, target = pow2_at_least_16(half), target or gpu_target(dev)
        if cfg["gluon"] == GLUON_AUTO:
            cfg = {**cfg, "gluon": gluon_scores.choose(a, cfg, target, half_pad, r_pad, block_h)}
    if cfg["gluon"]:
        rows_programs, tile = gluon_scores.plan(a, cfg, target, half_pad, r_pad, block_h, grid[0], grid[1])
        gluon_scores._gluon_scores_kernel[(grid[0], rows_programs)](
            a.query, *k_ptrs, a.k_weight, a.k_weight if a.k_bias is None else a.k_bias, cos, sin, cos, freq,
            mask_t, a.length, _table_ptr(a), scores,
            max_len, kv_heads, rows, seq, group_q, half, float(a.sm_scale), float(a.rope_scale), *_paged_args(a),
            *a.query.stride(), *_without_inner(k_strides), a.k_weight.stride(0), *table_strides, *pos_strides,
            *m_strides, *scores.stride(),
            C=k_width, BITS=keys.bits, GROUP=keys.group, PER_CHANNEL=keys.layout == "per_channel",
            HAS_COL0=a.col0 is not None, HAS_BIAS=a.k_bias is not None, MASK_KIND=mask_kind,
            ROPE_FROM_POSITIONS=a.rope_from_positions, R_PAD=r_pad, HALF_PAD=half_pad, BLOCK_H=block_h,
            BLOCK_N=cfg["block_n"], BLOCK_C=gluon_scores.BLOCK_C, PAGED=a.paged, PAGE_SIZE=_page_size(a), **tile,
        )
        return scores
    _scores_kernel[grid](
        a.query, *k_ptrs, a.k_weight, a.k_weight if a.k_bias is None else a.k_bias, cos, sin, cos, freq, mask_t,
        a.length, _table_ptr(a), a.k_weight if a.k_norm_weight is None else a.k_norm_weight, scores,
        max_len, kv_heads, k_width, keys.packed.shape[2], rows, seq, group_q, half, float(a.sm_scale),
        float(a.rope_scale), *_paged_args(a), a.window, float(a.soft_cap), float(a.k_norm_eps),
        *a.query.stride(), *k_strides, *a.k_weight.stride(), *table_strides, *pos_strides, *m_strides,
        *scores.stride(),
        BITS=keys.bits, GROUP=keys.group, PER_CHANNEL=keys.layout == "per_channel", HAS_COL0=a.col0 is not None,
        HAS_BIAS=a.k_bias is not None, MASK_KIND=mask_kind, ROPE_FROM_POSITIONS=a.rope_from_positions,
        FAST_TRIG=not launch_config.interpreted(), DOT_PRECISION=precision, UPCAST=upcast,
        SCALE_BCAST=scale_broadcast(keys.layout, keys.group, cfg["block_n"], cfg["block_c"]),
        R_PAD=r_pad, HALF_PAD=pow2_at_least_16(half), BLOCK_H=block_h, BLOCK_N=cfg["block_n"],
        BLOCK_C=cfg["block_c"], PAGED=a.paged, PAGE_SIZE=_page_size(a), X_AS_B=bool(cfg["x_as_b"]),
        WINDOWED=a.window > 0, SOFT_CAP=a.soft_cap > 0, KEY_NORM=a.k_norm_weight is not None,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return scores


def decode_attention_triton(inputs: DecodeAttentionInputs, target: GpuTarget | None = None,
                            **config: int) -> torch.Tensor:
    """Launch the Triton kernels (what the op's CUDA kernel calls). Same semantics as the op.

    Works on CPU tensors under ``TRITON_INTERPRET=1`` (the tests do that). ``length`` is only passed by
    pointer: nothing here reads tensor data, so the launches are CUDA-graph capturable. Keyword
    arguments (``CONFIG_KEYS``) override the default configuration and any enclosing
    ``config_overrides`` (see ``resolve_config``); block sizes are powers of two (>= 16, ``block_h`` >= 1).
    ``num_warps``/``num_stages`` apply to the Triton scores kernel; ``gluon`` 1 or 2 runs the scores on the
    Gluon kernel instead (Hopper, opt-in: :mod:`.gluon_scores`; ``"auto"``: where it can run the call, else
    the Triton kernel; ``gluon_ws=1``: that kernel warp-specialized). ``target``: configure for that GPU
    instead of the tensors' device (``benchmarks/compile_report.py`` compiles for GPUs it does not have).
    """
    if not HAS_TRITON:
        raise RuntimeError(
            "xq_compile::decode_attention on CUDA needs triton, which is not installed: "
            "pip install 'xq-compile[triton]' (or pip install triton)."
        )
    (batch, q_heads, seq, head_dim, kv_heads, max_len, k_width, v_width), cfg = launch_config.resolve(inputs, config, target)
    a = inputs
    values = a.value_source
    group_q = q_heads // kv_heads
    rows = group_q * seq
    dtype = a.k_weight.dtype
    if dtype not in _TL_DTYPES:
        raise ValueError(f"model dtype {dtype} is not supported by the Triton kernel")
    out = torch.empty(a.query.shape, device=a.query.device, dtype=a.query.dtype)
    if out.numel() == 0:
        return out
    dev = a.query.device
    r_pad = pow2_at_least_16(rows)
    half = head_dim // 2
    splits = cfg["num_splits"]
    fp32_exact = dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest"
    precision = "ieee" if fp32_exact else "tf32"
    # The Triton interpreter (the only way these kernels run on CPU tensors) gets bf16 tl.dot wrong.
    upcast = launch_config.interpreted() and dtype == torch.bfloat16

    # 1. scores of every (b, h, query row, cached row j < n); rows >= n are never written
    scores = _launch_scores(a, cfg, batch, q_heads, kv_heads, max_len, k_width, rows, seq, group_q, half, r_pad,
                            precision, upcast, target)

    # 2. per split: the probabilities, one maximum per query row over the split's scores, p = exp(s - max)
    #    in the model dtype, the maximum and Σ p
    m_all = kv_heads * rows
    flat_scores = scores.view(batch, m_all, max_len)
    row_block = cfg["block_nv"]  # p is written in whole row blocks of the values kernel
    probs = torch.empty((batch, m_all, -(-max_len // row_block) * row_block), device=dev, dtype=dtype)
    m_part = torch.empty((batch, splits, m_all), device=dev, dtype=torch.float32)
    l_part = torch.empty_like(m_part)
    block_ms = min(32, pow2_at_least_16(m_all))
    _softmax_kernel[(batch * triton.cdiv(m_all, block_ms), splits)](
        flat_scores, probs, m_part, l_part, a.length, max_len, m_all, _paged_args(a)[0], seq, a.window,
        *flat_scores.stride(), *probs.stride(), *m_part.stride(),
        P_DTYPE=_TL_DTYPES[dtype], NUM_SPLITS=splits, BLOCK_M=block_ms, BLOCK_L=max(128, row_block),
        ROW_BLOCK=row_block, WINDOWED=a.window > 0, num_warps=4,
    )

    # 3. per split: the absorbed values Σ p·x̂v for one block of value channels, for the query rows of
    #    every KV head at once (flattened: row h·R + r); a shared source's value rows get its col0 too
    v_ptrs, v_strides = _tile_args(values, a.col0 if a.values is None else None)
    block_m = min(cfg["block_m"], pow2_at_least_16(m_all))
    block_cv = min(cfg["block_cv"], pow2_at_least_16(v_width))
    acc = torch.empty((batch, splits, m_all, v_width), device=dev, dtype=torch.float32)
    _values_kernel[(batch * triton.cdiv(m_all, block_m), splits, triton.cdiv(v_width, block_cv))](
        probs, *v_ptrs, a.length, _table_ptr(a), acc,
        max_len, m_all, v_width, values.packed.shape[2], *_paged_args(a), seq, a.window,
        *probs.stride(), *v_strides, *acc.stride(),
        BITS=values.bits, GROUP=values.group, PER_CHANNEL=values.layout == "per_channel",
        HAS_COL0=a.values is None and a.col0 is not None,
        SCALE_BCAST=scale_broadcast(values.layout, values.group, cfg["block_nv"], block_cv),
        OUT_DTYPE=_TL_DTYPES[dtype], DOT_PRECISION=precision, UPCAST=upcast, NUM_SPLITS=splits,
        BLOCK_M=block_m, BLOCK_N=cfg["block_nv"], BLOCK_CV=block_cv, PAGED=a.paged, PAGE_SIZE=_page_size(a),
        WINDOWED=a.window > 0,
        # the dequantized [block_nv, block_cv] tile (codes, scales, zeros in fp32) dominates the registers
        num_warps=8 if cfg["block_nv"] * block_cv >= 8192 else 4, num_stages=3,
    )

    # 4. combine the splits and normalize, for every query row and block of value channels
    mixed = combine_splits(acc, m_part, l_part, dtype)

    # 5. project with Wv (+ bias) into [B, Hq, S, D], for every KV head and block of output features
    block_d = min(cfg["block_d"], pow2_at_least_16(head_dim))
    _project_kernel[(batch * kv_heads, triton.cdiv(head_dim, block_d))](
        mixed, l_part, a.v_weight, a.v_weight if a.v_bias is None else a.v_bias, out,
        kv_heads, v_width, rows, seq, group_q, head_dim, splits,
        *mixed.stride(), *m_part.stride(), *a.v_weight.stride(), *out.stride(),
        HAS_BIAS=a.v_bias is not None, DOT_PRECISION=precision, UPCAST=upcast,
        R_PAD=r_pad, BLOCK_D=block_d, BLOCK_CV=_projection_step(r_pad, block_d, v_width),
        SPLIT_STEP=min(64, next_power_of_2(splits)),
        num_warps=4, num_stages=3,
    )
    return out
