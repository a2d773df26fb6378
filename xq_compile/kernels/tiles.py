"""The one Triton routine that turns a block of cached rows back into numbers: :func:`dequant_tile`.

Both kernel modules (``dequant_project``, ``decode_attention``) read the quantized cache through it, so
the packing format of :mod:`xq_compile.quant` is decoded in one place. Code ``k`` of a row starts at bit
``k * bits`` of the row's byte string (dense little-endian packing, 3-bit words = 8 codes in 3 bytes).

Speed notes (why there are several paths): a tile is read once per K-rebuild step, so its loads and
integer work sit right next to the tensor-core dot and must stay cheap.

* 2, 4 and 8 bits: a row's bytes for the tile are contiguous, so they are loaded as one vectorizable
  block of ``BLOCK_C * bits / 8`` bytes and split into codes in registers (``tl.interleave``), instead
  of one scalar byte load per code.
* 3 bits: codes straddle bytes, but every 3-byte word holds 8 whole codes: the tile loads its words'
  three bytes (three strided loads, not two per code) and cuts each 24-bit word into its codes.
* ``PAGED``: the rows live in pages (vLLM's paged cache) instead of one ``[B, L, ...]`` tensor: row ``j`` of
  batch row ``b`` is row ``j % page_size`` of page ``block_table[b, j // page_size]`` (:func:`cache_rows`,
  one table load per row shared by the codes, the scales, the zeros and col0).
* ``SCALE_BCAST``: when the tile lies inside one scale group (per token: ``GROUP % BLOCK_C == 0``; per
  channel: ``GROUP % BLOCK_N == 0``, the row block inside one token group) the scale and zero are a
  vector broadcast over the tile instead of a gather of one fp16 per element.
* No int-to-float conversions: codes become fp32 through their bits. Per token at 2-4 bits with a
  broadcast scale, one AND and one FMA per element (:func:`fma_code`: the code in the mantissa of 1.0,
  the offset folded into the row's zero); otherwise an OR into the mantissa of 2^23, a subtraction and
  an FMA. (Numbers and the precision bound: ``docs/kernels.md``.)
"""

from __future__ import annotations

try:  # Triton is optional (see the kernel modules).
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None
    tl = None

__all__ = ["cache_rows", "dequant_tile", "next_power_of_2", "offset64", "scale_broadcast"]


def next_power_of_2(x: int) -> int:
    """The smallest power of two >= x (1 for x <= 1): Triton block shapes must be powers of two."""
    return 1 << max(x - 1, 0).bit_length()


def scale_broadcast(layout: str, group: int, block_rows: int, block_cols: int) -> bool:
    """Whether a [block_rows, block_cols] tile (aligned to its block sizes) lies inside one scale group,
    so :func:`dequant_tile` may broadcast one scale/zero vector (its ``SCALE_BCAST``)."""
    if layout == "per_token":
        return group % block_cols == 0
    return group % block_rows == 0


