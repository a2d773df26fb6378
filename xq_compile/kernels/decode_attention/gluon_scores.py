"""Stage 1 of ``xq_compile::decode_attention`` (the scores) written in Gluon for Hopper (sm_90): the K
rebuild's MMAs stay in flight behind the dequantization, with the weight tiles copied asynchronously.

Opt-in, not the default: decode_attention config ``gluon=1`` (W streamed), ``gluon=2`` (the head tile's
W resident in shared memory, for small models) or ``gluon="auto"`` (per call, :func:`choose`: 2 where it
can run, else 1, else the Triton kernel), each also warp-specialized with ``gluon_ws=1``
(:func:`_rebuild_k_ws`), given to the launcher or, around a compiled model's calls, by
``config_overrides``. Gluon kernels do not run under the Triton interpreter: on CPU
``tests/test_gluon_scores.py`` runs this code under the Gluon emulator (``tests/gluon_emulator.py``: the
values against the reference and the Triton kernel's, the asynchronous MMAs and copies checked for races)
and ``benchmarks/compile_report.py`` compiles it as opt-in jobs (wgmma in flight, no spills in the loop);
on a Hopper GPU the same tests check it on the hardware. Not yet run on a GPU.
``benchmarks/decode_attention.py --sweep-gluon`` times it next to the Triton ``_scores_kernel``.

Why: the Triton scores kernel keeps X̂ in registers (the wgmma A operand) so that Triton's pipeliner
prefetches the W tiles; on an H200 it reached 40% of the dense bf16 peak on a 7B shape where a plain
Triton matmul of the same tile reached 57% (docs/kernels.md, "What limits the scores kernel"). The
Gluon rebuild (``xq_compile.kernels.gluon_rebuild``: X̂ stored to shared memory, the MMA issued
asynchronously, ``warpgroup_mma_wait(1)``) ran a 4-bit rebuild at 1.4-1.9x ``torch.mm``'s time where
the Triton form took 2.6-3.0x. This kernel is that loop with the scores kernel's epilogue, and two
loads taken off the step's critical path:

* the W tile of step i + NUM_STAGES - 1 is copied with ``cp.async`` into its stage while step i runs
  (the stage it overwrites was read by MMA i - 1, which ``wait(1)`` of step i has retired); with W
  resident there are no copies in the loop at all;
* the codes, scales and zeros of step i + 1 are loaded into registers while step i dequantizes.

Per step: dequantize X̂ [BLOCK_N, BLOCK_C] (the bit tricks of ``tiles.dequant_tile``: one AND and one
FMA per element at 2 and 4 bits, 4-bit codes read as 32-bit words), store it into one of two 16-bit
buffers, issue the wgmma X̂ · Wᵀ asynchronously, wait until only it is pending. After the loop: the two
halves of every head apart (one accumulator of 2F columns, as in the Triton kernel), the bias, RoPE
(tables or positions), and the block-diagonal query dot as two more wgmma (K halves and Qᵀ through
shared memory), scaled, masked and stored like ``_scores_kernel``'s.

What it takes (:func:`unsupported` names what it does not, :func:`plan` raises that): per-token key
sources (2, 4 or 8 bits; scale groups and the hidden size multiples of 64) or per-channel ones (the GQA
latent's, 2/4/8 bits, the open token group from the tail), dense or paged (vLLM's cache: per-token sources
read through the block table, a fill per request), 16-bit weights, col0,
bias, masks, S <= 16.
"""

from __future__ import annotations

import torch

from xq_compile.kernels.decode_attention.config import interpreted
from xq_compile.kernels.decode_attention.inputs import DecodeAttentionInputs
from xq_compile.kernels.devices import GpuTarget

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.extra import libdevice
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, warpgroup_mma,
                                                                   warpgroup_mma_wait)
    from xq_compile.kernels.gluon_rebuild import partition_barrier, worker_regs_optional
    from xq_compile.kernels.tiles import fma_code  # a triton.jit function of elementwise ops: Gluon calls it

    # cp.async into shared memory: async_load in triton 3.9, async_copy_global_to_shared in 3.6
    _cp_async = async_copy.async_load if hasattr(async_copy, "async_load") else \
        async_copy.async_copy_global_to_shared
except (ImportError, AttributeError):  # triton < 3.4, or a Gluon API this code does not know
    gluon = None

HAS_GLUON = gluon is not None
BLOCK_C = 64  # channels per step
BITS_SUPPORTED = (2, 4, 8)

