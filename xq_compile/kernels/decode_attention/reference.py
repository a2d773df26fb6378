"""The op's semantics in plain torch: the CPU kernel of ``xq_compile::decode_attention`` and the
reference the Triton kernels are tested against."""

from __future__ import annotations

import dataclasses

import torch

from xq_compile import quant
from xq_compile.kernels.decode_attention.inputs import DecodeAttentionInputs, QuantizedSource


def source_rows(source: QuantizedSource, n: int, dtype: torch.dtype) -> torch.Tensor:
    """The first ``n`` rows of a source, dequantized: [B, n, C] in ``dtype`` (computed in fp32)."""
    if source.layout == "per_token":
        return quant.dequantize(source.packed[:, :n], source.scale[:, :n], source.zero[:, :n], source.bits,
                                source.group, dtype=dtype)
    n_full = n // source.group * source.group
    codes = quant.unpack(source.packed[:, :n_full], source.bits)
    rows = quant.dequantize_along_tokens(codes, source.scale, source.zero, source.group)
    return torch.cat([rows.to(dtype), source.tail[:, : n - n_full].to(dtype)], dim=1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """HF's rotate_half: [x1, x2] -> [-x2, x1] over the last dimension (RoPE pairs d with d + D/2)."""
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def rope_tables(inputs: DecodeAttentionInputs, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [B, n, D] of the first ``n`` cached rows in the model dtype: the given tables, or HF's
    default rotary embedding from the positions (angles pos·inv_freq in fp32, both halves alike, times
    ``rope_scale``, rounded to the model dtype -- as transformers' rotary embedding computes them)."""
    a = inputs
    if not a.rope_from_positions:
        return a.cos[:, :n], a.sin[:, :n]
    angles = a.positions[:, :n].float()[..., None] * a.rope_inv_freq.float()
    emb = torch.cat([angles, angles], dim=-1)
    dtype = a.k_weight.dtype
    return (emb.cos() * a.rope_scale).to(dtype), (emb.sin() * a.rope_scale).to(dtype)


def reference_decode_attention(inputs: DecodeAttentionInputs) -> torch.Tensor:
    """The op's semantics in plain torch, rounding where the Triton kernel rounds: X̂ to the model dtype,
    K (after bias and RoPE in fp32) to the model dtype before q·Kᵀ, the unnormalized probabilities to the
    model dtype before P·X̂v, and the mixed rows to the model dtype before the Wv projection; every
    product accumulates in fp32. ``length`` is read on the host here (``int``), clamped to [0, L].

    A fill per batch row, or paged sources: each batch row is computed on its own, over its rows
    gathered into a dense batch of one (:func:`batch_row`)."""
    a = inputs
    shapes = a.check()
    batch, max_len = shapes.batch, shapes.max_len
    if a.paged or a.length.numel() > 1:
        if batch == 0:
            return a.query.new_zeros(a.query.shape)
        return torch.cat([_reference_dense(batch_row(a, b, max_len)) for b in range(batch)])
    return _reference_dense(a)


def batch_row(inputs: DecodeAttentionInputs, b: int, max_len: int) -> DecodeAttentionInputs:
    """Batch row ``b`` as a dense call of batch 1 over its first n rows (n its fill, clamped to [0, L]):
    paged sources gathered through the block table, everything else sliced."""
    a = inputs
    n = min(max(int(a.length.reshape(-1)[b if a.length.numel() > 1 else 0]), 0), max_len)
    rows = torch.arange(n, device=a.query.device)
    one = slice(b, b + 1)
    if a.paged:
        page_size = a.keys.packed.shape[1]
        pages, slots = a.block_table[b].long()[rows // page_size], rows % page_size

        def per_row(t):  # [pages, page_size, ...] -> [1, n, ...]
            return None if t is None else t[pages, slots][None]
    else:
        def per_row(t):
            return None if t is None else t[one, :n]

    def source(src: QuantizedSource | None) -> QuantizedSource | None:
        if src is None:
            return None
        if src.layout == "per_token":
            return dataclasses.replace(src, packed=per_row(src.packed), scale=per_row(src.scale),
                                       zero=per_row(src.zero))
        groups = -(-n // src.group)  # per_channel (dense only): n rows' token groups and the open tail
        return dataclasses.replace(src, packed=src.packed[one, :n], scale=src.scale[one, :groups],
                                   zero=src.zero[one, :groups], tail=src.tail[one])

    def position(t):  # indexed by (batch row, position): [B, L, ...] -> [1, n, ...]
        return None if t is None else t[one, :n]

    mask = a.mask
    if mask is not None:
        mask = mask[one if mask.shape[0] > 1 else slice(0, 1), ..., :n]
    return dataclasses.replace(
        a, query=a.query[one], keys=source(a.keys), values=source(a.values), col0=per_row(a.col0),
        cos=position(a.cos), sin=position(a.sin), positions=position(a.positions), mask=mask,
        length=torch.tensor(n, device=a.query.device), block_table=None)


def _reference_dense(a: DecodeAttentionInputs) -> torch.Tensor:
    """:func:`reference_decode_attention` for one fill and dense sources. Only rows ``lo`` .. n are read
    (``lo``: the first row the window shows some query token, 0 without a window)."""
    batch, q_heads, seq, head_dim, kv_heads, max_len, _, _ = a.check()
    dtype = a.k_weight.dtype
    n = min(max(int(a.length), 0), max_len)
    lo = a.first_row(n, seq)
    if n == 0:
        return a.query.new_zeros(a.query.shape)
    rows = q_heads // kv_heads * seq
    x_k = source_rows(a.keys, n, dtype)
    if a.col0 is not None:
        x_k = torch.cat([a.col0[:, :n, None].to(dtype), x_k[..., 1:]], dim=-1)
    x_v = (x_k if a.values is None else source_rows(a.values, n, dtype))[:, lo:]
    x_k = x_k[:, lo:]

    k = x_k.float() @ a.k_weight.float().T
    if a.k_bias is not None:
        k = k + a.k_bias.float()
    k = k.unflatten(-1, (kv_heads, head_dim)).transpose(1, 2)  # [B, Hkv, n - lo, D]
    if a.k_norm_weight is not None:  # per-head RMSNorm, in fp32 (the kernel keeps K in fp32 until after RoPE)
        k = k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + a.k_norm_eps) * a.k_norm_weight
    cos, sin = rope_tables(a, n)
    c, s = cos[:, None, lo:].float(), sin[:, None, lo:].float()
    k = (k * c + rotate_half(k) * s).to(dtype)

    q = a.query.reshape(batch, kv_heads, rows, head_dim)  # rows g·S + s share KV head h (repeat_kv order)
    scores = (q.float() @ k.float().transpose(-1, -2)) * a.sm_scale  # [B, Hkv, R, n - lo]
    if a.soft_cap:
        scores = a.soft_cap * torch.tanh(scores / a.soft_cap)
    if a.mask is not None:
        m = a.mask.expand(batch, q_heads, seq, max_len)[..., lo:n].reshape(batch, kv_heads, rows, n - lo)
        scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m.float()
    if a.window:  # query token s (row r = g·S + s) at row n - S + s sees rows j > n - S + s - window
        token = torch.arange(rows, device=scores.device) % seq
        seen = torch.arange(lo, n, device=scores.device) > (n - seq + token - a.window)[:, None]
        scores = scores.masked_fill(~seen, float("-inf"))
    top = scores.amax(-1, keepdim=True)
    top = torch.where(top == float("-inf"), torch.zeros_like(top), top)  # fully masked row: p = 0, not NaN
    p = torch.exp(scores - top)
    total = p.sum(-1, keepdim=True)
    mixed = p.to(dtype).float() @ x_v.float()[:, None]  # [B, Hkv, R, Cv]
    # a fully masked row has total == 0 exactly: 0 there; a NaN read from a poisoned row stays NaN
    mixed = torch.where(total == 0, torch.zeros_like(mixed), mixed / total).to(dtype)
    out = mixed.float() @ a.v_weight.float().unflatten(0, (kv_heads, head_dim)).transpose(-1, -2)  # [B, Hkv, R, D]
    if a.v_bias is not None:  # Σ p_j (x_j·Wᵀ + b) = (Σ p_j x_j)·Wᵀ + b, or 0 for a fully masked row
        out = out + (total != 0).float() * a.v_bias.float().unflatten(0, (kv_heads, head_dim))[None, :, None]
    return out.reshape(batch, q_heads, seq, head_dim).to(a.query.dtype)
