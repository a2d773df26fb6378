"""``xq_compile::decode_attention``: one attention layer's decode output straight from the quantized cache.

For a few query tokens (decode, S = 1..16) and the ``n`` cached rows (``n`` = ``length``, read on the
device), per batch ``b`` and KV head ``h`` (query head ``i`` uses KV head ``i // group``, repeat_kv order):

    x̂k_j = key-source row j, dequantized                      (width Ck)
    k_j  = x̂k_j · Wk[h·D:(h+1)·D]ᵀ (+ bk),  then RoPE with cos[b, j], sin[b, j] (HF rotate_half)
    p    = softmax(sm_scale · q·kᵀ (+ mask))                   (fp32; a fully masked row gives 0)
    out  = (Σ_j p_j · x̂v_j) · Wv[h·D:(h+1)·D]ᵀ + (Σ_j p_j) · bv  (absorbed values: V is never built)

K and V are never written to memory. The CPU (default) kernel is the plain-torch reference
(:func:`reference_decode_attention`); the CUDA kernel is three Triton launches (see
:func:`decode_attention_triton`, block sizes from :func:`default_config`):

  1. ``_scores_kernel``   grid (B · KV-head tiles, row blocks of the capacity L): the K rebuild as one
     dequantize-GEMM tile per program -- ``block_n`` cached rows (dequantized once, ``block_c`` channels
     at a time, by :func:`xq_compile.kernels.tiles.dequant_tile`) times the Wkᵀ of ``block_h`` KV heads,
     two accumulators for the two halves of every head so RoPE (fp32) pairs meet elementwise -- then
     the scores of those heads' query rows as one more dot with a block-diagonal query, scaled and
     masked (natural log domain, so an HF finfo.min float mask cannot overflow to -inf), written to a
     small fp32 scratch [B, Hkv, R, L]. Scores, not K: R·n floats instead of n·D. The tile is computed
     transposed (Kᵀ = Wk·X̂ᵀ): see the kernel for why.
  2. ``_values_kernel``   grid (B · query-row blocks, splits, Cv blocks): online softmax over one chunk of
     the rows and acc += p · x̂v for one block of value channels, for the query rows of *all* KV heads
     at once (the value rows -- the X cache or the one value latent -- are the same for every head, so
     each dequantized tile serves them all); writes the chunk's (acc, max, sum) (flash-decoding).
  3. ``_reduce_kernel``   grid (B·Hkv,): combines the chunks, normalizes, projects with Wv (tl.dot) and
     adds the bias, writing [B, Hq, S, D].

Why scores go through memory instead of one fused pass: the absorbed-value accumulator of a KV head's
query rows is [group·S, Cv] with Cv up to the hidden size (4096 for a 7B MHA model), too large for
registers next to the K tile, and splitting Cv across programs would rebuild K once per Cv block,
multiplying the dominant cost. The round trip costs R·n·8 bytes per KV head, next to the
2·n·Ck·D FLOPs of its K rebuild.

Every launch reads ``n`` on the device (no ``.item()``, no host sync): a split whose chunk starts at or
past ``n`` does nothing but write an empty partial result (a row block past ``n`` returns at once), so
one CUDA graph serves every fill. The grids depend only on the capacity L and the shapes.

Row sources (the "key source" and the optional "value source"; omitted = the key source's rows, the MHA
X-cache case):
  * ``per_token``: packed uint8 [B, L, packed_width(C, bits)], scale/zero fp16 [B, L, C // group] --
    exactly the format of :mod:`xq_compile.quant`.
  * ``per_channel`` (KIVI-style, GQA key latents): codes packed the same way per row, scale/zero fp16
    [B, ceil(L / group), C] per channel for groups of ``group`` *tokens*. Only rows j < n_full =
    (n // group)·group come from the codes; rows n_full <= j < n are read in the model dtype from
    ``tail`` [B, group, C] at tail[b, j % group] (the not yet quantized residual group).
  * ``col0`` fp16 [B, L] (optional): channel 0 of the dequantized key-source rows is replaced by
    col0[b, j]. With a shared source the value rows are the same rows, so they get it too.

Triton is optional: without it the module imports and the CPU kernel works; only dispatching CUDA
tensors to the op raises (asking to install triton).
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from xq_compile import quant
from xq_compile.kernels.tiles import next_power_of_2

try:  # Triton is an optional dependency (pip install 'xq-compile[triton]').
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised by a subprocess test that hides triton
    triton = None
    tl = None

HAS_TRITON = triton is not None
LAYOUTS = ("per_token", "per_channel")

__all__ = ["HAS_TRITON", "LAYOUTS", "decode_attention", "decode_attention_triton", "reference_decode_attention"]


# --------------------------------------------------------------------------------------------------
# Input checks (shapes, dtypes and devices only: never reads tensor data, so no host sync).
# --------------------------------------------------------------------------------------------------


def _check_source(name, packed, scale, zero, tail, bits, group, layout, batch, max_len, width, dtype, device):
    if layout not in LAYOUTS:
        raise ValueError(f"{name}_layout={layout!r}; supported: {LAYOUTS}")
    if packed.dim() != 3 or packed.dtype != torch.uint8:
        raise ValueError(f"{name}_packed must be uint8 [B, L, P], got {packed.dtype} {tuple(packed.shape)}")
    expected = quant.packed_width(width, bits)  # also rejects unsupported bit widths
    if tuple(packed.shape) != (batch, max_len, expected):
        raise ValueError(
            f"{name}_packed must be [B={batch}, L={max_len}, {expected}] ({bits}-bit codes of C={width}), "
            f"got {tuple(packed.shape)}"
        )
    if group < 1:
        raise ValueError(f"{name}_group={group} must be >= 1")
    if layout == "per_token":
        if width % group:
            raise ValueError(f"{name}_group={group} does not divide the width {width} of the {name} source")
        sz_shape = (batch, max_len, width // group)
        if tail is not None:
            raise ValueError(f"{name}_tail is only for the per_channel layout")
    else:
        sz_shape = (batch, -(-max_len // group), width)
        if tail is None:
            raise ValueError(f"the per_channel {name} source needs {name}_tail [B, group, C]")
        if tuple(tail.shape) != (batch, group, width) or tail.dtype != dtype:
            raise ValueError(f"{name}_tail must be {dtype} {(batch, group, width)}, got {tail.dtype} {tuple(tail.shape)}")
    for part, t in (("scale", scale), ("zero", zero)):
        if tuple(t.shape) != sz_shape or t.dtype != quant.SCALE_DTYPE:
            raise ValueError(
                f"{name}_{part} must be {quant.SCALE_DTYPE} {sz_shape} ({layout}), got {t.dtype} {tuple(t.shape)}"
            )
    for part, t in (("packed", packed), ("scale", scale), ("zero", zero), ("tail", tail)):
        if t is not None and t.device != device:
            raise ValueError(f"{name}_{part} is on {t.device} but query is on {device}")


def _check_inputs(
    query, k_packed, k_scale, k_zero, k_tail, v_packed, v_scale, v_zero, v_tail, col0,
    k_weight, k_bias, v_weight, v_bias, cos, sin, mask, length, k_bits, k_group, k_layout,
    v_bits, v_group, v_layout,
):
    """Returns (B, Hq, S, D, Hkv, L, Ck, Cv)."""
    if query.dim() != 4 or not query.dtype.is_floating_point:
        raise ValueError(f"query must be a floating [B, Hq, S, D] tensor, got {query.dtype} {tuple(query.shape)}")
    batch, q_heads, seq, head_dim = query.shape
    dtype, device = k_weight.dtype, query.device
    if query.dtype != dtype:
        raise ValueError(f"query is {query.dtype} but the weights are {dtype}")
    if head_dim % 2:
        raise ValueError(f"head_dim={head_dim} must be even (RoPE rotates halves)")
    for name, w in (("k_weight", k_weight), ("v_weight", v_weight)):
        if w.dim() != 2 or w.dtype != dtype or w.shape[0] % head_dim or w.shape[0] == 0:
            raise ValueError(f"{name} must be {dtype} [Hkv·D, C] with D={head_dim}, got {w.dtype} {tuple(w.shape)}")
    kv_heads = k_weight.shape[0] // head_dim
    if v_weight.shape[0] != k_weight.shape[0]:
        raise ValueError(f"v_weight has {v_weight.shape[0]} output features, k_weight {k_weight.shape[0]}")
    if q_heads % kv_heads:
        raise ValueError(f"{q_heads} query heads are not a multiple of the {kv_heads} KV heads")
    for name, bias in (("k_bias", k_bias), ("v_bias", v_bias)):
        if bias is not None and (tuple(bias.shape) != (kv_heads * head_dim,) or bias.dtype != dtype):
            raise ValueError(f"{name} must be {dtype} [{kv_heads * head_dim}], got {bias.dtype} {tuple(bias.shape)}")
    if k_packed.dim() != 3:
        raise ValueError(f"k_packed must be uint8 [B, L, P], got {tuple(k_packed.shape)}")
    max_len = k_packed.shape[1]
    k_width, v_width = k_weight.shape[1], v_weight.shape[1]
    _check_source("k", k_packed, k_scale, k_zero, k_tail, k_bits, k_group, k_layout, batch, max_len, k_width, dtype, device)
    if v_packed is None:
        if v_scale is not None or v_zero is not None or v_tail is not None:
            raise ValueError("v_scale/v_zero/v_tail given without v_packed")
        if v_width != k_width:
            raise ValueError(f"shared source: v_weight reads C={v_width} channels but the rows have {k_width}")
    else:
        if v_scale is None or v_zero is None:
            raise ValueError("v_packed needs v_scale and v_zero")
        _check_source("v", v_packed, v_scale, v_zero, v_tail, v_bits, v_group, v_layout, batch, max_len, v_width,
                      dtype, device)
    if col0 is not None and (tuple(col0.shape) != (batch, max_len) or col0.dtype != quant.SCALE_DTYPE):
        raise ValueError(f"col0 must be {quant.SCALE_DTYPE} {(batch, max_len)}, got {col0.dtype} {tuple(col0.shape)}")
    for name, t in (("cos", cos), ("sin", sin)):
        if tuple(t.shape) != (batch, max_len, head_dim) or t.dtype != dtype:
            raise ValueError(f"{name} must be {dtype} {(batch, max_len, head_dim)}, got {t.dtype} {tuple(t.shape)}")
    if mask is not None:
        ok = (
            mask.dim() == 4
            and mask.shape[0] in (1, batch)
            and mask.shape[1] in (1, q_heads)
            and mask.shape[2] == seq
            and mask.shape[3] == max_len
            and (mask.dtype == torch.bool or mask.dtype.is_floating_point)
        )
        if not ok:
            raise ValueError(
                f"mask must be bool or floating [B or 1, 1 or Hq, S, L] = [{batch}|1, 1|{q_heads}, {seq}, {max_len}], "
                f"got {mask.dtype} {tuple(mask.shape)}"
            )
    if length.numel() != 1 or length.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"length must be a 1-element int32/int64 tensor, got {length.dtype} {tuple(length.shape)}")
    for name, t in (("k_weight", k_weight), ("v_weight", v_weight), ("k_bias", k_bias), ("v_bias", v_bias),
                    ("col0", col0), ("cos", cos), ("sin", sin), ("mask", mask), ("length", length)):
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device} but query is on {device}")
    return batch, q_heads, seq, head_dim, kv_heads, max_len, k_width, v_width


# --------------------------------------------------------------------------------------------------
# Torch reference (the CPU kernel of the op).
# --------------------------------------------------------------------------------------------------


def source_rows(packed, scale, zero, tail, n: int, bits: int, group: int, layout: str, dtype) -> torch.Tensor:
    """The first ``n`` rows of a source, dequantized: [B, n, C] in ``dtype`` (computed in fp32)."""
    if layout == "per_token":
        return quant.dequantize(packed[:, :n], scale[:, :n], zero[:, :n], bits, group, dtype=dtype)
    n_full = n // group * group
    codes = quant.unpack(packed[:, :n_full], bits).float()
    s = scale[:, : n_full // group].float().repeat_interleave(group, dim=1)
    z = zero[:, : n_full // group].float().repeat_interleave(group, dim=1)
    return torch.cat([(codes * s + z).to(dtype), tail[:, : n - n_full].to(dtype)], dim=1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def reference_decode_attention(
    query, k_packed, k_scale, k_zero, k_tail, v_packed, v_scale, v_zero, v_tail, col0,
    k_weight, k_bias, v_weight, v_bias, cos, sin, mask, length, k_bits, k_group, k_layout,
    v_bits, v_group, v_layout, sm_scale,
) -> torch.Tensor:
    """The op's semantics in plain torch, rounding where the Triton kernel rounds: X̂ to the model dtype,
    K (after bias and RoPE in fp32) to the model dtype before q·Kᵀ, the unnormalized probabilities to the
    model dtype before P·X̂v, and the mixed rows to the model dtype before the Wv projection; every
    product accumulates in fp32. ``length`` is read on the host here (``int``), clamped to [0, L]."""
    batch, q_heads, seq, head_dim, kv_heads, max_len, _, v_width = _check_inputs(
        query, k_packed, k_scale, k_zero, k_tail, v_packed, v_scale, v_zero, v_tail, col0,
        k_weight, k_bias, v_weight, v_bias, cos, sin, mask, length, k_bits, k_group, k_layout,
        v_bits, v_group, v_layout,
    )
    dtype = k_weight.dtype
    n = min(max(int(length), 0), max_len)
    if n == 0:
        return query.new_zeros(query.shape)
    rows = group_rows = q_heads // kv_heads * seq
    x_k = source_rows(k_packed, k_scale, k_zero, k_tail, n, k_bits, k_group, k_layout, dtype)
    if col0 is not None:
        x_k = torch.cat([col0[:, :n, None].to(dtype), x_k[..., 1:]], dim=-1)
    if v_packed is None:
        x_v = x_k
    else:
        x_v = source_rows(v_packed, v_scale, v_zero, v_tail, n, v_bits, v_group, v_layout, dtype)

    k = x_k.float() @ k_weight.float().T
    if k_bias is not None:
        k = k + k_bias.float()
    k = k.unflatten(-1, (kv_heads, head_dim)).transpose(1, 2)  # [B, Hkv, n, D]
    c, s = cos[:, None, :n].float(), sin[:, None, :n].float()
    k = (k * c + _rotate_half(k) * s).to(dtype)

    q = query.reshape(batch, kv_heads, group_rows, head_dim)  # rows g·S + s share KV head h (repeat_kv order)
    scores = (q.float() @ k.float().transpose(-1, -2)) * sm_scale  # [B, Hkv, R, n]
    if mask is not None:
        m = mask.expand(batch, q_heads, seq, max_len)[..., :n].reshape(batch, kv_heads, rows, n)
        scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m.float()
    top = scores.amax(-1, keepdim=True)
    top = torch.where(top == float("-inf"), torch.zeros_like(top), top)  # fully masked row: p = 0, not NaN
    p = torch.exp(scores - top)
    total = p.sum(-1, keepdim=True)
    mixed = p.to(dtype).float() @ x_v.float()[:, None]  # [B, Hkv, R, Cv]
    mixed = torch.where(total > 0, mixed / total, torch.zeros_like(mixed)).to(dtype)
    out = mixed.float() @ v_weight.float().unflatten(0, (kv_heads, head_dim)).transpose(-1, -2)  # [B, Hkv, R, D]
    if v_bias is not None:  # Σ p_j (x_j·Wᵀ + b) = (Σ p_j x_j)·Wᵀ + b, or 0 for a fully masked row
        out = out + (total > 0).float() * v_bias.float().unflatten(0, (kv_heads, head_dim))[None, :, None]
    return out.reshape(batch, q_heads, seq, head_dim).to(query.dtype)


# --------------------------------------------------------------------------------------------------
# The custom op.
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("xq_compile::decode_attention", mutates_args=())
def decode_attention(
    query: torch.Tensor,
    k_packed: torch.Tensor,
    k_scale: torch.Tensor,
    k_zero: torch.Tensor,
    k_tail: Optional[torch.Tensor],
    v_packed: Optional[torch.Tensor],
    v_scale: Optional[torch.Tensor],
    v_zero: Optional[torch.Tensor],
    v_tail: Optional[torch.Tensor],
    col0: Optional[torch.Tensor],
    k_weight: torch.Tensor,
    k_bias: Optional[torch.Tensor],
    v_weight: torch.Tensor,
    v_bias: Optional[torch.Tensor],
    cos: torch.Tensor,
    sin: torch.Tensor,
    mask: Optional[torch.Tensor],
    length: torch.Tensor,
    k_bits: int,
    k_group: int,
    k_layout: str,
    v_bits: int,
    v_group: int,
    v_layout: str,
    sm_scale: float,
) -> torch.Tensor:
    """Decode attention over the first ``length`` cached rows, from the quantized sources: [B, Hq, S, D].

    ``v_packed=None``: the value rows are the key-source rows (v_scale/v_zero/v_tail must be None and
    v_bits/v_group/v_layout are ignored). The CPU kernel is :func:`reference_decode_attention`.
    """
    return reference_decode_attention(
        query, k_packed, k_scale, k_zero, k_tail, v_packed, v_scale, v_zero, v_tail, col0,
        k_weight, k_bias, v_weight, v_bias, cos, sin, mask, length, k_bits, k_group, k_layout,
        v_bits, v_group, v_layout, sm_scale,
    )


@decode_attention.register_fake
def _(query, *args):
    return query.new_empty(query.shape)


@decode_attention.register_kernel("cuda")
def _(*args):
    with torch.cuda.device(args[0].device):
        return decode_attention_triton(*args)


# --------------------------------------------------------------------------------------------------
# Triton kernels.
# --------------------------------------------------------------------------------------------------

if HAS_TRITON:
    from xq_compile.kernels.tiles import dequant_tile, scale_broadcast

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
    def _fill(length_ptr, L):
        """n, the cache fill, read on the device and clamped to [0, L]."""
        n = tl.load(length_ptr).to(tl.int32)
        return tl.minimum(tl.maximum(n, 0), L)

    @triton.jit
    def _scores_kernel(
        q_ptr, kp_ptr, ks_ptr, kz_ptr, kt_ptr, c0_ptr, w_ptr, bias_ptr, cos_ptr, sin_ptr, mask_ptr, length_ptr,
        out_ptr,
        L, HKV, C, P, R, S, GROUP_Q, HALF, qk_scale,
        s_qb, s_qh, s_qs, s_qd,
        s_pb, s_pl, s_pp, s_sb, s_sl, s_sc, s_zb, s_zl, s_zc, s_tb, s_tl, s_tc, s_cb, s_cl,
        s_wn, s_wk, s_cosb, s_cosl, s_cosd, s_sinb, s_sinl, s_sind,
        s_mb, s_mh, s_ms, s_ml,
        s_ob, s_oh, s_or, s_ol,
        BITS: tl.constexpr, GROUP: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_COL0: tl.constexpr,
        HAS_BIAS: tl.constexpr, MASK_KIND: tl.constexpr,  # 0 none, 1 bool (as uint8), 2 additive float
        DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, SCALE_BCAST: tl.constexpr,
        R_PAD: tl.constexpr, HALF_PAD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        """Scores of BLOCK_H KV heads' query rows against cached rows r0 .. r0 + BLOCK_N.

        The K rebuild is one dequantize-GEMM tile: the heads' Wk times X̂ᵀ [C, BLOCK_N] (dequantized
        BLOCK_C channels at a time, once for all BLOCK_H heads), as two accumulators of BLOCK_H·HALF
        features -- the first and the second half of every head -- so RoPE's rotate_half pairs meet
        elementwise. The scores then come from one dot with a block-diagonal query (each head's rows
        see only its own features): no per-head slicing of registers is needed.
        """
        pid_bh = tl.program_id(0)
        r0 = tl.program_id(1) * BLOCK_N
        n = _fill(length_ptr, L)
        if r0 >= n:
            return  # a row block past the fill: nothing to do (one CUDA graph serves every fill)
        num_ht = tl.cdiv(HKV, BLOCK_H)
        b = (pid_bh // num_ht).to(tl.int64)  # int64: B * L * stride may exceed 2**31
        h0 = (pid_bh % num_ht) * BLOCK_H
        n_full = n // GROUP * GROUP
        dtype = w_ptr.dtype.element_ty

        # Features f: (head h0 + f // HALF_PAD, dh = f % HALF_PAD of its first half).
        f = tl.arange(0, BLOCK_H * HALF_PAD)
        dh = f % HALF_PAD
        f_ok = (h0 + f // HALF_PAD < HKV) & (dh < HALF)
        w1_rows = (h0 + f // HALF_PAD) * (2 * HALF) + dh
        w2_rows = w1_rows + HALF

        # Kᵀ = Wk · X̂ᵀ, features by rows: the dequantized tile is the *second* operand, which the tensor
        # cores read from shared memory, so the MMAs run asynchronously to the next tile's
        # dequantization. (As the first operand it would sit in registers, and ptxas serializes every
        # wgmma whose register operands the loop redefines: warning C7515.)
        k1 = tl.zeros((BLOCK_H * HALF_PAD, BLOCK_N), dtype=tl.float32)
        k2 = tl.zeros((BLOCK_H * HALF_PAD, BLOCK_N), dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            x = dequant_tile(
                kp_ptr, ks_ptr, kz_ptr, kt_ptr, c0_ptr, b, r0, n, c0, n_full, C, P,
                s_pb, s_pl, s_pp, s_sb, s_sl, s_sc, s_zb, s_zl, s_zc, s_tb, s_tl, s_tc, s_cb, s_cl,
                BITS, GROUP, PER_CHANNEL, HAS_COL0, SCALE_BCAST, BLOCK_N, BLOCK_C,
            ).to(dtype)  # X̂ rounded to the model dtype (as the reference), products in fp32
            xt = tl.trans(x)
            cols = c0 + tl.arange(0, BLOCK_C)
            w_mask = f_ok[:, None] & (cols < C)[None, :]
            # [BLOCK_H·HALF_PAD, BLOCK_C] tiles of Wk for the first and the second halves
            w1 = tl.load(w_ptr + w1_rows[:, None] * s_wn + cols[None, :] * s_wk, mask=w_mask, other=0.0)
            w2 = tl.load(w_ptr + w2_rows[:, None] * s_wn + cols[None, :] * s_wk, mask=w_mask, other=0.0)
            k1 = _dot(w1, xt, k1, DOT_PRECISION, UPCAST)
            k2 = _dot(w2, xt, k2, DOT_PRECISION, UPCAST)
        if HAS_BIAS:
            k1 += tl.load(bias_ptr + w1_rows, mask=f_ok, other=0.0).to(tl.float32)[:, None]
            k2 += tl.load(bias_ptr + w2_rows, mask=f_ok, other=0.0).to(tl.float32)[:, None]

        # RoPE (HF rotate_half): [k1, k2] -> [k1·c1 - k2·s1, k2·c2 + k1·s2], in fp32.
        rows = r0 + tl.arange(0, BLOCK_N)
        row_ok = rows < n
        t_mask = f_ok[:, None] & row_ok[None, :]
        cos_off = b * s_cosb + rows[None, :] * s_cosl + dh[:, None] * s_cosd
        sin_off = b * s_sinb + rows[None, :] * s_sinl + dh[:, None] * s_sind
        # (the tables stay in the model dtype until each product: fewer live registers after the loop)
        c1 = tl.load(cos_ptr + cos_off, mask=t_mask, other=0.0)
        s1 = tl.load(sin_ptr + sin_off, mask=t_mask, other=0.0)
        kr1 = (k1 * c1.to(tl.float32) - k2 * s1.to(tl.float32)).to(dtype)
        c2 = tl.load(cos_ptr + cos_off + HALF * s_cosd, mask=t_mask, other=0.0)
        s2 = tl.load(sin_ptr + sin_off + HALF * s_sind, mask=t_mask, other=0.0)
        kr2 = (k2 * c2.to(tl.float32) + k1 * s2.to(tl.float32)).to(dtype)

        # Query rows m: (head h0 + m // R_PAD, row r = g·S + s of the query heads sharing it, in repeat_kv
        # order), as a block-diagonal [BLOCK_H·R_PAD, BLOCK_H·HALF_PAD] operand (each head's rows see only
        # its own features), so the scores of every head of the tile are one product Q·Kᵀ.
        m = tl.arange(0, BLOCK_H * R_PAD)
        m_head = h0 + m // R_PAD
        r = m % R_PAD
        m_ok = (m_head < HKV) & (r < R)
        q_head = m_head * GROUP_Q + r // S
        q_tok = r % S
        q_off = b * s_qb + q_head[:, None] * s_qh + q_tok[:, None] * s_qs + dh[None, :] * s_qd
        own = (m // R_PAD)[:, None] == (f // HALF_PAD)[None, :]  # the block-diagonal
        q_mask = m_ok[:, None] & f_ok[None, :] & own
        q1 = tl.load(q_ptr + q_off, mask=q_mask, other=0.0).to(dtype)
        q2 = tl.load(q_ptr + q_off + HALF * s_qd, mask=q_mask, other=0.0).to(dtype)
        sc = tl.zeros((BLOCK_H * R_PAD, BLOCK_N), dtype=tl.float32)
        sc = _dot(q1, kr1, sc, DOT_PRECISION, UPCAST)
        sc = _dot(q2, kr2, sc, DOT_PRECISION, UPCAST)  # [BLOCK_H·R_PAD, BLOCK_N]
        sc = sc * qk_scale
        st_mask = m_ok[:, None] & row_ok[None, :]
        if MASK_KIND != 0:
            m_off = b * s_mb + q_head[:, None] * s_mh + q_tok[:, None] * s_ms + rows[None, :] * s_ml
            mv = tl.load(mask_ptr + m_off, mask=st_mask, other=0)
            if MASK_KIND == 1:
                sc = tl.where(mv != 0, sc, float("-inf"))
            else:
                sc = sc + mv.to(tl.float32)
        o_off = b * s_ob + m_head[:, None] * s_oh + r[:, None] * s_or + rows[None, :] * s_ol
        tl.store(out_ptr + o_off, sc, mask=st_mask)

    @triton.jit
    def _values_kernel(
        sc_ptr, vp_ptr, vs_ptr, vz_ptr, vt_ptr, c0_ptr, length_ptr, acc_ptr, m_ptr, l_ptr,
        L, M_ALL, C, P,
        s_cb_, s_cm_, s_cl_,
        s_pb, s_pl, s_pp, s_sb, s_sl, s_sc, s_zb, s_zl, s_zc, s_tb, s_tl, s_tc, s_cb, s_cl,
        s_ab, s_as, s_am, s_ac,
        s_mb, s_ms, s_mm,
        BITS: tl.constexpr, GROUP: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_COL0: tl.constexpr,
        SCALE_BCAST: tl.constexpr, OUT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
        NUM_SPLITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_CV: tl.constexpr,
    ):
        """Online softmax over one split's rows and acc += p · x̂v for one block of value channels.

        The value rows are the same for every KV head (the X cache, or the one value latent), so the
        query rows of all heads -- M_ALL = Hkv·R, flattened -- share each dequantized tile: BLOCK_M of
        them per program (flash-decoding over the splits)."""
        pid_bm = tl.program_id(0)
        split = tl.program_id(1)
        c0 = tl.program_id(2) * BLOCK_CV
        num_mb = tl.cdiv(M_ALL, BLOCK_M)
        b = (pid_bm // num_mb).to(tl.int64)
        m = (pid_bm % num_mb) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = m < M_ALL
        # this split's rows: the n rows cut into NUM_SPLITS chunks of whole BLOCK_N blocks, from the n
        # on the device (so every fill spreads over all splits)
        n = _fill(length_ptr, L)
        per_split = tl.cdiv(tl.cdiv(n, NUM_SPLITS), BLOCK_N) * BLOCK_N
        start = split * per_split
        end = tl.minimum(start + per_split, n)
        n_full = n // GROUP * GROUP

        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_CV), dtype=tl.float32)
        for j0 in range(start, end, BLOCK_N):
            rows = j0 + tl.arange(0, BLOCK_N)
            s = tl.load(sc_ptr + b * s_cb_ + m[:, None] * s_cm_ + rows[None, :] * s_cl_,
                        mask=m_ok[:, None] & (rows < end)[None, :], other=float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            # A row with every score -inf so far (masked) keeps p = 0 instead of exp(-inf + inf) = NaN.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            x = dequant_tile(
                vp_ptr, vs_ptr, vz_ptr, vt_ptr, c0_ptr, b, j0, end, c0, n_full, C, P,
                s_pb, s_pl, s_pp, s_sb, s_sl, s_sc, s_zb, s_zl, s_zc, s_tb, s_tl, s_tc, s_cb, s_cl,
                BITS, GROUP, PER_CHANNEL, HAS_COL0, SCALE_BCAST, BLOCK_N, BLOCK_CV,
            ).to(OUT_DTYPE)
            acc = acc * alpha[:, None]
            acc = _dot(p.to(OUT_DTYPE), x, acc, DOT_PRECISION, UPCAST)
            m_i = m_new
        cols = c0 + tl.arange(0, BLOCK_CV)
        a_off = b * s_ab + split * s_as + m[:, None] * s_am + cols[None, :] * s_ac
        tl.store(acc_ptr + a_off, acc, mask=m_ok[:, None] & (cols < C)[None, :])
        if c0 == 0:
            ml_off = b * s_mb + split * s_ms + m * s_mm
            tl.store(m_ptr + ml_off, m_i, mask=m_ok)
            tl.store(l_ptr + ml_off, l_i, mask=m_ok)

    @triton.jit
    def _reduce_kernel(
        acc_ptr, m_ptr, l_ptr, w_ptr, bias_ptr, out_ptr,
        HKV, C, R, S, GROUP_Q, D, NUM_SPLITS,
        s_ab, s_as, s_am, s_ac,
        s_mb, s_ms, s_mm,
        s_wn, s_wk,
        s_ob, s_oh, s_os, s_od,
        HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
        R_PAD: tl.constexpr, D_PAD: tl.constexpr, BLOCK_CV: tl.constexpr,
    ):
        """Combines the splits of KV head h's R query rows (flattened rows h·R + r), normalizes, projects
        with Wv and adds the bias, writing [B, Hq, S, D]."""
        pid_bh = tl.program_id(0)
        b = (pid_bh // HKV).to(tl.int64)
        h = pid_bh % HKV
        dtype = w_ptr.dtype.element_ty
        r = tl.arange(0, R_PAD)
        r_ok = r < R
        ml_base = b * s_mb + (h * R + r) * s_mm
        # Global max and sum over the splits (an empty split has m = -inf, l = 0).
        m = tl.full((R_PAD,), float("-inf"), dtype=tl.float32)
        for sp in range(0, NUM_SPLITS):
            m = tl.maximum(m, tl.load(m_ptr + ml_base + sp * s_ms, mask=r_ok, other=float("-inf")))
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        total = tl.zeros((R_PAD,), dtype=tl.float32)
        for sp in range(0, NUM_SPLITS):
            m_s = tl.load(m_ptr + ml_base + sp * s_ms, mask=r_ok, other=float("-inf"))
            total += tl.load(l_ptr + ml_base + sp * s_ms, mask=r_ok, other=0.0) * tl.exp(m_s - m_safe)
        inv = tl.where(total > 0, 1.0 / total, 0.0)  # fully masked row (or n = 0): 0

        d = tl.arange(0, D_PAD)
        d_ok = d < D
        out = tl.zeros((R_PAD, D_PAD), dtype=tl.float32)
        for c0 in range(0, C, BLOCK_CV):
            cols = c0 + tl.arange(0, BLOCK_CV)
            c_ok = cols < C
            mixed = tl.zeros((R_PAD, BLOCK_CV), dtype=tl.float32)
            for sp in range(0, NUM_SPLITS):
                m_s = tl.load(m_ptr + ml_base + sp * s_ms, mask=r_ok, other=float("-inf"))
                part = tl.load(
                    acc_ptr + b * s_ab + sp * s_as + (h * R + r)[:, None] * s_am + cols[None, :] * s_ac,
                    mask=r_ok[:, None] & c_ok[None, :], other=0.0,
                )
                mixed += part * tl.exp(m_s - m_safe)[:, None]
            mixed = (mixed * inv[:, None]).to(dtype)  # rounded like the reference's mixed rows
            w = tl.load(w_ptr + (h * D + d)[None, :] * s_wn + cols[:, None] * s_wk,
                        mask=c_ok[:, None] & d_ok[None, :], other=0.0)
            out = _dot(mixed, w, out, DOT_PRECISION, UPCAST)
        if HAS_BIAS:
            bv = tl.load(bias_ptr + h * D + d, mask=d_ok, other=0.0).to(tl.float32)
            out += tl.where(total > 0, 1.0, 0.0)[:, None] * bv[None, :]
        q_head = h * GROUP_Q + r // S
        o_off = b * s_ob + q_head[:, None] * s_oh + (r % S)[:, None] * s_os + d[None, :] * s_od
        tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=r_ok[:, None] & d_ok[None, :])

    _TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _pow2_at_least_16(x: int) -> int:
    return max(16, next_power_of_2(x))


def _source_args(packed, scale, zero, tail, col0):
    """Pointers and strides of a source for ``dequant_tile`` (absent tensors: any valid pointer, stride 0)."""
    t = packed if tail is None else tail
    c = packed if col0 is None else col0
    t_strides = (0, 0, 0) if tail is None else tail.stride()
    c_strides = (0, 0) if col0 is None else col0.stride()
    return (packed, scale, zero, t, c), (*packed.stride(), *scale.stride(), *zero.stride(), *t_strides, *c_strides)


CONFIG_KEYS = ("block_n", "block_c", "block_h", "block_m", "block_nv", "block_cv", "num_splits", "num_warps",
               "num_stages")


def _largest_pow2_divisor(x: int, cap: int) -> int:
    p = 1
    while p < cap and x % (2 * p) == 0:
        p *= 2
    return p


def multiprocessors(device: torch.device) -> int:
    """SMs of a CUDA device (8 for CPU tensors, i.e. the interpreter)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8


