"""The latent form for grouped-query attention: cache X·U_k and X·U_v instead of X.

With fewer K/V heads than query heads, X (width d) is wider than K+V (2·Hkv·D), so caching X would
cost more than an fp16 K/V cache. The paper (docs/design.md §1) caches the latents instead:

    W_k = P_k Σ_k Q_kᵀ  (SVD, exact: rank W_k <= Hkv·D)
    latent_k = X·Q_k          [n, r]    cached, r = Hkv·D
    K        = latent_k·(P_k Σ_k)ᵀ      rebuilt (+ bias), then RoPE as in the model

and likewise for V. A latent is a change of basis of the pre-RoPE keys (values), as wide as K (V): the
memory equals KV quantization at equal bits and the gain is accuracy. Quantization as the paper found
best:

* key latent per *channel*, in groups of ``group_size`` consecutive tokens (KIVI's key grouping). A
  group can only be quantized once all its tokens exist, so the open group is quantized per channel
  over its rows so far at 4 more bits (8 at 4 bits), the top bits in its own rows of the key codes,
  and at the cache's bits when it completes: a fixed cost of g·C/2 bytes (the low bits) per layer,
  against 2·g·C for an fp16 window plus a spare group;
  ``keep_channel0=True`` also keeps channel 0 (the largest singular direction, which carries the
  outliers and is multiplied by the largest singular value) in fp16 for every row;
* value latent per *token*, like X in the plain form, optionally Hadamard-rotated (folded into the
  factors, free at rebuild time).

The SVD factors are computed once per weight (in float64) and recomputed only when the weight is
modified in place (its ``_version`` counter moves): :data:`LATENT_FACTORS`.

Everything here is plain torch that traces: the rewrite emits these functions into the graph.
"""

from __future__ import annotations

import torch
from . import quant
from ._torch_private import version_counter, weak_tensor_map
from .fused_rows import FusedRows
from .rotation import rotate

# Key-latent rows are rounded to fp16 before they are quantized: a group's minimum is then an fp16
# number, which its fp16 zero holds exactly (channel 0 has a large offset against its range, and an
# fp16 zero off by half a unit would cost it a good part of a step). keep_channel0 keeps channel 0 in it.
ROW_DTYPE = torch.float16


# --------------------------------------------------------------------------------------------------
# The factors.


