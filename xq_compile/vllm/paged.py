"""Attention over X rows kept in paged memory, for a whole batch of requests at once.

Plain torch, independent of vLLM (the plugin in :mod:`xq_compile.vllm.attention` feeds it vLLM's
metadata). The layout is vLLM's: a layer's pages are a ``[num_blocks, 1, block_size, C]`` uint8 tensor, a
token's ``C`` bytes are its X state (:mod:`xq_compile.vllm.layout`), ``slot_mapping[t]`` is the slot
(``block * block_size + offset``) new token ``t`` is written to, and ``block_table[r]`` lists request
``r``'s blocks in order. Requests are flattened token by token (``query_start_loc``), each request's new
tokens are the last ``query_len`` of its ``seq_len`` tokens: prefill, chunked prefill and decode are one
case.

Every step: (1) quantize + pack the new tokens' X (rotated), or with the GQA latent form their key and
value latents (:func:`latent_projection`), into their slots; (2) gather every request's
rows through its block table into one ``[requests, max_seq_len]`` batch (padded, masked); (3) rebuild K
(RoPE at each row's position) and V, or, for short queries, attend over X̂ and project once per head
(absorbed values); (4) scatter the outputs back to the flat token order. No loop over requests.

Decode batches on a GPU take :func:`fused_decode` instead of (2)-(4): ``xq_compile::decode_attention``
reads the rows straight from the pages through the block table (the Triton kernels: no gather, K and V
never written, no host sync, static shapes).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn.functional as F

from .. import quant
from ..config import XQuantConfig
from ..kernels.decode_attention import config_overrides, decode_attention
from ..latent import svd_factors
from ..rotation import rotate
from .layout import StateField, field_views

Rope = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""RoPE of keys ``[tokens, kv_heads * head_dim]`` at positions ``[tokens]`` (the model's own rotary)."""


@dataclasses.dataclass
class PagedBatch:
    """Where a step's tokens go and which rows each request reads (vLLM's attention metadata)."""

    query_start_loc: torch.Tensor  # [R + 1] offsets of each request's new tokens in the flat batch
    seq_lens: torch.Tensor  # [R] tokens of each request after this step (cached + new)
    block_table: torch.Tensor  # [R, max_blocks] block ids
    slot_mapping: torch.Tensor  # [N] slot of each new token (< 0: padding, not written)
    max_query_len: int
    max_seq_len: int


@dataclasses.dataclass
class Projection:
    """One layer's rebuild weights (this rank's K/V heads) and attention shape.

    X form: a cached row is X̂ (rotated), ``k_weight``/``v_weight`` are W_k·R, W_v·R [kv_heads * head_dim, d].
    Latent form (:func:`latent_projection`): a cached row is [key latent | value latent], ``down`` maps X to
    it, the first ``key_width`` columns rebuild K through ``k_weight`` (the up factor), the rest V."""

    k_weight: torch.Tensor
    v_weight: torch.Tensor
    k_bias: torch.Tensor | None
    v_bias: torch.Tensor | None
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    down: torch.Tensor | None = None  # latent form: [key_width + value width, d]
    key_width: int | None = None

    def row_source(self, x: torch.Tensor) -> torch.Tensor:
        """What a token caches before quantization: X, or its latents."""
        return x if self.down is None else F.linear(x, self.down)

    def key_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return rows if self.down is None else rows[:, : self.key_width]

    def value_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return rows if self.down is None else rows[:, self.key_width:]


def latent_projection(k_weight: torch.Tensor, k_bias: torch.Tensor | None, v_weight: torch.Tensor,
                      v_bias: torch.Tensor | None, rotation: torch.Tensor | None, **shape) -> Projection:
    """The GQA latent form over this rank's K/V rows: X·U_k and X·U_v (the SVD factors of
    :func:`xq_compile.latent.svd_factors`, rotated by ``rotation`` so the stored latents are already
    spread), each quantized per token like X. Each tensor-parallel rank factors only its own heads' rows,
    so it caches only their latent."""
    down_k, up_k = svd_factors(k_weight, rotation)
    down_v, up_v = svd_factors(v_weight, rotation)
    return Projection(k_weight=up_k.contiguous(), v_weight=up_v.contiguous(), k_bias=k_bias, v_bias=v_bias,
                      down=torch.cat([down_k, down_v]).contiguous(), key_width=down_k.shape[0], **shape)