def interpreted() -> bool:
    """Whether Triton runs kernels in its interpreter (TRITON_INTERPRET=1, read as Triton reads it)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() not in ("", "0", "false", "off")


def default_config(
    *, batch: int, kv_heads: int, head_dim: int, query_rows: int, max_len: int, v_width: int,
    k_layout: str, k_group: int, v_layout: str, v_group: int, dtype: torch.dtype, device: torch.device,
    sms: int | None = None,
) -> dict:
    """Block sizes, head tiles, split count and warps for a shape: a fixed rule, no autotuning (compile
    time matters, and GPU time to tune is scarce; ``benchmarks/decode_attention.py --sweep`` measures
    the alternatives on a GPU).

    Scores kernel (the K rebuild, where almost all FLOPs are): a [block_h·D, block_n] dequantize-GEMM
    tile of up to 256 features (2 heads of 128, 4 of 64) by 128 rows on 8 warps: each dequantized X̂
    element feeds 256 MACs, so the dequantization's instructions (about as many per step as for a
    128-feature tile, ``benchmarks/compile_report.py``) are spread over twice the tensor-core work.
    Fewer heads when the KV heads would leave more than 15% of a tile empty (SmolLM2's 9 heads of
    64: tiles of 2). ``block_c`` = 64 channels per step, or the scale group when that is smaller, so
    the scale is one broadcast vector per tile. Compiled for sm_90 this keeps every MMA loop free of
    register spills and of serialized wgmma for 2/3/4/8 bits under triton 3.6 and 3.9 (at 255
    registers, with a few spills after the loop); ``--sweep`` times the alternatives on a GPU.

    Values kernel: ``block_m`` flattened query rows (all heads share the value rows), ``block_nv``
    rows by ``block_cv`` value channels per step, ``num_splits`` chunks of the rows so that about two
    programs run per multiprocessor (``sms`` of them; default: those of ``device``).
    """
    d_pad = _pow2_at_least_16(head_dim // 2) * 2
    block_h = max(1, 256 // d_pad)
    while block_h > 1 and -(-kv_heads // block_h) * block_h > 1.15 * kv_heads:  # also keeps block_h <= 2·Hkv
        block_h //= 2
    block_n = 128 if dtype != torch.float32 else 64  # fp32 operands: twice the registers per element
    if k_layout == "per_channel":  # a row block inside one token group broadcasts its scales
        block_n = max(64, min(block_n, _largest_pow2_divisor(k_group, block_n)))
    block_c = 64
    if k_layout == "per_token" and k_group % 64:
        block_c = max(16, _largest_pow2_divisor(k_group, 64))
    num_warps = 8 if block_n * block_h * d_pad >= 128 * 128 else 4  # two warpgroups from 128 x 128 on

    block_m = min(64, _pow2_at_least_16(kv_heads * query_rows))
    block_nv = 64
    block_cv = 128 if v_layout == "per_channel" or v_group % 128 == 0 else 64
    block_cv = min(block_cv, _pow2_at_least_16(v_width))
    sms = sms or multiprocessors(device)
    programs = batch * -(-kv_heads * query_rows // block_m) * -(-v_width // block_cv)
    splits = max(1, min(-(-2 * sms // max(programs, 1)), -(-max_len // block_nv), 128))
    return dict(block_n=block_n, block_c=block_c, block_h=block_h, block_m=block_m, block_nv=block_nv,
                block_cv=block_cv, num_splits=splits, num_warps=num_warps, num_stages=3)


def resolve_config(
    query, k_packed, k_scale, k_zero, k_tail, v_packed, v_scale, v_zero, v_tail, col0,
    k_weight, k_bias, v_weight, v_bias, cos, sin, mask, length, k_bits, k_group, k_layout,
    v_bits, v_group, v_layout, sm_scale, sms: int | None = None,
    **config: int,
) -> dict:
    """The configuration :func:`decode_attention_triton` launches these arguments with:
    :func:`default_config` for their shapes, then the keyword overrides (:data:`CONFIG_KEYS`), checked."""
    return _resolve(
        (query, k_packed, k_scale, k_zero, k_tail, v_packed, v_scale, v_zero, v_tail, col0,
         k_weight, k_bias, v_weight, v_bias, cos, sin, mask, length, k_bits, k_group, k_layout,
         v_bits, v_group, v_layout), config, sms,
    )[1]


def _resolve(args: tuple, config: dict, sms: int | None = None) -> tuple[tuple, dict]:
    """(the shapes of :func:`_check_inputs`, the launch configuration) for the op's arguments."""
    (query, k_packed, k_scale, k_zero, k_tail, v_packed, v_scale, v_zero, v_tail, col0,
     k_weight, k_bias, v_weight, v_bias, cos, sin, mask, length, k_bits, k_group, k_layout,
     v_bits, v_group, v_layout) = args
    unknown = set(config) - set(CONFIG_KEYS)
    if unknown:
        raise TypeError(f"unknown decode_attention config {sorted(unknown)}; known: {CONFIG_KEYS}")
    batch, q_heads, seq, head_dim, kv_heads, max_len, k_width, v_width = _check_inputs(
        query, k_packed, k_scale, k_zero, k_tail, v_packed, v_scale, v_zero, v_tail, col0,
        k_weight, k_bias, v_weight, v_bias, cos, sin, mask, length, k_bits, k_group, k_layout,
        v_bits, v_group, v_layout,
    )
    shapes = (batch, q_heads, seq, head_dim, kv_heads, max_len, k_width, v_width)
    shared = v_packed is None
    cfg = default_config(
        batch=batch, kv_heads=kv_heads, head_dim=head_dim, query_rows=q_heads // kv_heads * seq, max_len=max_len,
        v_width=v_width, k_layout=k_layout, k_group=k_group, v_layout=k_layout if shared else v_layout,
        v_group=k_group if shared else v_group, dtype=k_weight.dtype, device=query.device, sms=sms,
    )
    cfg.update({k: v for k, v in config.items() if v is not None})
    for key in ("block_n", "block_c", "block_m", "block_nv", "block_cv"):
        if cfg[key] < 16 or cfg[key] & (cfg[key] - 1):
            raise ValueError(f"{key}={cfg[key]} must be a power of two >= 16")
    if cfg["block_h"] < 1 or cfg["block_h"] & (cfg["block_h"] - 1):
        raise ValueError(f"block_h={cfg['block_h']} must be a power of two >= 1")
    if cfg["num_splits"] < 1:
        raise ValueError(f"num_splits={cfg['num_splits']} must be >= 1")
    return shapes, cfg