if triton is not None:

    @triton.jit
    def offset64(index, stride):
        """``index * stride`` computed in int64, for a pointer offset that can pass 2**31 elements.

        Triton computes ``tl.arange`` indices and program ids in int32 and passes a stride below 2**31
        as int32, so their product wraps silently: a row index times a row stride does once
        L x row size reaches 2**31 (e.g. 4-bit codes of d = 4096 at L = 1M; a [L, 4096] output at
        L = 512K). Every offset that grows with the cache length L goes through here; offsets inside
        one row (channels, features) stay int32."""
        return index.to(tl.int64) * stride

    @triton.jit
    def cache_rows(b, rows, row_ok, bt_ptr, s_btb, s_btr, page_size: tl.constexpr, PAGED: tl.constexpr):
        """Where logical rows ``rows`` of batch row ``b`` are stored: ``(page, slot)`` such that a source
        ``[pages, rows per page, ...]`` with strides ``(s_b, s_l, ...)`` holds row ``j`` at element offset
        ``page * s_b + offset64(slot, s_l)`` (the page in int64, so that product cannot wrap).

        Dense (``PAGED`` false): the source is ``[B, L, ...]``, page = ``b``, slot = the row. Paged:
        page = ``block_table[b, j // page_size]`` (read on the device; 0 for rows not ``row_ok``, which
        the callers never load), slot = ``j % page_size``. ``page_size`` is a compile-time constant: a
        power of two (vLLM's block sizes) makes the division a shift, not a runtime integer division
        per row and step."""
        if PAGED:
            page = tl.load(bt_ptr + b * s_btb + (rows // page_size) * s_btr, mask=row_ok, other=0).to(tl.int64)
            slot = rows % page_size
        else:
            page = b
            slot = rows
        return page, slot

    @triton.jit
    def bcast_scale_zero(scale_ptr, zero_ptr, b, r0, cols, col_ok, page, slot, row_ok, c0, n_full,
                         s_sb, s_sl, s_sc, s_zb, s_zl, s_zc,
                         GROUP: tl.constexpr, PER_CHANNEL: tl.constexpr, CLAMP_ROWS: tl.constexpr):
        """The scale and zero of a ``SCALE_BCAST`` tile of :func:`dequant_tile` in fp32, shaped to broadcast
        over it: per channel ``[1, len(cols)]`` (the row block's token group, channels ``cols``), per token
        ``[BLOCK_N, 1]`` (each row's group of channel ``c0``)."""
        if PER_CHANNEL:
            # a row block of the open group reads the tail only (the scalar test is spelled as a
            # vector: the Triton interpreter rejects a scalar-and-vector mask)
            g_ok = col_ok & ((cols * 0 + r0 < n_full) | CLAMP_ROWS)
            s_off = b * s_sb + offset64(r0 // GROUP, s_sl) + cols * s_sc
            z_off = b * s_zb + offset64(r0 // GROUP, s_zl) + cols * s_zc
            s = tl.load(scale_ptr + s_off, mask=g_ok, other=0.0).to(tl.float32)[None, :]
            z = tl.load(zero_ptr + z_off, mask=g_ok, other=0.0).to(tl.float32)[None, :]
        else:
            s_off = page * s_sb + offset64(slot, s_sl) + (c0 // GROUP) * s_sc
            z_off = page * s_zb + offset64(slot, s_zl) + (c0 // GROUP) * s_zc
            s = tl.load(scale_ptr + s_off, mask=row_ok, other=0.0).to(tl.float32)[:, None]
            z = tl.load(zero_ptr + z_off, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        return s, z

    @triton.jit
    def fma_code(bits, s, z, SHIFT: tl.constexpr, BITS: tl.constexpr):
        """``code * s + z`` in fp32 for the BITS-bit code at bits ``SHIFT .. SHIFT + BITS`` of ``bits``, an
        int32 that also holds the exponent bits of 1.0 (``0x3F800000``; other codes below bit 23 are
        masked away): one AND and one FMA per element, no int-to-float conversion (those issue at a
        fraction of the FMA rate).

        The masked word is the fp32 ``m = 1 + code / 2^(23 - SHIFT)`` exactly, so ``code * s + z =
        m * s' + (z - s')`` with ``s' = s * 2^(23 - SHIFT)``; ``s'`` and ``z - s'`` are computed on the
        broadcast vectors (once per row, not per element). ``z - s'`` rounds once more than
        ``quant.dequantize``'s fp32 ``code * s + z``: by at most ``2^-24 * (|z| + 2^(23 - SHIFT) * s)``,
        i.e. ``2^-16 * s`` for ``SHIFT >= 15`` next to the fp32 rounding of ``z`` itself. On 4096 × 576
        activations with outliers that is at most 1.5e-5 of a scale against up to 0.16 of a scale for the
        rounding of X̂ to bf16; 1 in 10^5 bf16 values differs (those within ~2^-8 of a scale of zero)."""
        m = (bits & (0x3F800000 | (((1 << BITS) - 1) << SHIFT))).to(tl.float32, bitcast=True)
        s_shifted = s * (1 << (23 - SHIFT))
        return m * s_shifted + (z - s_shifted)

    @triton.jit
    def dequant_tile(
        packed_ptr, scale_ptr, zero_ptr, tail_ptr, col0_ptr,
        b, r0, row_end, c0, n_full, C, P,
        s_pb, s_pl, s_pp, s_sb, s_sl, s_sc, s_zb, s_zl, s_zc, s_tb, s_tl, s_tc, s_cb, s_cl,
        bt_ptr, s_btb, s_btr, page_size: tl.constexpr,
        BITS: tl.constexpr, GROUP: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_COL0: tl.constexpr,
        SCALE_BCAST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, PAGED: tl.constexpr,
        EVEN_C: tl.constexpr = False, CLAMP_ROWS: tl.constexpr = False,
    ):
        """Rows ``r0 .. r0 + BLOCK_N`` (valid below ``row_end``), channels ``c0 .. c0 + BLOCK_C`` (valid
        below ``C``) of a source, dequantized: fp32 [BLOCK_N, BLOCK_C]. Invalid rows are finite (0, or
        with broadcast per-channel scales their group's zero point) and get no weight from the callers
        (masked stores, zero probabilities): nothing past the fill is ever read, poisoned or not.

        Layouts (see ``decode_attention``'s docstring): per token, scale/zero [B, L, C // GROUP]; per
        channel, scale/zero [B, ceil(L / GROUP), C] and rows ``n_full <= j < row_end`` come from the
        model-dtype ``tail`` [B, GROUP, C] at ``j % GROUP``. ``HAS_COL0``: channel 0 is ``col0[b, j]``.
        ``PAGED`` (per token only): packed, scale, zero and col0 are ``[pages, page_size, ...]``, row ``j``
        of batch row ``b`` read through the block table (:func:`cache_rows`).
        Channels at or past ``C`` are finite but meaningless: callers mask them (weights, stores).
        ``EVEN_C``: the caller knows ``C`` is a multiple of ``BLOCK_C`` (and ``c0`` of ``BLOCK_C``), so no
        channel needs a mask: the loads' predicates are the rows' alone, computed once per tile instead of
        once per step. ``CLAMP_ROWS``: rows at or past ``row_end`` read row ``row_end - 1`` (the last filled
        one) instead of being masked, so no load has a row mask; per channel only where every row of the
        block is below ``n_full`` (no tail). The callers give those rows no weight, as they do masked ones.
        """
        rows = r0 + tl.arange(0, BLOCK_N)
        if CLAMP_ROWS:
            rows = tl.minimum(rows, row_end - 1)
        cols = c0 + tl.arange(0, BLOCK_C)
        row_ok = (rows < row_end) | CLAMP_ROWS
        col_ok = (cols < C) | EVEN_C
        if PER_CHANNEL:
            code_rows = row_ok & ((rows < n_full) | CLAMP_ROWS)  # rows of completed token groups
        else:
            code_rows = row_ok
        page, slot = cache_rows(b, rows, row_ok, bt_ptr, s_btb, s_btr, page_size, PAGED)
        base = packed_ptr + (page * s_pb + offset64(slot, s_pl))[:, None]

        if BITS == 3:
            # 8 codes per 3-byte word: load the words' three bytes (one strided load each) into a 24-bit
            # word, code k at bits 3k .. 3k + 2.
            word_idx = c0 // 8 + tl.arange(0, BLOCK_C // 8)
            first = word_idx * 3
            rows_ok = code_rows[:, None]
            ok0 = rows_ok & ((first < P) | EVEN_C)[None, :]
            ok1 = rows_ok & ((first + 1 < P) | EVEN_C)[None, :]
            ok2 = rows_ok & ((first + 2 < P) | EVEN_C)[None, :]
            b0 = tl.load(base + first[None, :] * s_pp, mask=ok0, other=0)
            b1 = tl.load(base + (first + 1)[None, :] * s_pp, mask=ok1, other=0)
            b2 = tl.load(base + (first + 2)[None, :] * s_pp, mask=ok2, other=0)
            word = b0.to(tl.int32) | (b1.to(tl.int32) << 8) | (b2.to(tl.int32) << 16)
        else:
            # The tile's bytes of a row are contiguous: BLOCK_C * BITS / 8 of them from byte c0 * BITS / 8.
            byte = c0 * BITS // 8 + tl.arange(0, BLOCK_C * BITS // 8)
            byte_ok = code_rows[:, None] & ((byte < P) | EVEN_C)[None, :]
            word = tl.load(base + byte[None, :] * s_pp, mask=byte_ok, other=0)
            word = word.to(tl.int32)

        if SCALE_BCAST and not PER_CHANNEL and BITS != 8:
            # One scale and zero per row: one AND and one FMA per element (fma_code), the codes turned
            # into fp32 mantissas where they lie. (Per channel the folded scale and zero would differ
            # per column: two operations per element for the one subtraction they save; at 8 bits the
            # byte's shift costs what the subtraction does.)
            s, z = bcast_scale_zero(scale_ptr, zero_ptr, b, r0, cols, col_ok, page, slot, row_ok, c0, n_full,
                                    s_sb, s_sl, s_sc, s_zb, s_zl, s_zc, GROUP, PER_CHANNEL, CLAMP_ROWS)
            if BITS == 3:
                # four copies of the word shifted so that codes 2i and 2i + 1 lie at bits 15 and 18, with
                # 1.0's exponent ORed in (what a shift carries past bit 22 fma_code masks away); codes
                # interleaved back into channel order as evens (0 4 2 6) and odds (1 5 3 7)
                t0 = (word << 15) | 0x3F800000
                t1 = (word << 9) | 0x3F800000
                t2 = (word << 3) | 0x3F800000
                t3 = (word >> 3) | 0x3F800000
                x = tl.interleave(
                    tl.interleave(tl.interleave(fma_code(t0, s, z, 15, 3), fma_code(t2, s, z, 15, 3)),
                                  tl.interleave(fma_code(t1, s, z, 15, 3), fma_code(t3, s, z, 15, 3))),
                    tl.interleave(tl.interleave(fma_code(t0, s, z, 18, 3), fma_code(t2, s, z, 18, 3)),
                                  tl.interleave(fma_code(t1, s, z, 18, 3), fma_code(t3, s, z, 18, 3))))
            else:
                # every byte in the top 8 bits of the mantissa of 1.0: code j of a byte (lowest bits
                # first) lies at bits 15 + j * BITS
                top = (word << 15) | 0x3F800000
                if BITS == 4:
                    x = tl.interleave(fma_code(top, s, z, 15, 4), fma_code(top, s, z, 19, 4))
                else:
                    x = tl.interleave(tl.interleave(fma_code(top, s, z, 15, 2), fma_code(top, s, z, 19, 2)),
                                      tl.interleave(fma_code(top, s, z, 17, 2), fma_code(top, s, z, 21, 2)))
        else:
            if BITS == 8:
                code = word
            elif BITS == 3:  # interleaving evens and odds (recursively) restores the codes' order
                evens = tl.interleave(tl.interleave(word & 7, (word >> 12) & 7),
                                      tl.interleave((word >> 6) & 7, (word >> 18) & 7))
                odds = tl.interleave(tl.interleave((word >> 3) & 7, (word >> 15) & 7),
                                     tl.interleave((word >> 9) & 7, (word >> 21) & 7))
                code = tl.interleave(evens, odds)
            elif BITS == 4:
                code = tl.interleave(word & 15, word >> 4)  # low nibble first
            elif BITS == 2:  # four codes per byte, lowest bits first
                code = tl.interleave(tl.interleave(word & 3, (word >> 4) & 3),
                                     tl.interleave((word >> 2) & 3, (word >> 6) & 3))
            if SCALE_BCAST:
                s, z = bcast_scale_zero(scale_ptr, zero_ptr, b, r0, cols, col_ok, page, slot, row_ok, c0,
                                        n_full, s_sb, s_sl, s_sc, s_zb, s_zl, s_zc,
                                        GROUP, PER_CHANNEL, CLAMP_ROWS)
            else:
                q_ok = code_rows[:, None] & col_ok[None, :]
                if PER_CHANNEL:  # groups of GROUP tokens per channel
                    s_off = b * s_sb + offset64(rows // GROUP, s_sl)[:, None] + cols[None, :] * s_sc
                    z_off = b * s_zb + offset64(rows // GROUP, s_zl)[:, None] + cols[None, :] * s_zc
                else:
                    s_off = (page * s_sb + offset64(slot, s_sl))[:, None] + (cols // GROUP)[None, :] * s_sc
                    z_off = (page * s_zb + offset64(slot, s_zl))[:, None] + (cols // GROUP)[None, :] * s_zc
                s = tl.load(scale_ptr + s_off, mask=q_ok, other=0.0).to(tl.float32)
                z = tl.load(zero_ptr + z_off, mask=q_ok, other=0.0).to(tl.float32)
            # The code as an fp32 number without an int-to-float conversion (those issue at a fraction of
            # the FMA rate and there is one per element): OR it into the mantissa of 2^23 and subtract
            # 2^23, both exact for codes < 2^23. Then code · scale + zero in fp32, as quant.dequantize does.
            code_f = (code | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
            x = code_f * s + z
        if PER_CHANNEL and not CLAMP_ROWS:
            # the residual rows n_full <= j < row_end, kept in the model dtype until their group is full
            t_ok = (row_ok & (rows >= n_full))[:, None] & col_ok[None, :]
            t = tl.load(tail_ptr + b * s_tb + (rows % GROUP)[:, None] * s_tl + cols[None, :] * s_tc,
                        mask=t_ok, other=0.0)
            x = tl.where(t_ok, t.to(tl.float32), x)
        if HAS_COL0:
            v0 = tl.load(col0_ptr + page * s_cb + offset64(slot, s_cl), mask=row_ok, other=0.0).to(tl.float32)
            x = tl.where((cols == 0)[None, :] & row_ok[:, None], v0[:, None], x)
        return x