def svd_factors(weight: torch.Tensor, rotation: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(down [r, d], up [out, r]) with ``F.linear(F.linear(x, down), up) == F.linear(x, weight)``.

    ``down`` has orthonormal rows (the right singular vectors), ``up = P·Σ``. With ``rotation`` (a
    block-Hadamard R, orthogonal and symmetric) the latent is rotated: down' = R·down, up' = up·R.
    Computed in float64, returned in the weight's dtype.
    """
    w = weight.detach().double()
    p, sigma, qh = torch.linalg.svd(w, full_matrices=False)
    down, up = qh, p * sigma
    if rotation is not None:
        r = rotation.to(device=w.device, dtype=torch.float64)
        down = rotate(down.T, r).T  # R·down (R symmetric): the latent x·downᵀ·R
        up = rotate(up, r)
    return down.to(weight.dtype), up.to(weight.dtype)


class LatentFactors:
    """SVD factors computed once per weight and recomputed only if the weight changes in place.

    Keyed weakly on the weight tensor itself (the factors die with the model). An entry is valid while
    the weight's ``_version`` (bumped by every in-place write), the row slice and the rotation size
    are unchanged; a new weight tensor (module.weight = ...) makes Dynamo recompile, hence a new key.
    """

    def __init__(self) -> None:
        self._factors = weak_tensor_map()
        self.computed = 0  # how many SVDs ran (tests check that steps do not recompute)

    def get(self, weight: torch.Tensor, rows: FusedRows | None = None,
            rotation: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(down, up) of ``rows.of_weight(weight)`` (all rows if None; ``rows``: a fused projection's
        :class:`~xq_compile.fused_rows.FusedRows`), rotated by ``rotation``."""
        return self._get(weight, ("rows", rows), (version_counter(weight),), rotation,
                         lambda: weight if rows is None else rows.of_weight(weight))

    def get_joint(self, k_weight: torch.Tensor, v_weight: torch.Tensor, k_rows=None, v_rows=None,
                  rotation: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(down, up) of the stacked [W_k; W_v] (XQuant-CL's joint latent): up's first rows rebuild K."""
        def stacked():
            k = k_weight if k_rows is None else k_rows.of_weight(k_weight)
            v = v_weight if v_rows is None else v_rows.of_weight(v_weight)
            return torch.cat([k, v], 0)

        return self._get(k_weight, ("joint", id(v_weight), k_rows, v_rows),
                         (version_counter(k_weight), version_counter(v_weight)), rotation, stacked)

    def _get(self, anchor, slot, versions, rotation, weight):
        key = (versions, None if rotation is None else rotation.shape[0])
        per_weight = self._factors.setdefault(anchor, {})
        entry = per_weight.get(slot)
        if entry is None or entry[0] != key:
            entry = (key, svd_factors(weight(), rotation))
            per_weight[slot] = entry
            self.computed += 1
        return entry[1]


LATENT_FACTORS = LatentFactors()


def latent_width(num_kv_heads: int, head_dim: int, hidden_size: int) -> int:
    """Width of one latent: the rank of W_k (W_v), at most the hidden size."""
    return min(num_kv_heads * head_dim, hidden_size)


LOW_BITS = 4  # the open key group's codes have this many bits more than the cache's


def open_bits(bits: int) -> int:
    """Code width of the open key group (per channel over its rows so far, until it completes). The
    top ``bits`` of each code sit in the row's own slot of the key codes (free until the group is
    quantized at ``bits``), the other LOW_BITS in the ``low`` tail."""
    return bits + LOW_BITS


# --------------------------------------------------------------------------------------------------
# Key latent: per channel along tokens; the open group at open_bits until it completes.


def in_open_group(rows: torch.Tensor, open_group, group_size: int) -> torch.Tensor:
    """Whether each of ``rows`` lies in token group ``open_group``, for rows below the end of that group
    (every caller's: the rows cached so far, or the open group's own slots).

    A comparison rather than ``rows // group_size == open_group``: Inductor's C++ backend (torch 2.11 to
    2.13) computes a floor division of an ``arange`` whose length is data-dependent (n rows, read with
    ``.item()``), when it keeps the result as a buffer of its own, only up to the last multiple of the
    divisor, and leaves the other rows unwritten; on torch 2.11 that buffer was this mask, and the
    rebuilt keys of the open group read garbage bits (docs/versions.md)."""
    return rows >= open_group * group_size


def _key_codes(high: torch.Tensor, low: torch.Tensor, open_group, rows: torch.Tensor, group_size: int) -> torch.Tensor:
    """int32 codes [B, n, C] of the key rows ``rows`` [n] from their top bits ``high`` [B, n, C]: rows
    of group ``open_group`` also have low bits (slot row % g of ``low``), the others are complete."""
    opened = in_open_group(rows, open_group, group_size).unsqueeze(-1)
    whole = (high << LOW_BITS) | quant.unpack(low.index_select(1, rows % group_size), LOW_BITS)
    return torch.where(opened, whole, high)


def store_key_latent(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, low: torch.Tensor,
                     new: torch.Tensor, start: torch.Tensor, bits: int, group_size: int) -> None:
    """Write ``new`` latent rows [B, s, C] at rows start..start+s-1, in place.

    ``codes`` [B, G·g, packed] and ``scale``/``zero`` [B, G, C] (per channel per token group) for
    ``G = ceil(capacity / g)`` groups, ``low`` [B, g, packed at LOW_BITS]. Rows must
    arrive in order (start = rows cached so far). Every group the chunk touches is quantized per
    channel from its rows: at ``bits`` if this chunk completes it, else at :func:`open_bits` (the open
    group, its scale/zero in the group's own slot). The open group's earlier rows come from their
    codes, so a chunk that widens a channel's range rounds them once more, on the finer open grid.
    """
    # sizes by indexing .shape: this also runs on graph proxies (the rewrite emits it), where s may be
    # symbolic (a dynamic-shape graph): spans is then an expression in s, still not data-dependent
    g, batch, s, channels = group_size, new.shape[0], new.shape[1], new.shape[2]
    wide, device = open_bits(bits), new.device
    spans = -(-(g - 1 + s) // g)  # static: groups a chunk of s rows can touch
    offset = start % g  # rows of the open group already cached
    first_group = start // g
    slots = torch.arange(g, device=device)
    open_rows = first_group * g + slots
    cached = quant.dequantize_along_tokens(
        _key_codes(quant.unpack(codes.index_select(1, open_rows), bits), low, first_group, open_rows, g),
        scale.index_select(1, first_group.reshape(1)), zero.index_select(1, first_group.reshape(1)), g)
    window = torch.cat([cached, cached.new_zeros(batch, (spans - 1) * g, channels)], 1)
    window = window.index_copy(1, offset + torch.arange(s, device=device), quant.rounded(new, ROW_DTYPE))
    # Without a spare group, the last of the spans groups may lie past the storage (it then holds no
    # row): it is written as a copy of the first group, onto the first group, so every write is in
    # bounds and each destination receives a single value.
    span = torch.arange(spans, device=device)
    inside = first_group + span < scale.shape[1]
    target_groups = torch.where(inside, first_group + span, first_group)
    source_groups = torch.where(inside, span, 0)
    valid = torch.arange(spans * g, device=device) < offset + s
    complete = (span < (offset + s) // g).unsqueeze(-1)  # [spans, 1]: groups this chunk completes
    final_scale, final_zero = quant.scale_and_zero_along_tokens(window, bits, g, valid)
    open_scale, open_zero = quant.scale_and_zero_along_tokens(window, wide, g, valid, keep_max=True)
    scale.index_copy_(1, target_groups, torch.where(complete, final_scale, open_scale).index_select(1, source_groups))
    zero.index_copy_(1, target_groups, torch.where(complete, final_zero, open_zero).index_select(1, source_groups))
    # codes for the scale/zero as stored: read back from where they were written
    stored = scale.index_select(1, target_groups), zero.index_select(1, target_groups)
    row_complete = complete.repeat_interleave(g, 0)  # [spans·g, 1]
    open_codes = quant.codes_along_tokens(window, *stored, wide, g)
    high = torch.where(row_complete, quant.codes_along_tokens(window, *stored, bits, g), open_codes >> LOW_BITS)
    target_rows = (target_groups.unsqueeze(-1) * g + slots).flatten()
    source_rows = (source_groups.unsqueeze(-1) * g + slots).flatten()
    codes.index_copy_(1, target_rows, quant.pack(high.index_select(1, source_rows), bits))
    # the new open group: the one holding row offset + s of the window (if that row starts a new group,
    # its low bits are never read: clamp to a group that exists)
    now_open = ((offset + s) // g).clamp(max=spans - 1) * g + slots
    low.copy_(quant.pack(open_codes.index_select(1, now_open) & ((1 << LOW_BITS) - 1), LOW_BITS))


def reopen_key_group(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, low: torch.Tensor,
                     kept: torch.Tensor, group: int, bits: int, group_size: int) -> None:
    """Make complete group ``group`` the open group again (a crop into it) with its first rows ``kept``
    [B, k, C], k < g: quantized per channel at open_bits, as the next store expects."""
    g, wide, k = group_size, open_bits(bits), kept.shape[1]
    batch, channels = kept.shape[0], kept.shape[2]
    window = torch.cat([quant.rounded(kept, ROW_DTYPE), kept.new_zeros(batch, g - k, channels, dtype=torch.float32)], 1)
    open_scale, open_zero = quant.scale_and_zero_along_tokens(window, wide, g, torch.arange(g, device=kept.device) < k,
                                                              keep_max=True)
    scale[:, group] = open_scale[:, 0]
    zero[:, group] = open_zero[:, 0]
    open_codes = quant.codes_along_tokens(window, scale[:, group:group + 1], zero[:, group:group + 1], wide, g)
    codes[:, group * g:(group + 1) * g] = quant.pack(open_codes >> LOW_BITS, bits)
    low.copy_(quant.pack(open_codes & ((1 << LOW_BITS) - 1), LOW_BITS))


def key_latent_rows(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, low: torch.Tensor,
                    rows, length, bits: int, group_size: int, dtype: torch.dtype,
                    col0: torch.Tensor | None = None) -> torch.Tensor:
    """The first ``rows`` reconstructed key-latent rows [B, rows, C] when ``length`` rows are cached.

    ``rows`` is the number of rows to produce (the data-dependent n on CPU; max_cache_len in the CUDA
    form, where ``length`` is a device tensor and rows past it are never attended). Every row is
    dequantized per channel with its group's scale/zero; the open group's codes have their low bits.
    """
    index = torch.arange(rows, device=codes.device)
    row_codes = _key_codes(quant.unpack(codes.narrow(1, 0, rows), bits), low, length // group_size, index, group_size)
    x_hat = quant.dequantize_along_tokens(row_codes, scale, zero, group_size)  # [B, rows, C]
    if col0 is not None:
        x_hat = torch.cat([col0.narrow(1, 0, rows).float().unsqueeze(-1), x_hat[..., 1:]], -1)
    return x_hat.to(dtype)


def open_key_group(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, low: torch.Tensor,
                   length, bits: int, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """The open group's rows [B, g, C] in ``dtype`` (slot j: row complete + j) when ``length`` rows are
    cached: the tail the fused decode-attention op reads next to the complete groups' codes."""
    g = group_size
    # a full cache has no open group: its slots read the last row instead, never attended
    rows = (length // g * g + torch.arange(g, device=codes.device)).clamp(max=codes.shape[1] - 1)
    row_codes = _key_codes(quant.unpack(codes.index_select(1, rows), bits), low, length // g, rows, g)
    # each row with its own group's scale/zero (a group of one row per slot)
    return quant.dequantize_along_tokens(row_codes, scale.index_select(1, rows // g), zero.index_select(1, rows // g),
                                         1).to(dtype)


def fake_quantize_key_latent(latent: torch.Tensor, bits: int | None, group_size: int, keep_channel0: bool = False,
                             chunks: list[int] | None = None) -> torch.Tensor:
    """What the cache holds for latent rows [..., T, C] once all T are written (the reference).

    The rows rounded to fp16; after each chunk (``chunks``: their lengths, default one chunk of T),
    the groups it touched quantized per channel from the values cached so far: complete groups at
    ``bits``, the open group at :func:`open_bits` (its earlier rows rounded again on its grid). Channel
    0 in fp16 with ``keep_channel0``.
    """
    if bits is None:
        return latent
    g, t = group_size, latent.shape[-2]
    chunks = [t] if chunks is None else chunks
    if sum(chunks) != t:
        raise ValueError(f"chunks {chunks} do not add up to the {t} rows")
    out, end = quant.rounded(latent, ROW_DTYPE), 0
    for length in chunks:
        first, end = end // g * g, end + length  # from the open group before this chunk
        for start in range(first, end, g):
            rows = min(g, end - start)
            width, keep_max = (bits, False) if rows == g else (open_bits(bits), True)
            quantized = quant.quantize_along_tokens(out[..., start:start + rows, :], width, rows, keep_max=keep_max)
            out[..., start:start + rows, :] = quant.dequantize_along_tokens(*quantized, rows)
    if keep_channel0:
        out[..., 0] = quant.rounded(latent[..., 0], ROW_DTYPE)
    return out.to(latent.dtype)
