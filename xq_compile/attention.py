"""Attention with absorbed values: softmax(q·Kᵀ)·(X̂·W_vᵀ) computed as (softmax(q·Kᵀ)·X̂)·W_vᵀ.

V carries no RoPE, so the value projection can move after the attention weights: for a decode step
(S query tokens, n cached rows) that costs H·S·n·d + H·S·d·D FLOPs instead of rebuilding V for all n
rows (n·d·H_kv·D). The rewrite emits this function into the graph (plain torch, so Inductor fuses it).
"""

from __future__ import annotations

import torch


def absorbed_attention(
    query: torch.Tensor,        # [B, Hq, S, D]
    keys: torch.Tensor,         # [B, Hkv, n, D], RoPE applied
    x_hat: torch.Tensor,        # [B, n, d], the reconstructed (rotated) X of the cached rows
    v_weight: torch.Tensor,     # [Hkv·D, d], the value projection for that X
    v_bias: torch.Tensor | None,
    mask: torch.Tensor | None,  # [B or 1, 1 or Hq, S, n]: bool (True = attend) or additive float
    *,
    scale: float | None,
    query_heads: int,
    kv_heads: int,
    head_dim: int,
    seq_len: int,
    mask_is_bool: bool,
) -> torch.Tensor:
    """Same result as SDPA(query, keys, x_hat·v_weightᵀ + v_bias, mask) (GQA by head groups), [B, Hq, S, D].

    Shapes and dtypes are passed as plain values: the rewrite runs this on graph proxies, which know
    neither.
    """
    weights = _attention_weights(query, keys, mask, scale=scale, query_heads=query_heads, kv_heads=kv_heads,
                                 head_dim=head_dim, seq_len=seq_len, mask_is_bool=mask_is_bool).to(x_hat.dtype)
    mixed = (weights.unsqueeze(-1) * x_hat[:, None, None]).sum(-2)      # [B, Hkv, group·S, d]
    w = v_weight.unflatten(0, (kv_heads, head_dim))                     # [Hkv, D, d]
    out = mixed @ w.transpose(-1, -2)                                   # [B, Hkv, group·S, D]
    if v_bias is not None:  # Σ weights · (x·Wᵀ + b) = (Σ weights · x)·Wᵀ + (Σ weights)·b
        total = weights.sum(-1, keepdim=True).to(out.dtype)
        out = out + total * v_bias.unflatten(0, (kv_heads, head_dim)).unsqueeze(1)
    return out.reshape(-1, query_heads, seq_len, head_dim).to(query.dtype)


def decode_sdpa(
    query: torch.Tensor,        # [B, Hq, S, D]
    keys: torch.Tensor,         # [B, Hkv, n, D], RoPE applied
    values: torch.Tensor,       # [B, Hkv, n, D]
    mask: torch.Tensor | None,
    *,
    scale: float | None,
    query_heads: int,
    kv_heads: int,
    head_dim: int,
    seq_len: int,
    mask_is_bool: bool,
) -> torch.Tensor:
    """SDPA(query, keys, values, mask) for few query rows, as fused multiply-reduces, [B, Hq, S, D].

    For decode steps over the data-dependent n rows on CPU when values are not absorbed: the SDPA
    lowering of torch 2.11's Inductor guards on n > 1, which a one-token step cannot promise.
    """
    weights = _attention_weights(query, keys, mask, scale=scale, query_heads=query_heads, kv_heads=kv_heads,
                                 head_dim=head_dim, seq_len=seq_len, mask_is_bool=mask_is_bool).to(values.dtype)
    out = (weights.unsqueeze(-1) * values.unsqueeze(2)).sum(-2)         # [B, Hkv, group·S, D]
    return out.reshape(-1, query_heads, seq_len, head_dim).to(query.dtype)


def _attention_weights(query, keys, mask, *, scale, query_heads, kv_heads, head_dim, seq_len, mask_is_bool):
    """softmax(q·Kᵀ·scale + mask) with the query heads grouped by KV head: [B, Hkv, group·S, n], fp32."""
    group = query_heads // kv_heads
    scale = head_dim ** -0.5 if scale is None else scale
    # Query heads grouped by the KV head they share (repeat_kv order): [B, Hkv, group·S, D].
    q = query.reshape(-1, kv_heads, group * seq_len, head_dim)
    # q·Kᵀ as a fused multiply-reduce rather than a bmm: Inductor's bmm lowering asks whether the
    # data-dependent n equals 1 (a layout check) and gives up. Few query rows (decode), so cheap.
    scores = (q.unsqueeze(-2) * keys.unsqueeze(-3)).sum(-1).float() * scale  # [B, Hkv, group·S, n]
    if mask is not None:
        mask = mask.expand(q.shape[0], query_heads, seq_len, -1).reshape(q.shape[0], kv_heads, group * seq_len, -1)
        if mask_is_bool:
            # finfo.min, not -inf, keeps a fully masked row (a left-pad query) finite; multiplying by
            # the mask then zeroes it, which is what SDPA returns for such a row
            scores = scores.masked_fill(~mask, torch.finfo(torch.float32).min)
        else:
            scores = scores + mask.float()
    weights = scores.softmax(-1)
    if mask is not None and mask_is_bool:
        weights = weights * mask
    return weights
