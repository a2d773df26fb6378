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
  group can only be quantized once all its tokens exist, so the open group's rows are kept in fp16
  (the ``tail``, at most ``group_size`` rows) and quantized when the group completes;
  ``keep_channel0=True`` also keeps channel 0 (the largest singular direction, which carries the
  outliers and is multiplied by the largest singular value) in fp16 for every row;
* value latent per *token*, like X in the plain form, optionally Hadamard-rotated (folded into the
  factors, free at rebuild time).

The SVD factors are computed once per weight (in float64) and recomputed only when the weight is
modified in place (its ``_version`` counter moves): :data:`LATENT_FACTORS`.

Everything here is plain torch that traces: the rewrite emits these functions into the graph.
"""

from __future__ import annotations

import math

import torch
from . import quant
from ._torch_private import version_counter, weak_tensor_map
from .rotation import rotate

TAIL_DTYPE = torch.float16  # the open key group, kept in half precision like KIVI's residual window


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

    def get(self, weight: torch.Tensor, rows: tuple[int, int] | None = None,
            rotation: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(down, up) of ``weight[rows[0]:rows[1]]`` (all rows if None), rotated by ``rotation``."""
        return self._get(weight, ("rows", rows), (version_counter(weight),), rotation,
                         lambda: weight if rows is None else weight[rows[0]:rows[1]])

    def get_joint(self, k_weight: torch.Tensor, v_weight: torch.Tensor, k_rows=None, v_rows=None,
                  rotation: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(down, up) of the stacked [W_k; W_v] (XQuant-CL's joint latent): up's first rows rebuild K."""
        def stacked():
            k = k_weight if k_rows is None else k_weight[k_rows[0]:k_rows[1]]
            v = v_weight if v_rows is None else v_weight[v_rows[0]:v_rows[1]]
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


def latent_groups(max_cache_len: int, group_size: int) -> int:
    """Token groups of the key latent's storage: enough for max_cache_len, plus one spare group.

    A chunk of s new tokens is quantized as the ceil((g - 1 + s) / g) groups that may contain them (a
    static count for a static s); the last of them can lie one group past the last row in use, and
    writing it into a spare group keeps every write in bounds without a data-dependent shape.
    """
    return math.ceil(max_cache_len / group_size) + 1


# --------------------------------------------------------------------------------------------------
# Key latent: per channel along tokens, with the open group in fp16.


def store_key_latent(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, tail: torch.Tensor,
                     new: torch.Tensor, start: torch.Tensor, bits: int, group_size: int) -> None:
    """Write ``new`` latent rows [B, s, C] at rows start..start+s-1, in place.

    ``codes`` [B, G·g, packed], ``scale``/``zero`` [B, G, C], ``tail`` [B, g, C] (fp16, the open
    group's rows so far). Rows must arrive in order (start = rows cached so far). Every group the
    chunk touches is (re)quantized from the fp16 rows: the open group as well, whose codes are never
    read while it is open (the rebuild reads the tail) and are final once it completes.
    """
    # sizes by indexing .shape: this also runs on graph proxies (the rewrite emits it), where s may be
    # symbolic (a dynamic-shape graph): spans is then an expression in s, still not data-dependent
    g, batch, s, channels = group_size, new.shape[0], new.shape[1], new.shape[2]
    spans = -(-(g - 1 + s) // g)  # static: groups a chunk of s rows can touch
    offset = start % g  # rows of the open group already in the tail
    first_group = start // g
    window = torch.cat([tail.float(), new.new_zeros(batch, (spans - 1) * g, channels, dtype=torch.float32)], 1)
    window = window.index_copy(1, offset + torch.arange(s, device=new.device), new.to(TAIL_DTYPE).float())
    valid = torch.arange(spans * g, device=new.device) < offset + s
    groups = first_group + torch.arange(spans, device=new.device)
    rows = first_group * g + torch.arange(spans * g, device=new.device)
    group_scale, group_zero = quant.scale_and_zero_along_tokens(window, bits, g, valid)
    scale.index_copy_(1, groups, group_scale)
    zero.index_copy_(1, groups, group_zero)
    # codes for the scale/zero as stored, read back from fp16 memory (see quant.codes_for)
    group_codes = quant.codes_along_tokens(window, scale.index_select(1, groups), zero.index_select(1, groups), bits, g)
    codes.index_copy_(1, rows, quant.pack(group_codes, bits))
    # The new open group: the one holding row offset + s of the window (if that row starts a new group,
    # the tail's content is never read: clamp to a group that exists).
    open_group = ((offset + s) // g).clamp(max=spans - 1)
    tail.copy_(window.unflatten(1, (spans, g)).index_select(1, open_group.reshape(1)).squeeze(1).to(tail.dtype))


def key_latent_rows(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, tail: torch.Tensor,
                    rows, length, bits: int, group_size: int, dtype: torch.dtype,
                    col0: torch.Tensor | None = None) -> torch.Tensor:
    """The first ``rows`` reconstructed key-latent rows [B, rows, C] when ``length`` rows are cached.

    ``rows`` is the number of rows to produce (the data-dependent n on CPU; max_cache_len in the CUDA
    form, where ``length`` is a device tensor and rows past it are never attended). Rows of complete
    groups are dequantized, the open group's rows come from the fp16 tail.
    """
    g = group_size
    index = torch.arange(rows, device=codes.device)
    x_hat = quant.dequantize_along_tokens(quant.unpack(codes.narrow(1, 0, rows), bits), scale, zero, g)  # [B, rows, C]
    complete = length - length % g
    open_rows = tail.index_select(1, index % g).float()
    x_hat = torch.where((index < complete).unsqueeze(-1), x_hat, open_rows)
    if col0 is not None:
        x_hat = torch.cat([col0.narrow(1, 0, rows).float().unsqueeze(-1), x_hat[..., 1:]], -1)
    return x_hat.to(dtype)


def fake_quantize_key_latent(latent: torch.Tensor, bits: int | None, group_size: int,
                             keep_channel0: bool = False) -> torch.Tensor:
    """What the cache holds for latent rows [..., T, C] once all T are written (the reference).

    Complete groups of ``group_size`` tokens quantized per channel, the open group in fp16, channel 0
    in fp16 with ``keep_channel0``.
    """
    if bits is None:
        return latent
    t = latent.shape[-2]
    complete = t - t % group_size
    out = latent.to(TAIL_DTYPE).float()
    if complete:
        codes, scale, zero = quant.quantize_along_tokens(out[..., :complete, :], bits, group_size)
        out = torch.cat([quant.dequantize_along_tokens(codes, scale, zero, group_size), out[..., complete:, :]], -2)
    if keep_channel0:
        out[..., 0] = latent[..., 0].to(TAIL_DTYPE).float()
    return out.to(latent.dtype)