def x_state(x: torch.Tensor, xquant: XQuantConfig, rotation: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The cached state of new tokens' X [N, d]: exactly what XQuantCache's X form stores for them."""
    if rotation is not None:
        x = rotate(x, rotation)
    if xquant.bits is None:
        return {"x": x}
    codes, scale, zero = quant.quantize(x, xquant.bits, xquant.group_size)
    return {"codes": quant.pack(codes, xquant.bits), "scale": scale, "zero": zero}


def x_hat(state: dict[str, torch.Tensor], xquant: XQuantConfig, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`x_state` up to the quantization error (still rotated)."""
    if xquant.bits is None:
        return state["x"].to(dtype)
    return quant.dequantize(state["codes"], state["scale"], state["zero"], xquant.bits, xquant.group_size, dtype)


NULL_SLOT = 0
"""Where padding tokens (``slot_mapping < 0``) are written: slot 0 of block 0, vLLM's null block, which its
block pool never hands to a request. Writing them there instead of dropping them keeps the store free of
host syncs (a data-dependent selection), as CUDA graphs need."""


def store(pages: torch.Tensor, slot_mapping: torch.Tensor, x: torch.Tensor, layout: tuple[StateField, ...],
          xquant: XQuantConfig, rotation: torch.Tensor | None) -> None:
    """Write the X state of the tokens into their slots (padding into :data:`NULL_SLOT`)."""
    slots, x = slot_mapping.long().clamp(min=NULL_SLOT), x[: slot_mapping.shape[0]]
    state, block_size = x_state(x, xquant, rotation), pages.shape[2]
    for name, view in field_views(pages, layout).items():
        view[slots // block_size, slots % block_size] = state[name].to(view.dtype)


def gather(pages: torch.Tensor, batch: PagedBatch, layout: tuple[StateField, ...], xquant: XQuantConfig,
           dtype: torch.dtype, static: bool = False, window: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """X̂ of every request's rows and where they sit in the padded ``[R, max_seq_len]`` batch (a bool mask).

    ``window`` (sliding-window attention, vLLM's ``sliding_window``: a query sees itself and the
    ``window - 1`` rows before it): only the rows some new token of the request still sees are read --
    vLLM frees the blocks behind the window and points their table entries at its null block.

    By default only existing rows are read and dequantized, packed ``[sum(seq_lens), d]`` (request by
    request, in position order): the rebuild cost follows the tokens held, not R x the longest request, but
    the row count is data-dependent (a host sync). ``static=True`` reads all ``R x max_seq_len`` places
    (``[R * max_seq_len, d]``; places past a request's length read whatever its block table points to, and
    the mask hides them): static shapes and no sync, for CUDA graphs."""
    block_size = pages.shape[2]
    rows = torch.arange(batch.max_seq_len, device=pages.device)
    seq_lens = batch.seq_lens.long().unsqueeze(1)
    valid = rows < seq_lens  # [R, M]
    if window is not None:  # the first new token, at seq_len - query_len, sees rows from window - 1 before it
        query_lens = (batch.query_start_loc[1:] - batch.query_start_loc[:-1]).long().unsqueeze(1)
        valid &= rows > seq_lens - query_lens - window
    if static:
        request = torch.arange(valid.shape[0], device=pages.device).unsqueeze(1).expand_as(valid).reshape(-1)
        position = rows.expand_as(valid).reshape(-1)
    else:
        request, position = valid.nonzero(as_tuple=True)
    blocks = batch.block_table.long()[request, position // block_size]
    slot = position % block_size
    x = x_hat({name: view[blocks, slot] for name, view in field_views(pages, layout).items()}, xquant, dtype)
    if static:  # places past a request's length may hold any bytes: zeros, so no inf/NaN reaches the sums
        x = torch.where(valid.reshape(-1, 1), x, 0)
    return x, valid


def absorb_values(xquant: XQuantConfig, max_query_len: int, proj: Projection) -> bool:
    """Attend over X̂ and project V once per head, instead of rebuilding V for every row, when that is
    cheaper: the same rule as the graph rewrite (a query-head·token·d reduction, weighed 4x a GEMM's
    FLOP, against the kv_heads·head_dim·d V projection of every row)."""
    return xquant.absorb_values and 4 * max_query_len * proj.num_heads <= proj.num_kv_heads * proj.head_dim


def attend(query: torch.Tensor, rows: torch.Tensor, valid: torch.Tensor, batch: PagedBatch, proj: Projection,
           rope: Rope, absorb: bool, window: int | None = None, soft_cap: float | None = None) -> torch.Tensor:
    """Causal attention of each request's new tokens (``query`` [N, heads * head_dim], RoPE applied) over
    its rows X̂ (packed or of every place, with their places ``valid`` [R, M]: see :func:`gather`), each
    token seeing at most the last ``window`` rows (itself included) when given, the scaled scores capped
    at ``soft_cap`` when given (:func:`capped`); returns [N, heads * head_dim] in the flat token order."""
    num_tokens, heads, kv_heads, head_dim = query.shape[0], proj.num_heads, proj.num_kv_heads, proj.head_dim
    requests, max_len = valid.shape
    starts = batch.query_start_loc.long()
    query_lens = starts[1:] - starts[:-1]
    token = torch.arange(num_tokens, device=query.device)
    request = torch.searchsorted(starts[1:], token, right=True)  # the request each token belongs to
    local = token - starts[request]
    padded_q = query.new_zeros(requests, batch.max_query_len, heads, head_dim)
    padded_q[request, local] = query.view(num_tokens, heads, head_dim)
    padded_q = padded_q.transpose(1, 2)  # [R, H, Q, D]

    # query i of request r sits at position (seq_len - query_len) + i and sees rows 0..that position
    positions = torch.arange(max_len, device=query.device)
    query_pos = (batch.seq_lens.long() - query_lens).unsqueeze(1) + torch.arange(batch.max_query_len,
                                                                                 device=query.device)
    mask = (positions <= query_pos.unsqueeze(-1)) & valid.unsqueeze(1)  # [R, Q, M]
    if window is not None:
        mask &= positions > query_pos.unsqueeze(-1) - window

    # rows of every place (gather's static mode), or only of the valid ones
    dense = rows.shape[0] == valid.numel()

    def padded(packed: torch.Tensor) -> torch.Tensor:  # [T, ...] -> [R, M, ...], zeros where no row
        if dense:
            return packed.view(requests, max_len, *packed.shape[1:])
        out = packed.new_zeros(requests, max_len, *packed.shape[1:])
        out[valid] = packed
        return out

    row_positions = positions.expand(requests, -1)
    row_positions = row_positions.reshape(-1) if dense else row_positions[valid]
    keys = rope(row_positions, F.linear(proj.key_rows(rows), proj.k_weight, proj.k_bias))
    keys = padded(keys).view(requests, max_len, kv_heads, head_dim).transpose(1, 2)
    if absorb:
        out = _absorbed_attention(padded_q, keys, padded(proj.value_rows(rows)), mask, proj, soft_cap)
    else:
        values = padded(F.linear(proj.value_rows(rows), proj.v_weight, proj.v_bias))
        values = values.view(requests, max_len, kv_heads, head_dim).transpose(1, 2)
        if soft_cap is None:
            out = F.scaled_dot_product_attention(padded_q, keys, values, attn_mask=mask.unsqueeze(1),
                                                 scale=proj.scale, enable_gqa=kv_heads != heads)
        else:  # SDPA has no cap on the scores
            out, _ = attention_with_lse(padded_q, keys, values, mask, proj.scale, soft_cap)
    return out.transpose(1, 2)[request, local].reshape(num_tokens, heads * head_dim)


def capped(scores: torch.Tensor, soft_cap: float | None) -> torch.Tensor:
    """Attention-logit soft-capping (Gemma 2): ``soft_cap · tanh(scores / soft_cap)`` of the scaled scores."""
    return scores if soft_cap is None else soft_cap * torch.tanh(scores / soft_cap)


def _absorbed_attention(q: torch.Tensor, keys: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor,
                        proj: Projection, soft_cap: float | None = None) -> torch.Tensor:
    """softmax(q·Kᵀ)·(X̂·W_vᵀ) computed as (softmax(q·Kᵀ)·X̂)·W_vᵀ: V has no RoPE, so the projection moves
    after the sum over rows (the bias too: the weights of a row sum to 1). Returns [R, H, Q, D]."""
    requests, heads, queries, head_dim = q.shape
    kv_heads, group = proj.num_kv_heads, heads // proj.num_kv_heads
    grouped = q.view(requests, kv_heads, group, queries, head_dim)  # query head h uses KV head h // group
    scores = capped(torch.einsum("rkgqe,rkme->rkgqm", grouped, keys) * proj.scale, soft_cap)
    scores = scores.masked_fill(~mask[:, None, None], float("-inf"))
    weights = torch.softmax(scores.float(), dim=-1).to(rows.dtype)
    mixed = torch.einsum("rkgqm,rmd->rkgqd", weights, rows)  # [R, KV, G, Q, d]
    w_v = proj.v_weight.view(kv_heads, head_dim, -1)
    out = torch.einsum("rkgqd,ked->rkgqe", mixed, w_v)
    if proj.v_bias is not None:
        out = out + proj.v_bias.view(1, kv_heads, 1, 1, head_dim)
    return out.reshape(requests, heads, queries, head_dim)


# --------------------------------------------------------------------------------------------------
# Decode context parallelism (rows sharded by token across ranks): each rank attends over its own rows
# and returns the softmax log-sum-exp; the partial outputs merge exactly. Not wired into the plugin yet
# (vLLM 0.32 runs decode context parallelism on GPU backends only). attention_with_lse is also attend's
# attention where the scores are soft-capped (SDPA cannot cap them).


def attention_with_lse(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                       scale: float, soft_cap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q`` [..., H, Q, D] over ``keys``/``values`` [..., KV, M, D] (query head h uses KV head
    h // (H / KV)) where ``mask`` [..., Q, M] allows; returns the output [..., H, Q, D] and the log-sum-exp
    of the scaled (and :func:`capped`) scores [..., H, Q] (-inf, with a zero output, where a query sees no
    row here)."""
    group = q.shape[-3] // keys.shape[-3]
    keys, values = keys.repeat_interleave(group, -3), values.repeat_interleave(group, -3)
    scores = capped((q.float() @ keys.float().transpose(-1, -2)) * scale, soft_cap)
    scores = scores.masked_fill(~mask.unsqueeze(-3), float("-inf"))
    lse = torch.logsumexp(scores, -1)
    weights = torch.exp(scores - lse.unsqueeze(-1)).nan_to_num(0.0)
    return (weights @ values.float()).to(q.dtype), lse


def merge_attention(outputs: list[torch.Tensor], lses: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine partial attentions over disjoint row sets (:func:`attention_with_lse` on each shard) into
    the attention over their union, and its log-sum-exp."""
    lse = torch.logsumexp(torch.stack(lses), 0)
    merged = sum(out.float() * torch.exp(part - lse).nan_to_num(0.0).unsqueeze(-1) for out, part in zip(outputs, lses))
    return merged.to(outputs[0].dtype), lse


# --------------------------------------------------------------------------------------------------
# The fused decode path: xq_compile::decode_attention reading the pages through the block table.


QUANTIZED_ROW = ["codes", "scale", "zero"]
"""The fields of a quantized token (:mod:`xq_compile.vllm.layout`): what the fused decode reads."""


def pages_readable(layout: tuple[StateField, ...]) -> bool:
    """Whether :func:`page_sources` can give the op its sources: quantized rows (codes, scale, zero);
    bits=None rows are the model dtype, which the op does not read."""
    return [f.name for f in layout] == QUANTIZED_ROW


def page_sources(pages: torch.Tensor, layout: tuple[StateField, ...], xquant: XQuantConfig,
                 proj: Projection) -> dict[str, torch.Tensor | None]:
    """The op's per-token sources as views of a layer's page bytes ``[num_blocks, 1, block_size, C]``
    (:func:`~xq_compile.vllm.layout.field_views`, no copy): ``k_packed`` uint8 ``[num_blocks, block_size,
    P]``, ``k_scale``/``k_zero`` fp16 ``[num_blocks, block_size, groups]``, and ``v_*`` likewise for the latent form's value latent (None for the X form,
    whose one source serves keys and values). A latent row ``[key latent | value latent]`` is quantized in
    whole groups (the attention layer checks that), so each latent's codes and scales are a contiguous
    run of the row's bytes."""
    if not pages_readable(layout):
        raise ValueError(f"the fused decode reads quantized rows (codes, scale, zero); this layer caches "
                         f"{[f.name for f in layout]} (bits=None): use the torch path (gather + attend)")
    views = field_views(pages, layout)

    def field(name: str, first: int, count: int) -> torch.Tensor:
        """Elements first .. first + count of a token's ``name``, for every slot."""
        return views[name].narrow(-1, first, count)

    bits, group = xquant.bits, xquant.group_size
    width = layout[1].width * group  # the row's channels: one scale per group
    key_width = width if proj.key_width is None else proj.key_width
    k_bytes, k_groups = quant.packed_width(key_width, bits), key_width // group
    sources = dict(k_packed=field("codes", 0, k_bytes), k_scale=field("scale", 0, k_groups),
                   k_zero=field("zero", 0, k_groups), v_packed=None, v_scale=None, v_zero=None)
    if proj.down is not None:  # latent form: the value latent follows the key latent
        v_width = width - key_width
        v_bytes, v_groups = quant.packed_width(v_width, bits), v_width // group
        sources.update(v_packed=field("codes", k_bytes, v_bytes), v_scale=field("scale", k_groups, v_groups),
                       v_zero=field("zero", k_groups, v_groups))
    return sources


@dataclasses.dataclass(frozen=True)
class KeyNorm:
    """A per-head RMSNorm of the keys before RoPE (Qwen3, Gemma 3) as the fused decode applies it:
    k · rsqrt(mean(k²) + eps) · weight, ``weight`` fp32 [head_dim] as it multiplies (Gemma's 1 + w)."""

    weight: torch.Tensor
    eps: float


def fused_decode(query: torch.Tensor, pages: torch.Tensor, batch: PagedBatch, layout: tuple[StateField, ...],
                 xquant: XQuantConfig, proj: Projection, inv_freq: torch.Tensor, config: dict | None = None,
                 window: int | None = None, soft_cap: float | None = None,
                 key_norm: KeyNorm | None = None) -> torch.Tensor:
    """Attention of a decode batch by ``xq_compile::decode_attention`` over the pages (the arguments of
    :func:`decode_arguments`), its GPU launches configured by ``config`` (overrides of the kernels'
    configuration, e.g. ``{"gluon": "auto"}``; also while vLLM captures CUDA graphs); returns
    [R, heads * head_dim]."""
    with config_overrides(**(config or {})):
        out = decode_attention(**decode_arguments(query, pages, batch, layout, xquant, proj, inv_freq, window,
                                                  soft_cap, key_norm))
    return out.reshape(query.shape[0], proj.num_heads * proj.head_dim)


def decode_arguments(query: torch.Tensor, pages: torch.Tensor, batch: PagedBatch, layout: tuple[StateField, ...],
                     xquant: XQuantConfig, proj: Projection, inv_freq: torch.Tensor, window: int | None = None,
                     soft_cap: float | None = None, key_norm: KeyNorm | None = None) -> dict:
    """The arguments (by name) of ``xq_compile::decode_attention`` for the attention of a decode batch --
    one new token per request (``query`` [R, heads * head_dim], RoPE applied, its row already stored) --
    over each request's ``seq_lens`` rows, read from the pages through the block table (:func:`page_sources`):
    K rebuilt (through ``key_norm`` where given) with plain neox RoPE at each row's position (``inv_freq``
    fp32 [head_dim / 2], the model's rotary frequencies), values absorbed. The new token is the last row, so
    every row is visible (no mask) but for a sliding ``window``: then only the last ``window`` rows, and the
    blocks behind them, which vLLM frees, are never read. ``soft_cap``: Gemma 2's cap on the scaled scores.
    (On CPU the op runs its torch reference.)"""
    requests, heads, head_dim = batch.seq_lens.shape[0], proj.num_heads, proj.head_dim
    if query.shape[0] != requests:
        raise ValueError(f"fused_decode takes one new token per request: {query.shape[0]} tokens for "
                         f"{requests} requests; use the torch path (gather + attend)")
    capacity = batch.block_table.shape[1] * pages.shape[2]
    # row j of a request sits at position j (vLLM appends a request's tokens in order)
    positions = torch.arange(capacity, device=query.device).expand(requests, capacity)
    return dict(
        query=query.view(requests, heads, 1, head_dim), **page_sources(pages, layout, xquant, proj), k_tail=None,
        v_tail=None, col0=None, k_weight=proj.k_weight, k_bias=proj.k_bias, v_weight=proj.v_weight,
        v_bias=proj.v_bias, cos=None, sin=None, mask=None, length=batch.seq_lens, k_bits=xquant.bits,
        k_group=xquant.group_size, k_layout="per_token", v_bits=xquant.bits, v_group=xquant.group_size,
        v_layout="per_token", sm_scale=proj.scale, positions=positions, rope_inv_freq=inv_freq, rope_scale=1.0,
        block_table=batch.block_table, window=window or 0, soft_cap=soft_cap or 0.0,
        k_norm_weight=None if key_norm is None else key_norm.weight,
        k_norm_eps=1e-6 if key_norm is None else key_norm.eps,
    )