if HAS_GLUON:

    @gluon.jit
    def _fma_nibble(t, s_shifted, z_shifted, SHIFT: gl.constexpr):
        """``code * s + z`` for the 4-bit code at bits SHIFT .. SHIFT + 3 of ``t`` (SHIFT 15 or 19):
        ``tiles.fma_code``'s arithmetic with 1.0's exponent ORed in by the same LOP3 that masks the code
        (``s_shifted`` = s·2^(23 - SHIFT), ``z_shifted`` = z - s_shifted, once per row and step)."""
        m = ((t & (15 << SHIFT)) | 0x3F800000).to(gl.float32, bitcast=True)
        return m * s_shifted + z_shifted

    @gluon.jit
    def _row_places(b, rows, bt_ptr, s_btb, s_btr, PAGED: gl.constexpr, PAGE_SIZE: gl.constexpr):
        """Where the per-token sources hold ``rows`` of batch row ``b``: (page, slot) with the row at
        ``page * s_b + slot * s_l`` (``tiles.cache_rows``' rule): dense, page ``b`` and slot the row;
        paged (vLLM's cache), page ``block_table[b, row // PAGE_SIZE]`` and slot ``row % PAGE_SIZE``,
        one table load per row and tile (``rows`` are below the fill: every entry read is a real page)."""
        if PAGED:
            page = gl.load(bt_ptr + b * s_btb + (rows // PAGE_SIZE) * s_btr).to(gl.int64)
            slot = rows % PAGE_SIZE
        else:
            page = b  # (a scalar: the rows' offsets as before paging)
            slot = rows
        return page, slot

    @gluon.jit
    def _step_sources(kp_ptr, ks_ptr, kz_ptr, kt_ptr, b, rows, page, slot, g, s_pb, s_pl, s_sb, s_sl, s_sc,
                      s_zb, s_zl, s_zc, s_tb, s_tl, s_tc, BITS: gl.constexpr, PER_CHANNEL: gl.constexpr,
                      FROM_TAIL: gl.constexpr, GROUP: gl.constexpr, BLOCK_C: gl.constexpr, byte_l: gl.constexpr,
                      dq_l: gl.constexpr):
        """The pointers of what step 0 dequantizes: (code bytes, scales, zeros), or with ``FROM_TAIL``
        (per channel, the open token group) the model-dtype tail's tile (three times). Computed once per
        tile; :func:`_load_step` offsets them by the step.

        ``rows``: the row block's rows (int64, clamped to filled rows) in ``byte_l``'s row slice; a row's
        codes, scale and zero are at (``page``, ``slot``) of the per-token sources (:func:`_row_places`:
        batch row and row when dense, a page of the block table and a row in it when paged). Per token the
        scale and zero are one per row ([BLOCK_N] in that slice), per channel one per column of the block's
        token group ``g`` ([BLOCK_C] in ``dq_l``'s column slice)."""
        cols = gl.arange(0, BLOCK_C, layout=gl.SliceLayout(0, dq_l))
        if FROM_TAIL:
            t_rows = gl.convert_layout(rows, gl.SliceLayout(1, dq_l)) % GROUP
            codes = kt_ptr + b * s_tb + t_rows[:, None] * s_tl + cols[None, :] * s_tc
            scales = codes
            zeros = codes
        else:
            if BITS == 4 and not PER_CHANNEL:  # 32-bit words of 8 codes (unsupported() checks the alignment)
                word_idx = gl.arange(0, BLOCK_C // 8, layout=gl.SliceLayout(0, byte_l))
                codes = kp_ptr.to(gl.pointer_type(gl.int32), bitcast=True) \
                    + (page * (s_pb // 4) + slot * (s_pl // 4))[:, None] + word_idx[None, :]
            else:
                byte = gl.arange(0, BLOCK_C * BITS // 8, layout=gl.SliceLayout(0, byte_l))
                codes = kp_ptr + (page * s_pb + slot * s_pl)[:, None] + byte[None, :]
            if PER_CHANNEL:
                scales = ks_ptr + b * s_sb + g * s_sl + cols * s_sc
                zeros = kz_ptr + b * s_zb + g * s_zl + cols * s_zc
            else:
                scales = ks_ptr + page * s_sb + slot * s_sl
                zeros = kz_ptr + page * s_zb + slot * s_zl
        return codes, scales, zeros

    @gluon.jit
    def _load_step(codes, scales, zeros, i, s_sc, s_zc, s_tc, BITS: gl.constexpr, PER_CHANNEL: gl.constexpr,
                   FROM_TAIL: gl.constexpr, GROUP: gl.constexpr, BLOCK_C: gl.constexpr):
        """What step ``i`` dequantizes (loaded a step ahead): the code bytes (4 per register) and the
        scale and zero in fp32, shaped to broadcast over the tile; or the tail's tile in fp32."""
        if FROM_TAIL:
            word = gl.load(codes + i * BLOCK_C * s_tc).to(gl.float32)
            s = word
            z = word
        else:
            if BITS == 4 and not PER_CHANNEL:
                word = gl.load(codes + i * (BLOCK_C // 8))
            else:
                word = gl.load(codes + i * (BLOCK_C * BITS // 8))
            if PER_CHANNEL:
                s = gl.load(scales + i * BLOCK_C * s_sc).to(gl.float32)[None, :]
                z = gl.load(zeros + i * BLOCK_C * s_zc).to(gl.float32)[None, :]
            else:
                s = gl.load(scales + (i * BLOCK_C // GROUP) * s_sc).to(gl.float32)[:, None]
                z = gl.load(zeros + (i * BLOCK_C // GROUP) * s_zc).to(gl.float32)[:, None]
        return word, s, z

    @gluon.jit
    def _dequant(word, s, z, BITS: gl.constexpr, PER_CHANNEL: gl.constexpr, FROM_TAIL: gl.constexpr,
                 BLOCK_N: gl.constexpr, BLOCK_C: gl.constexpr, dq_l: gl.constexpr):
        """X̂ [BLOCK_N, BLOCK_C] in fp32, in ``dq_l``, from :func:`_load_step`'s operands (a byte's codes
        lowest bits first, as ``quant.pack`` packs them)."""
        if FROM_TAIL:
            x = word
        elif BITS == 8 or PER_CHANNEL:
            word = word.to(gl.int32)
            if BITS == 8:
                code = word
            elif BITS == 4:
                code = gl.reshape(gl.join(word & 15, word >> 4), [BLOCK_N, BLOCK_C])
            else:
                code = gl.reshape(gl.join(gl.join(word & 3, (word >> 4) & 3), gl.join((word >> 2) & 3,
                                                                                       (word >> 6) & 3)),
                                  [BLOCK_N, BLOCK_C])
            # the code in the mantissa of 2^23, minus 2^23: exact, no int-to-float conversion
            code_f = (gl.convert_layout(code, dq_l) | 0x4B000000).to(gl.float32, bitcast=True) - 8388608.0
            x = code_f * s + z
        elif BITS == 4:
            # a word's bytes in turn at bits 15 .. 22 (one shift each), its two codes at 15 and 19; the eight
            # codes back in channel order (0 4 2 6 1 5 3 7 joined is 0 1 2 3 4 5 6 7, as tiles' interleaves)
            s15 = s * 256.0
            z15 = z - s15
            s19 = s * 16.0
            z19 = z - s19
            t0 = word << 15
            t1 = word << 7
            t2 = word >> 1
            t3 = word >> 9
            x = gl.reshape(gl.join(gl.join(gl.join(_fma_nibble(t0, s15, z15, 15), _fma_nibble(t2, s15, z15, 15)),
                                           gl.join(_fma_nibble(t1, s15, z15, 15), _fma_nibble(t3, s15, z15, 15))),
                                   gl.join(gl.join(_fma_nibble(t0, s19, z19, 19), _fma_nibble(t2, s19, z19, 19)),
                                           gl.join(_fma_nibble(t1, s19, z19, 19), _fma_nibble(t3, s19, z19, 19)))),
                           [BLOCK_N, BLOCK_C])
        else:  # 2 bits: every byte in the top 8 bits of the mantissa of 1.0, its codes at 15, 17, 19, 21
            top = (word.to(gl.int32) << 15) | 0x3F800000
            x = gl.reshape(gl.join(gl.join(fma_code(top, s, z, 15, 2), fma_code(top, s, z, 19, 2)),
                                   gl.join(fma_code(top, s, z, 17, 2), fma_code(top, s, z, 21, 2))),
                           [BLOCK_N, BLOCK_C])
        # (dq_l is the layout unpacking the bytes gives: a no-op)
        return gl.convert_layout(x, dq_l)

    @gluon.jit
    def _rebuild_k(kp_ptr, ks_ptr, kz_ptr, kt_ptr, c0_ptr, w_ptrs, x_buf, w_buf, ready, empty, b, rows, page, slot,
                   g, s_pb, s_pl, s_sb, s_sl, s_sc, s_zb, s_zl, s_zc, s_tb, s_tl, s_tc, s_cb, s_cl,
                   C: gl.constexpr, BITS: gl.constexpr, GROUP: gl.constexpr, PER_CHANNEL: gl.constexpr,
                   FROM_TAIL: gl.constexpr, HAS_COL0: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_C: gl.constexpr,
                   F2: gl.constexpr, NUM_STAGES: gl.constexpr, X_BUFS: gl.constexpr, W_RESIDENT: gl.constexpr,
                   HAND_OVER: gl.constexpr, byte_l: gl.constexpr, dq_l: gl.constexpr, acc_l: gl.constexpr):
        """K = X̂ · Wkᵀ [BLOCK_N, F2] in fp32 (``acc_l``), the column i from the W row of ``w_ptrs[i]``.

        Step i: dequantize (operands loaded during step i - 1), store X̂ into buffer i % X_BUFS, issue the
        wgmma asynchronously and wait until only it is pending; then copy step i + NUM_STAGES - 1's W
        tile into the stage MMA i - 1 read. One cp.async group is committed per step (empty past the
        last tile), so ``wait_group(NUM_STAGES - 2)`` always means "step i's tile has landed".
        ``W_RESIDENT``: ``w_buf`` holds every step's W tile already (NUM_STAGES = the steps): no copies.

        ``HAND_OVER`` (the dequantizing warps of :func:`_rebuild_k_ws`; returns nothing): instead of the
        MMA, synchronize the partition and signal slot i % X_BUFS ready, then wait until MMA i - 1 has
        retired (its slot's *empty* mbarrier) before copying into the stage it read (X_BUFS = NUM_STAGES
        when W streams). So the tile of step i + 1 is dequantized while MMA i runs, as without it, and the
        slot step i + 1 writes was freed by MMA i + 1 - X_BUFS, whose retirement an earlier step waited for."""
        NUM_STEPS: gl.constexpr = C // BLOCK_C
        dtype: gl.constexpr = x_buf.dtype
        if not W_RESIDENT:
            for j in gl.static_range(NUM_STAGES - 1):
                if j < NUM_STEPS:
                    _cp_async(w_buf.index(j), w_ptrs + j * BLOCK_C)
                async_copy.commit_group()
        codes, scales, zeros = _step_sources(kp_ptr, ks_ptr, kz_ptr, kt_ptr, b, rows, page, slot, g, s_pb, s_pl,
                                             s_sb, s_sl, s_sc, s_zb, s_zl, s_zc, s_tb, s_tl, s_tc, BITS, PER_CHANNEL,
                                             FROM_TAIL, GROUP, BLOCK_C, byte_l, dq_l)
        word, s, z = _load_step(codes, scales, zeros, 0, s_sc, s_zc, s_tc, BITS, PER_CHANNEL, FROM_TAIL, GROUP,
                                BLOCK_C)
        if HAS_COL0:  # channel 0 of every row is col0 (exact): the first step only
            v0 = gl.load(c0_ptr + gl.convert_layout(page * s_cb + slot * s_cl, gl.SliceLayout(1, dq_l)))
            first_col = gl.arange(0, BLOCK_C, layout=gl.SliceLayout(0, dq_l)) == 0
        if not HAND_OVER:
            acc = gl.zeros((BLOCK_N, F2), gl.float32, acc_l)
        for i in range(NUM_STEPS):
            nxt = _load_step(codes, scales, zeros, gl.minimum(i + 1, NUM_STEPS - 1), s_sc, s_zc, s_tc, BITS,
                             PER_CHANNEL, FROM_TAIL, GROUP, BLOCK_C)
            x = _dequant(word, s, z, BITS, PER_CHANNEL, FROM_TAIL, BLOCK_N, BLOCK_C, dq_l)
            if HAS_COL0:
                if i == 0:
                    x = gl.where(first_col[None, :], v0.to(gl.float32)[:, None], x)
            if not W_RESIDENT and not HAND_OVER:
                async_copy.wait_group(NUM_STAGES - 2)  # this step's W tile (this thread's copies of it)
            x_buf.index(i % X_BUFS).store(x.to(dtype))
            if not W_RESIDENT and HAND_OVER:  # (after the store: compiled for sm_90, the other order spills
                async_copy.wait_group(NUM_STAGES - 2)  # in the dequantizing warps' loop at 8 bits)
            fence_async_shared()  # each thread's stores (and copies) before the async-proxy (wgmma) reads
            if HAND_OVER:
                partition_barrier()  # ... and all of this partition's before its one arrive
                mbarrier.arrive(ready.index(i % X_BUFS))
                if i > 0:
                    mbarrier.wait(empty.index((i - 1) % X_BUFS), ((i - 1) // X_BUFS) & 1)
            else:
                acc = warpgroup_mma(x_buf.index(i % X_BUFS), w_buf.index(i % NUM_STAGES).permute((1, 0)), acc,
                                    is_async=True)
                acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
            if not W_RESIDENT:
                if i + NUM_STAGES - 1 < NUM_STEPS:
                    _cp_async(w_buf.index((i + NUM_STAGES - 1) % NUM_STAGES),
                              w_ptrs + (i + NUM_STAGES - 1) * BLOCK_C)
                async_copy.commit_group()
            word, s, z = nxt
        if not W_RESIDENT:
            async_copy.wait_group(0)
        if not HAND_OVER:
            return warpgroup_mma_wait(num_outstanding=0, deps=(acc,))

    @gluon.jit
    def _rebuild_rows(kp_ptr, ks_ptr, kz_ptr, kt_ptr, c0_ptr, bt_ptr, w_ptrs, x_buf, w_buf, ready, empty, r0, n, b,
                      s_btb, s_btr, s_pb, s_pl, s_sb, s_sl, s_sc, s_zb, s_zl, s_zc, s_tb, s_tl, s_tc, s_cb, s_cl,
                      C: gl.constexpr, BITS: gl.constexpr, GROUP: gl.constexpr, PER_CHANNEL: gl.constexpr,
                      HAS_COL0: gl.constexpr, PAGED: gl.constexpr, PAGE_SIZE: gl.constexpr, BLOCK_N: gl.constexpr,
                      BLOCK_C: gl.constexpr, F2: gl.constexpr, NUM_STAGES: gl.constexpr, X_BUFS: gl.constexpr,
                      W_RESIDENT: gl.constexpr, HAND_OVER: gl.constexpr, byte_l: gl.constexpr, dq_l: gl.constexpr,
                      acc_l: gl.constexpr):
        """:func:`_rebuild_k` for the cached rows r0 .. r0 + BLOCK_N (r0 < n), where the sources hold them;
        per channel, the open token group's rows from the model-dtype tail."""
        # rows past the fill read the last filled row (no masks in the loop; their scores are not stored)
        rows = gl.minimum(r0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, byte_l)), n - 1).to(gl.int64)
        page, slot = _row_places(b, rows, bt_ptr, s_btb, s_btr, PAGED, PAGE_SIZE)
        g = r0 // GROUP  # per channel: the block's token group (BLOCK_N divides GROUP)
        if PER_CHANNEL and r0 >= n // GROUP * GROUP:  # the open token group
            return _rebuild_k(kp_ptr, ks_ptr, kz_ptr, kt_ptr, c0_ptr, w_ptrs, x_buf, w_buf, ready, empty, b, rows,
                              page, slot, g, s_pb, s_pl, s_sb, s_sl, s_sc, s_zb, s_zl, s_zc, s_tb, s_tl, s_tc, s_cb,
                              s_cl, C, BITS, GROUP, PER_CHANNEL, True, HAS_COL0, BLOCK_N, BLOCK_C, F2, NUM_STAGES,
                              X_BUFS, W_RESIDENT, HAND_OVER, byte_l, dq_l, acc_l)
        else:
            return _rebuild_k(kp_ptr, ks_ptr, kz_ptr, kt_ptr, c0_ptr, w_ptrs, x_buf, w_buf, ready, empty, b, rows,
                              page, slot, g, s_pb, s_pl, s_sb, s_sl, s_sc, s_zb, s_zl, s_zc, s_tb, s_tl, s_tc, s_cb,
                              s_cl, C, BITS, GROUP, PER_CHANNEL, False, HAS_COL0, BLOCK_N, BLOCK_C, F2, NUM_STAGES,
                              X_BUFS, W_RESIDENT, HAND_OVER, byte_l, dq_l, acc_l)

    @gluon.jit
    def _w_tile_ptrs(w_ptr, h0, HKV, HALF, s_wn, F: gl.constexpr, HALF_PAD: gl.constexpr, BLOCK_C: gl.constexpr,
                     w_l: gl.constexpr):
        """The pointers of step 0's W tile [2F, BLOCK_C] (step i: + i * BLOCK_C): columns [0, F) of the
        accumulator the first halves of the tile's heads, [F, 2F) the second halves (as in _scores_kernel);
        padding columns read row 0 (finite; their query is 0)."""
        f2 = gl.arange(0, 2 * F, layout=gl.SliceLayout(1, w_l))
        fh = f2 % F
        w_rows = (h0 + fh // HALF_PAD) * (2 * HALF) + (f2 // F) * HALF + fh % HALF_PAD
        w_rows = gl.where((h0 + fh // HALF_PAD < HKV) & (fh % HALF_PAD < HALF), w_rows, 0)
        w_cols = gl.arange(0, BLOCK_C, layout=gl.SliceLayout(0, w_l))
        return w_ptr + w_rows.to(gl.int64)[:, None] * s_wn + w_cols[None, :]

    @gluon.jit
    def _ws_mma_partition(x_buf, w_buf, ready, empty, NUM_STEPS: gl.constexpr, X_BUFS: gl.constexpr,
                          W_RESIDENT: gl.constexpr, BLOCK_N: gl.constexpr, F2: gl.constexpr, acc_l: gl.constexpr):
        """The MMA warps of the warp-specialized rebuild (the kernel's own): wait until step i's X̂ and W
        tiles are ready, issue the MMA asynchronously, wait until only it is pending and hand the slot of
        MMA i - 1, which that wait retired, back to the dequantizing warps."""
        acc = gl.zeros((BLOCK_N, F2), gl.float32, acc_l)
        for i in range(NUM_STEPS):
            slot = i % X_BUFS
            mbarrier.wait(ready.index(slot), (i // X_BUFS) & 1)
            if W_RESIDENT:
                acc = warpgroup_mma(x_buf.index(slot), w_buf.index(i).permute((1, 0)), acc, is_async=True)
            else:
                acc = warpgroup_mma(x_buf.index(slot), w_buf.index(slot).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
            if i > 0:
                mbarrier.arrive(empty.index((i - 1) % X_BUFS))
        # a tuple, which triton 3.6's warp_specialize requires of a partition's results (3.9 takes either)
        return (warpgroup_mma_wait(num_outstanding=0, deps=(acc,)),)

    @gluon.jit
    def _ws_dequant_partition(kp_ptr, ks_ptr, kz_ptr, kt_ptr, c0_ptr, w_ptr, bt_ptr, x_buf, w_buf, ready, empty,
                              r0, n, b, h0, HKV, HALF, s_btb, s_btr, s_pb, s_pl, s_sb, s_sl, s_sc, s_zb, s_zl, s_zc,
                              s_tb, s_tl, s_tc, s_cb, s_cl, s_wn, C: gl.constexpr, BITS: gl.constexpr,
                              GROUP: gl.constexpr, PER_CHANNEL: gl.constexpr, HAS_COL0: gl.constexpr,
                              PAGED: gl.constexpr, PAGE_SIZE: gl.constexpr, BLOCK_N: gl.constexpr,
                              BLOCK_C: gl.constexpr, F: gl.constexpr, HALF_PAD: gl.constexpr,
                              NUM_STAGES: gl.constexpr, X_BUFS: gl.constexpr, W_RESIDENT: gl.constexpr,
                              byte_l: gl.constexpr, dq_l: gl.constexpr, w_l: gl.constexpr):
        """The dequantizing warps of the warp-specialized rebuild: the W pointers in their own layout, then
        :func:`_rebuild_rows` handing each slot over instead of issuing the MMAs."""
        w_ptrs = _w_tile_ptrs(w_ptr, h0, HKV, HALF, s_wn, F, HALF_PAD, BLOCK_C, w_l)
        _rebuild_rows(kp_ptr, ks_ptr, kz_ptr, kt_ptr, c0_ptr, bt_ptr, w_ptrs, x_buf, w_buf, ready, empty, r0, n, b,
                      s_btb, s_btr, s_pb, s_pl, s_sb, s_sl, s_sc, s_zb, s_zl, s_zc, s_tb, s_tl, s_tc, s_cb, s_cl, C,
                      BITS, GROUP, PER_CHANNEL, HAS_COL0, PAGED, PAGE_SIZE, BLOCK_N, BLOCK_C, 2 * F, NUM_STAGES,
                      X_BUFS, W_RESIDENT, True, byte_l, dq_l, None)

    @gluon.jit
    def _rebuild_k_ws(kp_ptr, ks_ptr, kz_ptr, kt_ptr, c0_ptr, w_ptr, bt_ptr, x_buf, w_buf, r0, n, b, h0, HKV, HALF,
                      s_btb, s_btr, s_pb, s_pl, s_sb, s_sl, s_sc, s_zb, s_zl, s_zc, s_tb, s_tl, s_tc, s_cb, s_cl, s_wn,
                      C: gl.constexpr, BITS: gl.constexpr, GROUP: gl.constexpr, PER_CHANNEL: gl.constexpr,
                      HAS_COL0: gl.constexpr, PAGED: gl.constexpr, PAGE_SIZE: gl.constexpr, BLOCK_N: gl.constexpr,
                      BLOCK_C: gl.constexpr, F: gl.constexpr, HALF_PAD: gl.constexpr, NUM_STAGES: gl.constexpr,
                      X_BUFS: gl.constexpr, W_RESIDENT: gl.constexpr, DEQUANT_WARPS: gl.constexpr,
                      DEQUANT_REGS: gl.constexpr, byte_l: gl.constexpr, dq_l: gl.constexpr, w_l: gl.constexpr,
                      acc_l: gl.constexpr):
        """:func:`_rebuild_k`'s K, warp-specialized (``gluon_ws=1``): ``DEQUANT_WARPS`` warps load,
        dequantize and copy W (:func:`_ws_dequant_partition`) while the kernel's warps only issue the MMAs
        (:func:`_ws_mma_partition`); a ready and an empty mbarrier per X̂ slot hand the slots over. The
        dequantization then never holds up an MMA's issue, and the MMA warps keep their registers for the
        accumulator and the epilogue."""
        ready = gl.allocate_shared_memory(gl.int64, [X_BUFS, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [X_BUFS, 1], mbarrier.MBarrierLayout())
        for k in gl.static_range(X_BUFS):
            mbarrier.init(ready.index(k), count=1)
            mbarrier.init(empty.index(k), count=1)
        NUM_STEPS: gl.constexpr = C // BLOCK_C
        # DEQUANT_REGS: the dequantizing warps' register count, 0 for none (no reallocation; triton 3.6
        # requires one). Written out twice: a Gluon kernel cannot hold the list of partitions in a variable.
        if DEQUANT_REGS == 0:
            results = gl.warp_specialize([
                (_ws_mma_partition, (x_buf, w_buf, ready, empty, NUM_STEPS, X_BUFS, W_RESIDENT, BLOCK_N, 2 * F,
                                     acc_l)),
                (_ws_dequant_partition, (kp_ptr, ks_ptr, kz_ptr, kt_ptr, c0_ptr, w_ptr, bt_ptr, x_buf, w_buf, ready,
                                         empty, r0, n, b, h0, HKV, HALF, s_btb, s_btr, s_pb, s_pl, s_sb, s_sl, s_sc,
                                         s_zb, s_zl, s_zc, s_tb, s_tl, s_tc, s_cb, s_cl, s_wn, C, BITS, GROUP,
                                         PER_CHANNEL, HAS_COL0, PAGED, PAGE_SIZE, BLOCK_N, BLOCK_C, F, HALF_PAD,
                                         NUM_STAGES, X_BUFS, W_RESIDENT, byte_l, dq_l, w_l)),
            ], [DEQUANT_WARPS])
        else:
            results = gl.warp_specialize([
                (_ws_mma_partition, (x_buf, w_buf, ready, empty, NUM_STEPS, X_BUFS, W_RESIDENT, BLOCK_N, 2 * F,
                                     acc_l)),
                (_ws_dequant_partition, (kp_ptr, ks_ptr, kz_ptr, kt_ptr, c0_ptr, w_ptr, bt_ptr, x_buf, w_buf, ready,
                                         empty, r0, n, b, h0, HKV, HALF, s_btb, s_btr, s_pb, s_pl, s_sb, s_sl, s_sc,
                                         s_zb, s_zl, s_zc, s_tb, s_tl, s_tc, s_cb, s_cl, s_wn, C, BITS, GROUP,
                                         PER_CHANNEL, HAS_COL0, PAGED, PAGE_SIZE, BLOCK_N, BLOCK_C, F, HALF_PAD,
                                         NUM_STAGES, X_BUFS, W_RESIDENT, byte_l, dq_l, w_l)),
            ], [DEQUANT_WARPS], [DEQUANT_REGS])
        for k in gl.static_range(X_BUFS):
            mbarrier.invalidate(ready.index(k))
            mbarrier.invalidate(empty.index(k))
        return results[0]

    @gluon.jit
    def _gluon_scores_kernel(
        q_ptr, kp_ptr, ks_ptr, kz_ptr, kt_ptr, c0_ptr, w_ptr, bias_ptr, cos_ptr, sin_ptr, pos_ptr, freq_ptr,
        mask_ptr, length_ptr, bt_ptr, out_ptr,
        L, HKV, R, S, GROUP_Q, HALF, qk_scale, rope_scale, s_len, s_btb, s_btr,
        s_qb, s_qh, s_qs, s_qd,
        s_pb, s_pl, s_sb, s_sl, s_sc, s_zb, s_zl, s_zc, s_tb, s_tl, s_tc, s_cb, s_cl,
        s_wn, s_cosb, s_cosl, s_cosd, s_sinb, s_sinl, s_sind, s_posb, s_posl,
        s_mb, s_mh, s_ms, s_ml,
        s_ob, s_oh, s_or, s_ol,
        C: gl.constexpr, BITS: gl.constexpr, GROUP: gl.constexpr, PER_CHANNEL: gl.constexpr,
        HAS_COL0: gl.constexpr, HAS_BIAS: gl.constexpr, MASK_KIND: gl.constexpr,
        ROPE_FROM_POSITIONS: gl.constexpr, R_PAD: gl.constexpr, HALF_PAD: gl.constexpr, BLOCK_H: gl.constexpr,
        BLOCK_N: gl.constexpr, BLOCK_C: gl.constexpr, NUM_STAGES: gl.constexpr, W_RESIDENT: gl.constexpr,
        PAGED: gl.constexpr, PAGE_SIZE: gl.constexpr, WARP_SPECIALIZE: gl.constexpr, X_BUFS: gl.constexpr,
        DEQUANT_WARPS: gl.constexpr, DEQUANT_REGS: gl.constexpr, num_warps: gl.constexpr,
    ):
        """``_scores_kernel``'s output (the scaled, masked scores of BLOCK_H KV heads' query rows against
        cached rows r0 .. r0 + BLOCK_N) with the K rebuild of :func:`_rebuild_k`. num_warps = BLOCK_N / 16:
        each warpgroup owns 64 rows of the tile.

        Grid (B · head tiles, programs along the rows). Streaming W (``W_RESIDENT`` false): one row block per
        program, as ``_scores_kernel``. ``W_RESIDENT``: the head tile's whole W slice is copied into shared
        memory once, and the program scores row blocks pid, pid + P, ... (P programs along the rows) below
        the fill: only X streams from memory (small models, whose W slice fits: SmolLM2's is 72 KB).
        ``WARP_SPECIALIZE``: the rebuild of :func:`_rebuild_k_ws` (``DEQUANT_WARPS`` more warps dequantize),
        the rest the same."""
        pid_bh = gl.program_id(0)
        num_ht = gl.cdiv(HKV, BLOCK_H)
        b = (pid_bh // num_ht).to(gl.int64)
        n = gl.minimum(gl.maximum(gl.load(length_ptr + b * s_len).to(gl.int32), 0), L)
        h0 = (pid_bh % num_ht) * BLOCK_H
        dtype: gl.constexpr = w_ptr.dtype.element_ty
        NUM_STEPS: gl.constexpr = C // BLOCK_C

        # registers of the warps that load and dequantize (the kernel's, or with WARP_SPECIALIZE the
        # DEQUANT_WARPS of the other partition): a row's codes 4 bytes (or one 32-bit word) per thread, the
        # dequantized tile in the layout unpacking them gives; W rows 8 features (16 bytes, one cp.async) per
        # thread
        LOAD_WARPS: gl.constexpr = DEQUANT_WARPS if WARP_SPECIALIZE else num_warps
        BYTES: gl.constexpr = BLOCK_C * BITS // 8
        if BITS == 4 and not PER_CHANNEL:  # one 32-bit word of 8 codes per thread and row
            byte_l: gl.constexpr = gl.BlockedLayout([1, 1], [128 // BYTES, BYTES // 4], [LOAD_WARPS, 1], [1, 0])
        else:  # 4 bytes per thread and row
            byte_l: gl.constexpr = gl.BlockedLayout([1, 4], [128 // BYTES, BYTES // 4], [LOAD_WARPS, 1], [1, 0])
        dq_l: gl.constexpr = gl.BlockedLayout([1, 32 // BITS], [128 // BYTES, BYTES // 4], [LOAD_WARPS, 1], [1, 0])
        load_w_l: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [LOAD_WARPS, 1], [1, 0])
        F: gl.constexpr = BLOCK_H * HALF_PAD
        # shared memory: X_BUFS X̂ buffers, NUM_STAGES W tiles (W_RESIDENT: all of them)
        x_buf = gl.allocate_shared_memory(dtype, [X_BUFS, BLOCK_N, BLOCK_C],
                                          gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_C], dtype))
        w_buf = gl.allocate_shared_memory(dtype, [NUM_STAGES, 2 * F, BLOCK_C],
                                          gl.NVMMASharedLayout.get_default_for([2 * F, BLOCK_C], dtype))
        # (the resident W slice is copied by the kernel's own warps)
        w_ptrs = _w_tile_ptrs(w_ptr, h0, HKV, HALF, s_wn, F, HALF_PAD, BLOCK_C,
                              gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0]))

        if W_RESIDENT:
            if gl.program_id(1) * BLOCK_N < n:  # (else no row block of this program is filled: skip the copy)
                for j in gl.static_range(NUM_STEPS):
                    _cp_async(w_buf.index(j), w_ptrs + j * BLOCK_C)
                async_copy.commit_group()
                async_copy.wait_group(0)
            for rb in range(gl.program_id(1), gl.cdiv(n, BLOCK_N), gl.num_programs(1)):
                _score_row_block(
                    rb * BLOCK_N, n, b, h0, q_ptr, kp_ptr, ks_ptr, kz_ptr, kt_ptr, c0_ptr, bias_ptr, cos_ptr,
                    sin_ptr, pos_ptr, freq_ptr, mask_ptr, bt_ptr, out_ptr, w_ptr, w_ptrs, x_buf, w_buf, HKV, R, S,
                    GROUP_Q, HALF, qk_scale, rope_scale, s_btb, s_btr, s_qb, s_qh, s_qs, s_qd, s_pb, s_pl, s_sb, s_sl,
                    s_sc, s_zb, s_zl, s_zc, s_tb, s_tl, s_tc, s_cb, s_cl, s_wn, s_cosb, s_cosl, s_cosd, s_sinb,
                    s_sinl, s_sind, s_posb, s_posl, s_mb, s_mh, s_ms, s_ml, s_ob, s_oh, s_or, s_ol, C, BITS, GROUP,
                    PER_CHANNEL, HAS_COL0, HAS_BIAS, MASK_KIND, ROPE_FROM_POSITIONS, R_PAD, HALF_PAD, BLOCK_H, BLOCK_N,
                    BLOCK_C, NUM_STAGES, W_RESIDENT, PAGED, PAGE_SIZE, WARP_SPECIALIZE, X_BUFS, DEQUANT_WARPS,
                    DEQUANT_REGS, num_warps, byte_l, dq_l, load_w_l)
        else:
            r0 = gl.program_id(1) * BLOCK_N
            if r0 < n:  # (a row block past the fill does nothing: one CUDA graph serves every fill)
                _score_row_block(
                    r0, n, b, h0, q_ptr, kp_ptr, ks_ptr, kz_ptr, kt_ptr, c0_ptr, bias_ptr, cos_ptr,
                    sin_ptr, pos_ptr, freq_ptr, mask_ptr, bt_ptr, out_ptr, w_ptr, w_ptrs, x_buf, w_buf, HKV, R, S,
                    GROUP_Q, HALF, qk_scale, rope_scale, s_btb, s_btr, s_qb, s_qh, s_qs, s_qd, s_pb, s_pl, s_sb, s_sl,
                    s_sc, s_zb, s_zl, s_zc, s_tb, s_tl, s_tc, s_cb, s_cl, s_wn, s_cosb, s_cosl, s_cosd, s_sinb,
                    s_sinl, s_sind, s_posb, s_posl, s_mb, s_mh, s_ms, s_ml, s_ob, s_oh, s_or, s_ol, C, BITS, GROUP,
                    PER_CHANNEL, HAS_COL0, HAS_BIAS, MASK_KIND, ROPE_FROM_POSITIONS, R_PAD, HALF_PAD, BLOCK_H, BLOCK_N,
                    BLOCK_C, NUM_STAGES, W_RESIDENT, PAGED, PAGE_SIZE, WARP_SPECIALIZE, X_BUFS, DEQUANT_WARPS,
                    DEQUANT_REGS, num_warps, byte_l, dq_l, load_w_l)

    @gluon.jit
    def _score_row_block(
        r0, n, b, h0, q_ptr, kp_ptr, ks_ptr, kz_ptr, kt_ptr, c0_ptr, bias_ptr, cos_ptr, sin_ptr, pos_ptr, freq_ptr,
        mask_ptr, bt_ptr, out_ptr, w_ptr, w_ptrs, x_buf, w_buf, HKV, R, S, GROUP_Q, HALF, qk_scale, rope_scale,
        s_btb, s_btr, s_qb, s_qh, s_qs, s_qd, s_pb, s_pl, s_sb, s_sl, s_sc, s_zb, s_zl, s_zc, s_tb, s_tl, s_tc, s_cb,
        s_cl, s_wn, s_cosb, s_cosl, s_cosd, s_sinb, s_sinl, s_sind, s_posb, s_posl, s_mb, s_mh, s_ms, s_ml,
        s_ob, s_oh, s_or, s_ol,
        C: gl.constexpr, BITS: gl.constexpr, GROUP: gl.constexpr, PER_CHANNEL: gl.constexpr,
        HAS_COL0: gl.constexpr, HAS_BIAS: gl.constexpr, MASK_KIND: gl.constexpr,
        ROPE_FROM_POSITIONS: gl.constexpr, R_PAD: gl.constexpr, HALF_PAD: gl.constexpr, BLOCK_H: gl.constexpr,
        BLOCK_N: gl.constexpr, BLOCK_C: gl.constexpr, NUM_STAGES: gl.constexpr, W_RESIDENT: gl.constexpr,
        PAGED: gl.constexpr, PAGE_SIZE: gl.constexpr, WARP_SPECIALIZE: gl.constexpr, X_BUFS: gl.constexpr,
        DEQUANT_WARPS: gl.constexpr, DEQUANT_REGS: gl.constexpr, num_warps: gl.constexpr, byte_l: gl.constexpr,
        dq_l: gl.constexpr, load_w_l: gl.constexpr,
    ):
        """The scores of cached rows r0 .. r0 + BLOCK_N (r0 < n): the K rebuild, then bias, RoPE, the query
        dot, the masks and the store."""
        dtype: gl.constexpr = x_buf.dtype
        F: gl.constexpr = BLOCK_H * HALF_PAD
        acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                        instr_shape=[16, 2 * F, 16])
        if WARP_SPECIALIZE:
            k = _rebuild_k_ws(kp_ptr, ks_ptr, kz_ptr, kt_ptr, c0_ptr, w_ptr, bt_ptr, x_buf, w_buf, r0, n, b, h0, HKV,
                              HALF, s_btb, s_btr, s_pb, s_pl, s_sb, s_sl, s_sc, s_zb, s_zl, s_zc, s_tb, s_tl, s_tc,
                              s_cb, s_cl, s_wn, C, BITS, GROUP, PER_CHANNEL, HAS_COL0, PAGED, PAGE_SIZE, BLOCK_N,
                              BLOCK_C, F, HALF_PAD, NUM_STAGES, X_BUFS, W_RESIDENT, DEQUANT_WARPS, DEQUANT_REGS,
                              byte_l, dq_l, load_w_l, acc_l)
        else:
            k = _rebuild_rows(kp_ptr, ks_ptr, kz_ptr, kt_ptr, c0_ptr, bt_ptr, w_ptrs, x_buf, w_buf, None, None, r0, n,
                              b, s_btb, s_btr, s_pb, s_pl, s_sb, s_sl, s_sc, s_zb, s_zl, s_zc, s_tb, s_tl, s_tc, s_cb,
                              s_cl, C, BITS, GROUP, PER_CHANNEL, HAS_COL0, PAGED, PAGE_SIZE, BLOCK_N, BLOCK_C, 2 * F,
                              NUM_STAGES, X_BUFS, W_RESIDENT, False, byte_l, dq_l, acc_l)
        # the halves apart along the highest column bit, which wgmma's accumulator keeps in each thread
        k1, k2 = gl.split(gl.permute(gl.reshape(k, [BLOCK_N, 2, F]), [0, 2, 1]))
        kl: gl.constexpr = k1.type.layout
        f = gl.arange(0, F, layout=gl.SliceLayout(0, kl))
        dh = f % HALF_PAD
        f_ok = (h0 + f // HALF_PAD < HKV) & (dh < HALF)
        if HAS_BIAS:
            w1_rows = (h0 + f // HALF_PAD) * (2 * HALF) + dh
            k1 += gl.load(bias_ptr + w1_rows, mask=f_ok, other=0.0).to(gl.float32)[None, :]
            k2 += gl.load(bias_ptr + w1_rows + HALF, mask=f_ok, other=0.0).to(gl.float32)[None, :]

        # RoPE (HF rotate_half): [k1, k2] -> [k1·c1 - k2·s1, k2·c2 + k1·s2] in fp32, rounded to the model dtype
        rows_k = r0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, kl))
        row_ok = rows_k < n
        if ROPE_FROM_POSITIONS:  # HF's default RoPE, both halves one frequency (see _rope_cos_sin)
            pos = gl.load(pos_ptr + b * s_posb + rows_k.to(gl.int64) * s_posl, mask=row_ok, other=0).to(gl.float32)
            freq = gl.load(freq_ptr + dh, mask=f_ok, other=0.0)
            angle = pos[:, None] * freq[None, :]
            # the angle reduced to [-π, π] (2π in two fp32 parts), then the hardware's fast cos/sin
            turns = libdevice.rint(angle * 0.15915494309189535)
            reduced = gl.fma(turns, -6.2831854820251465, angle)
            reduced = gl.fma(turns, 1.7484556000744883e-07, reduced)
            c = (libdevice.fast_cosf(reduced) * rope_scale).to(dtype).to(gl.float32)
            sn = (libdevice.fast_sinf(reduced) * rope_scale).to(dtype).to(gl.float32)
            kr1 = (k1 * c - k2 * sn).to(dtype)
            kr2 = (k2 * c + k1 * sn).to(dtype)
        else:
            t_mask = row_ok[:, None] & f_ok[None, :]
            cos_off = b * s_cosb + rows_k.to(gl.int64)[:, None] * s_cosl + dh[None, :] * s_cosd
            sin_off = b * s_sinb + rows_k.to(gl.int64)[:, None] * s_sinl + dh[None, :] * s_sind
            c1 = gl.load(cos_ptr + cos_off, mask=t_mask, other=0.0).to(gl.float32)
            s1 = gl.load(sin_ptr + sin_off, mask=t_mask, other=0.0).to(gl.float32)
            kr1 = (k1 * c1 - k2 * s1).to(dtype)
            c2 = gl.load(cos_ptr + cos_off + HALF * s_cosd, mask=t_mask, other=0.0).to(gl.float32)
            s2 = gl.load(sin_ptr + sin_off + HALF * s_sind, mask=t_mask, other=0.0).to(gl.float32)
            kr2 = (k2 * c2 + k1 * s2).to(dtype)

        # The scores of every query row of the tile's heads: K_rot [BLOCK_N, 2F] times the block-diagonal
        # Qᵀ [2F, M] (each head's rows see only its own features), as two wgmma from shared memory.
        M: gl.constexpr = BLOCK_H * R_PAD
        q_l: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
        m = gl.arange(0, M, layout=gl.SliceLayout(1, q_l))
        fq = gl.arange(0, F, layout=gl.SliceLayout(0, q_l))
        m_head = h0 + m // R_PAD
        r = m % R_PAD
        q_head = m_head * GROUP_Q + r // S
        q_off = b * s_qb + q_head[:, None] * s_qh + (r % S)[:, None] * s_qs + (fq % HALF_PAD)[None, :] * s_qd
        q_mask = ((m_head < HKV) & (r < R))[:, None] & ((fq // HALF_PAD)[None, :] == (m // R_PAD)[:, None]) \
            & ((h0 + fq // HALF_PAD < HKV) & (fq % HALF_PAD < HALF))[None, :]
        k_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, F], dtype)
        q_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([M, F], dtype)
        k1_s = gl.allocate_shared_memory(dtype, [BLOCK_N, F], k_sl, kr1)
        k2_s = gl.allocate_shared_memory(dtype, [BLOCK_N, F], k_sl, kr2)
        q1_s = gl.allocate_shared_memory(dtype, [M, F], q_sl,
                                         gl.load(q_ptr + q_off, mask=q_mask, other=0.0).to(dtype))
        q2_s = gl.allocate_shared_memory(dtype, [M, F], q_sl,
                                         gl.load(q_ptr + q_off + HALF * s_qd, mask=q_mask, other=0.0).to(dtype))
        fence_async_shared()
        sc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, M, 16])
        sc = warpgroup_mma(k1_s, q1_s.permute((1, 0)), gl.zeros((BLOCK_N, M), gl.float32, sc_l))
        sc = warpgroup_mma(k2_s, q2_s.permute((1, 0)), sc)
        sc = sc * qk_scale

        rows_s = r0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, sc_l))
        ms = gl.arange(0, M, layout=gl.SliceLayout(0, sc_l))
        ms_head = h0 + ms // R_PAD
        rs = ms % R_PAD
        qs_head = ms_head * GROUP_Q + rs // S
        st_mask = (rows_s < n)[:, None] & ((ms_head < HKV) & (rs < R))[None, :]
        if MASK_KIND != 0:
            m_off = (b * s_mb + (qs_head.to(gl.int64) * s_mh)[None, :] + ((rs % S).to(gl.int64) * s_ms)[None, :]
                     + (rows_s.to(gl.int64) * s_ml)[:, None])
            mv = gl.load(mask_ptr + m_off, mask=st_mask, other=0)
            if MASK_KIND == 1:
                sc = gl.where(mv != 0, sc, float("-inf"))
            else:
                sc = sc + mv.to(gl.float32)
        o_off = (b * s_ob + (ms_head.to(gl.int64) * s_oh)[None, :] + (rs.to(gl.int64) * s_or)[None, :]
                 + rows_s[:, None] * s_ol)
        gl.store(out_ptr + o_off, sc, mask=st_mask)


DEQUANT_WARPS = 4  # gluon_ws=1: the warps that dequantize for the kernel's MMA warps


def _dequant_regs(mma_warps: int) -> int:
    """gluon_ws=1: the dequantizing warps' register count (``gl.warp_specialize``'s ``worker_num_regs``; 0:
    none given). Compiled for sm_90, the smallest count with no spills anywhere in the kernel, dense and paged,
    2 and 4 bits, under triton 3.6 and 3.9 alike. Next to 8 MMA warps (128-row tiles, where 4 warps load and
    dequantize 128 rows): 184 (168, the even share of the register file, spilled under 3.6, less under 3.9).
    Next to 4 (64-row tiles): none where the count is optional (3.9 then compiles SmolLM2's tile to 80
    registers, 3 programs per multiprocessor), else 128 (96 spilled at 8 bits; 3.6 reserves 255 registers
    per thread for the kernel whatever the count: one program per multiprocessor)."""
    if mma_warps + DEQUANT_WARPS > 8:
        return 184
    return 0 if worker_regs_optional() else 128


def _x_buffers(cfg: dict, stages: int) -> int:
    """X̂ buffers: two; warp-specialized with W streamed, one per W stage (a slot holds both, handed over
    together)."""
    return stages if cfg.get("gluon_ws") and cfg["gluon"] != 2 else 2


def _shared_bytes(block_n: int, f: int, m: int, stages: int, x_bufs: int = 2, ws: bool = False) -> int:
    """Shared memory of one program: the X̂ buffers, the W stages, the rotated K halves and Qᵀ (16-bit);
    warp-specialized (``ws``) two mbarriers of 8 bytes per X̂ buffer too."""
    return 2 * (x_bufs * block_n * BLOCK_C + stages * 2 * f * BLOCK_C + 2 * block_n * f + 2 * m * f) \
        + (16 * x_bufs if ws else 0)


def _tile(a: DecodeAttentionInputs, cfg: dict, half_pad: int, r_pad: int, block_h: int, stages: int = 3) -> dict:
    """The tile's sizes: features per head half (f), query rows (m), channel steps, W stages (all the steps
    where W is resident, ``gluon=2``; else ``stages``), X̂ buffers and shared memory."""
    f, m, steps = block_h * half_pad, block_h * r_pad, a.k_weight.shape[1] // BLOCK_C
    stages = steps if cfg["gluon"] == 2 else stages
    x_bufs = _x_buffers(cfg, stages)
    return dict(f=f, m=m, steps=steps, stages=stages, x_bufs=x_bufs,
                shared=_shared_bytes(cfg["block_n"], f, m, stages, x_bufs, bool(cfg.get("gluon_ws"))))


def unsupported(a: DecodeAttentionInputs, cfg: dict, target: GpuTarget, half_pad: int, r_pad: int,
                block_h: int) -> str | None:
    """Why the Gluon scores kernel cannot run ``a`` with ``cfg`` (``gluon`` 1 or 2) on ``target`` (None: it
    can)."""
    keys, w = a.keys, a.k_weight
    tile = _tile(a, cfg, half_pad, r_pad, block_h)
    f, m = tile["f"], tile["m"]
    least = tile["shared"] if cfg["gluon"] == 2 else _tile(a, cfg, half_pad, r_pad, block_h, stages=2)["shared"]
    checks = (
        (HAS_GLUON, "this triton has no Gluon (triton >= 3.4 has)"),
        (not a.window and not a.soft_cap and a.k_norm_weight is None,
         "it applies no sliding window, soft cap or key norm (the Triton scores kernel does)"),
        (not interpreted(), "the Triton interpreter (TRITON_INTERPRET=1) does not run Gluon kernels"),
        (target.wgmma, f"it issues wgmma, which sm_{target.capability} has not (Hopper only)"),
        (keys.bits in BITS_SUPPORTED, f"{keys.bits}-bit keys are not supported (2, 4 or 8 bits are)"),
        (w.dtype in (torch.float16, torch.bfloat16), f"{w.dtype} weights (16-bit ones are supported)"),
        (w.shape[1] % BLOCK_C == 0, f"a key width of {w.shape[1]}, not a multiple of {BLOCK_C}"),
        (keys.layout == "per_channel" or keys.group % BLOCK_C == 0,
         f"per-token scale groups of {keys.group}, not a multiple of {BLOCK_C}"),
        (keys.layout == "per_token" or keys.group % cfg["block_n"] == 0,
         f"per-channel token groups of {keys.group}, not a multiple of block_n={cfg['block_n']}"),
        (cfg["block_n"] in (64, 128), f"block_n={cfg['block_n']} (64 or 128: one or two warpgroups)"),
        (not (cfg.get("gluon_ws") and keys.bits == 8 and cfg["block_n"] == 128),
         "gluon_ws=1 with 8-bit keys in 128-row tiles: its 4 dequantizing warps would spill registers in their "
         "loop (block_n=64 or gluon_ws=0 runs it)"),
        (cfg["block_c"] == BLOCK_C, f"block_c={cfg['block_c']} (it steps {BLOCK_C} channels)"),
        (2 * f <= 256 and m <= 256, f"a tile of {2 * f} features and {m} query rows (wgmma takes 256)"),
        (keys.packed.stride(2) == 1 and w.stride(1) == 1, "codes or weights with a non-unit inner stride"),
        (w.stride(0) % 8 == 0 and w.data_ptr() % 16 == 0, "weight rows not 16-byte aligned (cp.async)"),
        (keys.packed.stride(0) % 4 == 0 and keys.packed.stride(1) % 4 == 0 and keys.packed.data_ptr() % 4 == 0,
         "code rows not 4-byte aligned (it loads 32-bit words)"),
        (least <= target.shared_memory,
         f"the tile needs {least // 1024} KB of shared memory"
         + (" with the head tile's whole W slice resident (gluon=2; gluon=1 streams it)" if cfg["gluon"] == 2 else "")
         + f", more than the {target.shared_memory // 1024} KB a program has on the GPU"),
    )
    return next((why for ok, why in checks if not ok), None)


def choose(a: DecodeAttentionInputs, cfg: dict, target: GpuTarget, half_pad: int, r_pad: int, block_h: int) -> int:
    """What ``gluon="auto"`` runs for this call: 2 (W resident) where the kernel can run it so, else 1 (W
    streamed), else 0 (the Triton scores kernel, which runs every case). Shapes and layouts decide, never the
    fill n, so a CUDA graph captured once stays right for every fill."""
    for gluon in (2, 1):
        if unsupported(a, {**cfg, "gluon": gluon}, target, half_pad, r_pad, block_h) is None:
            return gluon
    return 0


def plan(a: DecodeAttentionInputs, cfg: dict, target: GpuTarget, half_pad: int, r_pad: int, block_h: int,
         head_programs: int, row_blocks: int) -> tuple[int, dict]:
    """(programs along the rows, the launch's tile constexprs) for ``cfg["gluon"]``: 1 streams W (one row
    block per program, 3 W stages where they fit, else 2), 2 keeps the head tile's W resident and runs
    programs over the row blocks, as many as fit on the GPU's multiprocessors next to the
    ``head_programs`` (batch rows x head tiles). Raises ValueError saying why it cannot run and what to do."""
    why = unsupported(a, cfg, target, half_pad, r_pad, block_h)
    if why is not None:
        raise ValueError(f"decode_attention config gluon={cfg['gluon']}: the Gluon scores kernel cannot run this "
                         f"call: {why}. Leave gluon at 0 (the Triton kernel runs every case).")
    tile = _tile(a, cfg, half_pad, r_pad, block_h)
    if tile["shared"] > target.shared_memory:  # W streamed: 3 stages where they fit, else 2 (unsupported() checked)
        tile = _tile(a, cfg, half_pad, r_pad, block_h, stages=2)
    ws = bool(cfg.get("gluon_ws"))
    num_warps = cfg["block_n"] // 16
    constexprs = dict(W_RESIDENT=cfg["gluon"] == 2, num_warps=num_warps, NUM_STAGES=tile["stages"],
                      X_BUFS=tile["x_bufs"], WARP_SPECIALIZE=ws, DEQUANT_WARPS=DEQUANT_WARPS,
                      DEQUANT_REGS=_dequant_regs(num_warps) if ws else 0)
    if cfg["gluon"] == 2:
        per_sm = max(1, min(4, target.shared_memory // (tile["shared"] + 1024)))
        programs = max(1, min(row_blocks, -(-per_sm * target.multiprocessors // max(head_programs, 1))))
        return programs, constexprs
    return row_blocks, constexprs
