"""The custom op ``xq_compile::decode_attention`` (its schema is what the rewrite emits, see
``passes/rewrite.py``): the flat arguments become a :class:`DecodeAttentionInputs` here, once; the CPU
(default) kernel is the torch reference, the CUDA kernel the Triton launcher."""

from __future__ import annotations

from typing import Optional

import torch

from xq_compile.kernels.devices import check_kernel_device
from xq_compile.kernels.decode_attention.inputs import DecodeAttentionInputs
from xq_compile.kernels.decode_attention.reference import reference_decode_attention
from xq_compile.kernels.decode_attention.triton_kernels import decode_attention_triton


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
    cos: Optional[torch.Tensor],
    sin: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    length: torch.Tensor,
    k_bits: int,
    k_group: int,
    k_layout: str,
    v_bits: int,
    v_group: int,
    v_layout: str,
    sm_scale: float,
    positions: Optional[torch.Tensor] = None,
    rope_inv_freq: Optional[torch.Tensor] = None,
    rope_scale: float = 1.0,
    block_table: Optional[torch.Tensor] = None,
    window: int = 0,
    soft_cap: float = 0.0,
    k_norm_weight: Optional[torch.Tensor] = None,
    k_norm_eps: float = 1e-6,
) -> torch.Tensor:
    """Decode attention over the first ``length`` cached rows, from the quantized sources: [B, Hq, S, D].

    ``v_packed=None``: the value rows are the key-source rows (v_scale/v_zero/v_tail must be None and
    v_bits/v_group/v_layout are ignored). RoPE: either the tables ``cos``/``sin`` [B, L, D], or (with
    cos = sin = None) HF's default rotary embedding computed in the kernel from the cached rows'
    ``positions`` [B, L] and ``rope_inv_freq`` fp32 [D/2], times ``rope_scale`` (HF's
    attention_scaling). ``length``: one fill for every batch row (1 element) or one per row ([B],
    e.g. vLLM's seq_lens). ``block_table`` int32 [B, max_blocks]: the per-token sources (and col0) are
    pages ``[pages, page_size, ...]``, row j of batch row b at page block_table[b, j // page_size], row
    j % page_size (vLLM's paged cache; the capacity L is max_blocks · page_size). ``window`` > 0 (sliding-
    window attention): query token s, at row n - S + s, sees only rows j > n - S + s - window; rows no token
    sees are never read, so they may be freed (vLLM points freed blocks at its null block). ``soft_cap`` > 0:
    the scaled scores become soft_cap · tanh(score / soft_cap) before the mask (Gemma 2). ``k_norm_weight``
    fp32 [D]: each rebuilt key head (after its bias, before RoPE) is RMS-normalized over its D features
    with ``k_norm_eps`` and multiplied by it (Qwen3, Gemma 3; Gemma's norm passes 1 + w). The CPU kernel is
    :func:`reference_decode_attention`.
    """
    return reference_decode_attention(DecodeAttentionInputs.from_op_args(
        query, k_packed, k_scale, k_zero, k_tail, v_packed, v_scale, v_zero, v_tail, col0,
        k_weight, k_bias, v_weight, v_bias, cos, sin, mask, length, k_bits, k_group, k_layout,
        v_bits, v_group, v_layout, sm_scale, positions, rope_inv_freq, rope_scale, block_table,
        window, soft_cap, k_norm_weight, k_norm_eps,
    ))


@decode_attention.register_fake
def _(query, *args):
    return query.new_empty(query.shape)


@decode_attention.register_kernel("cuda")
def _(*args):
    check_kernel_device(args[0].device, "decode_attention")
    with torch.cuda.device(args[0].device):
        return decode_attention_triton(DecodeAttentionInputs.from_op_args(*args))