def decode_attention_triton(
    query, k_packed, k_scale, k_zero, k_tail, v_packed, v_scale, v_zero, v_tail, col0,
    k_weight, k_bias, v_weight, v_bias, cos, sin, mask, length, k_bits, k_group, k_layout,
    v_bits, v_group, v_layout, sm_scale, sms: int | None = None,
    **config: int,
) -> torch.Tensor:
    """Launch the Triton kernels (what the op's CUDA kernel calls). Same semantics as the op.

    Works on CPU tensors under ``TRITON_INTERPRET=1`` (the tests do that). ``length`` is only passed by
    pointer: nothing here reads tensor data, so the launches are CUDA-graph capturable. Keyword
    arguments (:data:`CONFIG_KEYS`) override :func:`default_config` (see :func:`resolve_config`);
    block sizes are powers of two (>= 16, ``block_h`` >= 1). ``num_warps``/``num_stages`` apply to
    the scores kernel. ``sms``: size the split count for a GPU with that many multiprocessors instead
    of the tensors' device (``benchmarks/compile_report.py`` compiles for an H200 without one).
    """
    if not HAS_TRITON:
        raise RuntimeError(
            "xq_compile::decode_attention on CUDA needs triton, which is not installed: "
            "pip install 'xq-compile[triton]' (or pip install triton)."
        )
    (batch, q_heads, seq, head_dim, kv_heads, max_len, k_width, v_width), cfg = _resolve(  # checks everything
        (query, k_packed, k_scale, k_zero, k_tail, v_packed, v_scale, v_zero, v_tail, col0,
         k_weight, k_bias, v_weight, v_bias, cos, sin, mask, length, k_bits, k_group, k_layout,
         v_bits, v_group, v_layout), config, sms,
    )
    group_q = q_heads // kv_heads
    rows = group_q * seq
    shared = v_packed is None
    dtype = k_weight.dtype
    if dtype not in _TL_DTYPES:
        raise ValueError(f"model dtype {dtype} is not supported by the Triton kernel")
    out = torch.empty(query.shape, device=query.device, dtype=query.dtype)
    if out.numel() == 0:
        return out
    dev = query.device
    r_pad = _pow2_at_least_16(rows)
    half = head_dim // 2
    splits = cfg["num_splits"]
    fp32_exact = dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest"
    precision = "ieee" if fp32_exact else "tf32"
    # The Triton interpreter (the only way these kernels run on CPU tensors) gets bf16 tl.dot wrong.
    upcast = interpreted() and dtype == torch.bfloat16

    # 1. scores of every (b, h, query row, cached row j < n); rows >= n are never written
    scores = torch.empty((batch, kv_heads, rows, max_len), device=dev, dtype=torch.float32)
    k_ptrs, k_strides = _source_args(k_packed, k_scale, k_zero, k_tail, col0)
    if mask is None:
        mask_kind, mask_t, m_strides = 0, scores, (0, 0, 0, 0)
    else:
        mask_e = mask.expand(batch, q_heads, seq, max_len)  # broadcast dims get stride 0
        mask_kind = 1 if mask.dtype == torch.bool else 2
        mask_t = mask_e.view(torch.uint8) if mask_kind == 1 else mask_e
        m_strides = mask_e.stride()
    block_h = min(cfg["block_h"], next_power_of_2(kv_heads))  # an override may exceed the heads
    grid = (batch * triton.cdiv(kv_heads, block_h), triton.cdiv(max_len, cfg["block_n"]))
    _scores_kernel[grid](
        query, *k_ptrs, k_weight, k_weight if k_bias is None else k_bias, cos, sin, mask_t, length, scores,
        max_len, kv_heads, k_width, k_packed.shape[2], rows, seq, group_q, half, float(sm_scale),
        *query.stride(), *k_strides, *k_weight.stride(), *cos.stride(), *sin.stride(), *m_strides,
        *scores.stride(),
        BITS=k_bits, GROUP=k_group, PER_CHANNEL=k_layout == "per_channel", HAS_COL0=col0 is not None,
        HAS_BIAS=k_bias is not None, MASK_KIND=mask_kind, DOT_PRECISION=precision, UPCAST=upcast,
        SCALE_BCAST=scale_broadcast(k_layout, k_group, cfg["block_n"], cfg["block_c"]),
        R_PAD=r_pad, HALF_PAD=_pow2_at_least_16(half), BLOCK_H=block_h, BLOCK_N=cfg["block_n"],
        BLOCK_C=cfg["block_c"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )

    # 2. per split: online softmax and the absorbed values Σ p·x̂v for one block of value channels,
    #    for the query rows of every KV head at once (flattened: row h·R + r)
    if shared:
        v_src, v_col0 = (k_packed, k_scale, k_zero, k_tail), col0
        bits, grp, layout = k_bits, k_group, k_layout
    else:
        v_src, v_col0 = (v_packed, v_scale, v_zero, v_tail), None
        bits, grp, layout = v_bits, v_group, v_layout
    v_ptrs, v_strides = _source_args(*v_src, v_col0)
    m_all = kv_heads * rows
    block_m = min(cfg["block_m"], _pow2_at_least_16(m_all))
    block_cv = min(cfg["block_cv"], _pow2_at_least_16(v_width))
    flat_scores = scores.view(batch, m_all, max_len)
    acc = torch.empty((batch, splits, m_all, v_width), device=dev, dtype=torch.float32)
    m_part = torch.empty((batch, splits, m_all), device=dev, dtype=torch.float32)
    l_part = torch.empty_like(m_part)
    _values_kernel[(batch * triton.cdiv(m_all, block_m), splits, triton.cdiv(v_width, block_cv))](
        flat_scores, *v_ptrs, length, acc, m_part, l_part,
        max_len, m_all, v_width, v_src[0].shape[2],
        *flat_scores.stride(), *v_strides, *acc.stride(), *m_part.stride(),
        BITS=bits, GROUP=grp, PER_CHANNEL=layout == "per_channel", HAS_COL0=v_col0 is not None,
        SCALE_BCAST=scale_broadcast(layout, grp, cfg["block_nv"], block_cv),
        OUT_DTYPE=_TL_DTYPES[dtype], DOT_PRECISION=precision, UPCAST=upcast, NUM_SPLITS=splits,
        BLOCK_M=block_m, BLOCK_N=cfg["block_nv"], BLOCK_CV=block_cv,
        # the dequantized [block_nv, block_cv] tile (codes, scales, zeros in fp32) dominates the registers
        num_warps=8 if cfg["block_nv"] * block_cv >= 8192 else 4, num_stages=2,
    )

    # 3. combine the splits, normalize, project with Wv (+ bias) into [B, Hq, S, D]
    _reduce_kernel[(batch * kv_heads,)](
        acc, m_part, l_part, v_weight, v_weight if v_bias is None else v_bias, out,
        kv_heads, v_width, rows, seq, group_q, head_dim, splits,
        *acc.stride(), *m_part.stride(), *v_weight.stride(), *out.stride(),
        HAS_BIAS=v_bias is not None, DOT_PRECISION=precision, UPCAST=upcast,
        R_PAD=r_pad, D_PAD=_pow2_at_least_16(head_dim), BLOCK_CV=min(64, block_cv),
        num_warps=4, num_stages=1,
    )
    return out
