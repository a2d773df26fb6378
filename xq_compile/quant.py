"""Per-token asymmetric group quantization of X and dense bit packing, in plain torch.

This module is *the* reference: the CPU graph path emits these very functions into the rewritten
FX graph (so Inductor fuses unpack + dequantize into one generated kernel), the eager CPU kernel
calls them, and the Triton kernels are tested against them.

Every function is written with pointwise ops, broadcasting and reductions only (no ``stack``/``cat``
and no tensor constants) so it traces with ``torch.fx.symbolic_trace`` and stays fusable by Inductor,
also when the number of tokens is a data-dependent (unbacked) size.

Format of one cached token (hidden size ``d``, ``G = d // group_size`` groups):
  codes  uint8  ``[packed_width(d, bits)]``  b-bit codes packed densely, little-endian within a word
  scale  fp16   ``[G]``                      (max - min) / (2**bits - 1) of the group
  zero   fp16   ``[G]``                      min of the group
  x_hat = code * scale + zero
3-bit codes are packed 8 codes per 3 bytes (no padding to 4 bits); 2-bit 4 per byte; 4-bit 2 per byte.
"""

from __future__ import annotations

import torch

SCALE_DTYPE = torch.float16


def word_layout(bits: int) -> tuple[int, int]:
    """(codes per word, bytes per word) of the dense packing: the smallest word of whole bytes."""
    layouts = {2: (4, 1), 3: (8, 3), 4: (2, 1), 8: (1, 1)}
    if bits not in layouts:
        raise ValueError(f"bits={bits} has no packing; supported: {sorted(layouts)}")
    return layouts[bits]


def packed_width(hidden_size: int, bits: int) -> int:
    """Bytes per token of packed codes."""
    codes_per_word, bytes_per_word = word_layout(bits)
    if hidden_size % codes_per_word:
        raise ValueError(
            f"hidden size {hidden_size} is not a multiple of {codes_per_word}, the {bits}-bit packing word"
        )
    return hidden_size // codes_per_word * bytes_per_word


def quantize(x: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize the last dimension of ``x`` per group: returns (codes uint8 [..., d], scale, zero [..., G]).

    Scale and zero are rounded to fp16 *before* the codes are computed, so that dequantization with the
    stored fp16 values reproduces exactly what the codes were chosen for.
    """
    scale, zero = scale_and_zero(x, bits, group_size)
    return codes_for(x, scale, zero, bits, group_size), scale, zero


def scale_and_zero(x: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp16 (scale, zero) [..., G] of each group of ``group_size`` channels."""
    groups = x.float().unflatten(-1, (-1, group_size))
    return _range_to_scale(groups.amin(-1), groups.amax(-1), bits)


def codes_for(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """uint8 codes [..., d] of ``x`` for the given fp16 per-group scale and zero [..., G]."""
    groups = x.float().unflatten(-1, (-1, group_size))
    return _codes(groups, scale, zero, bits, -1).flatten(-2)


def _range_to_scale(low, high, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    # rounded() first: whether or not a fused kernel skips the cast back, _codes then sees the fp16 values
    scale, zero = rounded((high - low) / ((1 << bits) - 1), SCALE_DTYPE), rounded(low, SCALE_DTYPE)
    return scale.to(SCALE_DTYPE), zero.to(SCALE_DTYPE)


def rounded(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x.to(dtype).float()`` for ``dtype`` float16 or bfloat16, computed with integer ops on the fp32 bits.

    Codes must be chosen for the scale, zero and rows exactly as the cache stores them in 16 bits. Written
    as a cast there and back, a fused kernel may keep the fp32 value instead: Inductor's C++ backend
    does on torch < 2.13 (its pattern pass and its code generation alike, with
    ``emulate_precision_casts`` or not) and on 2.13 without that option, and the codes then miss the
    stored grid by a step at rounding edges. No compiler skips integer arithmetic. Round to nearest even,
    fp16 subnormals and overflow to inf included: equal to the cast for every finite fp32 value.
    """
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"rounded() takes float16 or bfloat16, not {dtype}")
    x = x.float()
    dropped = 13 if dtype == torch.float16 else 16  # mantissa bits fp32 has beyond ``dtype``
    bits = x.view(torch.int32)
    # add half a unit of the kept last place (less one, plus the kept lsb: ties to even), then truncate;
    # a carry into the exponent is the correct rounding up, and bfloat16 overflows to inf the same way
    bits = (bits + ((1 << (dropped - 1)) - 1) + ((bits >> dropped) & 1)) & -(1 << dropped)
    out = bits.view(torch.float32)
    if dtype == torch.float16:
        # below 2**-14 fp16 is subnormal, a fixed step of 2**-24 (scaling by powers of 2 is exact);
        # above 65504 it is inf
        out = torch.where(x.abs() < 2.0 ** -14, torch.round(x * 2.0 ** 24) * 2.0 ** -24, out)
        out = torch.where(out.abs() > 65504, out * float("inf"), out)
    return out


def _codes(values, scale, zero, bits: int, dim: int) -> torch.Tensor:
    """The one formula both groupings (per token, per channel) share: ``dim`` is the grouped axis."""
    qmax = (1 << bits) - 1
    scale_f = scale.float()
    # A constant group has scale 0: any code reproduces it, so divide by 1 instead of 0.
    safe_scale = torch.where(scale_f > 0, scale_f, torch.ones_like(scale_f))
    codes = torch.round((values - zero.float().unsqueeze(dim)) / safe_scale.unsqueeze(dim))
    return codes.clamp(0, qmax).to(torch.uint8 if bits <= 8 else torch.int32)  # wider: the GQA open key group


def quantize_along_tokens(x: torch.Tensor, bits: int, group_size: int, valid: torch.Tensor | None = None,
                          keep_max: bool = False):
    """Per *channel*, in groups of ``group_size`` consecutive tokens (KIVI's key grouping).

    ``x`` is [..., T, C] with T a multiple of ``group_size``; returns (codes [..., T, C], uint8 up to 8
    bits, scale, zero fp16 [..., T // group_size, C]). ``valid`` ([T] bool) marks the rows that exist:
    the others (the unwritten end of an open group) do not widen any range; a group without valid rows
    gets scale = zero = 0. ``keep_max``: the scale spans from the fp16 zero (not the exact minimum) to
    the maximum, so the maximum keeps the top code: quantizing dequantized rows again on the same range
    then returns the same grid (the GQA open key group, requantized as its rows arrive).
    """
    scale, zero = scale_and_zero_along_tokens(x, bits, group_size, valid, keep_max)
    return codes_along_tokens(x, scale, zero, bits, group_size), scale, zero


def scale_and_zero_along_tokens(x: torch.Tensor, bits: int, group_size: int, valid: torch.Tensor | None = None,
                                keep_max: bool = False):
    """fp16 (scale, zero) [..., T // group_size, C] of :func:`quantize_along_tokens`."""
    groups = x.float().unflatten(-2, (-1, group_size))  # [..., G, g, C]
    if valid is None:
        low, high = groups.amin(-2), groups.amax(-2)
    else:
        rows = valid.unflatten(0, (-1, group_size)).unsqueeze(-1)  # [G, g, 1]
        empty = ~rows.any(-2)  # [G, 1]
        low = torch.where(empty, 0.0, torch.where(rows, groups, float("inf")).amin(-2))
        high = torch.where(empty, 0.0, torch.where(rows, groups, float("-inf")).amax(-2))
    if keep_max:
        low = rounded(low, SCALE_DTYPE)
    return _range_to_scale(low, high, bits)


def codes_along_tokens(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                       group_size: int) -> torch.Tensor:
    """uint8 codes [..., T, C] for per-channel token-group scale/zero (see :func:`codes_for`)."""
    groups = x.float().unflatten(-2, (-1, group_size))
    return _codes(groups, scale, zero, bits, -2).flatten(-3, -2)


def dequantize_along_tokens(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                            group_size: int) -> torch.Tensor:
    """Inverse of :func:`quantize_along_tokens`: fp32 [..., T, C] from (unpacked) codes [..., T, C] and
    scale/zero [..., G, C]; row j uses token group j // group_size. T need not be a multiple of the
    group size, and G may be larger than the groups in use (the groups are gathered by index, which
    also traces with a symbolic T).

    The group of each row is taken from those of all G · group_size rows the scales cover (T is at most
    that), not computed over the T rows: T may be the data-dependent n of the inline rebuild, and
    Inductor's C++ backend writes a floor division over n rows, when it keeps it as a buffer of its own
    (here: saved for autograd), only up to the last multiple of the divisor (``latent.in_open_group``)."""
    groups = scale.shape[-2]
    group = (torch.arange(groups * group_size, device=codes.device) // group_size).narrow(0, 0, codes.shape[-2])
    return codes.float() * scale.index_select(-2, group).float() + zero.index_select(-2, group).float()


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack b-bit codes (uint8 [..., d]) densely into uint8 [..., packed_width(d, bits)]."""
    codes_per_word, bytes_per_word = word_layout(bits)
    if codes_per_word == 1:
        return codes.to(torch.uint8)
    shifts = torch.arange(codes_per_word, device=codes.device, dtype=torch.int32) * bits
    words = (codes.to(torch.int32).unflatten(-1, (-1, codes_per_word)) << shifts).sum(-1, dtype=torch.int32)
    if bytes_per_word == 1:
        return words.to(torch.uint8)
    byte_shifts = torch.arange(bytes_per_word, device=codes.device, dtype=torch.int32) * 8
    return ((words.unsqueeze(-1) >> byte_shifts) & 0xFF).to(torch.uint8).flatten(-2)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack`: uint8 [..., P] -> int32 codes [..., d]."""
    codes_per_word, bytes_per_word = word_layout(bits)
    if codes_per_word == 1:
        return packed.to(torch.int32)
    words = packed.to(torch.int32)
    if bytes_per_word > 1:
        byte_shifts = torch.arange(bytes_per_word, device=packed.device, dtype=torch.int32) * 8
        words = (words.unflatten(-1, (-1, bytes_per_word)) << byte_shifts).sum(-1, dtype=torch.int32)
    shifts = torch.arange(codes_per_word, device=packed.device, dtype=torch.int32) * bits
    return ((words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).flatten(-2)


def dequantize(
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    group_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Packed codes + fp16 scale/zero -> X-hat [..., d] in ``dtype`` (computed in fp32)."""
    return dequantize_codes(unpack(packed, bits), scale, zero, group_size).to(dtype)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """Unpacked per-token codes [..., d] + scale/zero [..., G] -> fp32 X-hat [..., d]."""
    groups = codes.unflatten(-1, (-1, group_size)).float()
    return (groups * scale.float().unsqueeze(-1) + zero.float().unsqueeze(-1)).flatten(-2)


def fake_quantize(x: torch.Tensor, bits: int | None, group_size: int) -> torch.Tensor:
    """quantize -> dequantize without packing: the simulation used as an oracle in tests and sweeps."""
    if bits is None:
        return x
    return dequantize_codes(*quantize(x, bits, group_size), group_size).to(x.dtype)


# --------------------------------------------------------------------------------------------------
# The compact "log8" scale format (XQuantConfig(scale_format="log8")).
#
# At hidden 576 and group 64 a row has 9 groups: 9 fp16 scale/zero pairs are 36 bytes, a large share
# of a 2- or 3-bit row (144 / 216 bytes of codes). log8 stores per row
#   row_scale   fp16  [1]   S, the largest group scale of the row
#   log_scale   uint8 [G]   u: the group's scale is S * 2**(-u / 16) (steps of 4.4%, down to S / 2**16)
#   zero_code   uint8 [G]   z: the group's zero is -(z / 255) * (2**bits - 1) * scale, a point on a
#                           1/255 grid of the code range (the range always includes 0)
# 2 + 2G bytes (20 at G = 9). Each group's decoded range covers its values (never clipped): u is
# rounded down (a larger scale), the range is widened by 255/254 so that a grid point for the zero
# exists, and the codes are computed from the *decoded* scale and zero, so dequantizing what is stored
# reproduces exactly what the codes were chosen for. Decoding goes to the fp16 scale/zero of the
# default format, so every dequantize and attention kernel reads it unchanged.
# --------------------------------------------------------------------------------------------------

LOG_STEPS = 16    # log-scale steps per octave
LOG_MAX = 255     # largest u
ZERO_STEPS = 255  # grid of the zero over the code range


def log8_decode(row_scale: torch.Tensor, log_scale: torch.Tensor, zero_code: torch.Tensor,
                bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 (scale, zero) [..., G] from the compact row scale [..., 1] and the uint8 codes [..., G]."""
    scale = (row_scale.float() * torch.exp2(log_scale.float() * (-1.0 / LOG_STEPS))).to(SCALE_DTYPE)
    zero = (zero_code.float() * (-((1 << bits) - 1) / ZERO_STEPS) * scale.float()).to(SCALE_DTYPE)
    return scale, zero


def log8_encode(x: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row_scale fp16 [..., 1], log_scale uint8 [..., G], zero_code uint8 [..., G]) of ``x`` [..., d]."""
    qmax = (1 << bits) - 1
    groups = x.float().unflatten(-1, (-1, group_size))
    low, high = groups.amin(-1).clamp(max=0), groups.amax(-1).clamp(min=0)
    # The scale a group needs: its range, widened so that some zero on the 1/255 grid leaves it covered.
    need = (high - low) / qmax * (ZERO_STEPS / (ZERO_STEPS - 1))
    row = need.amax(-1, keepdim=True)
    row16 = row.to(SCALE_DTYPE)
    # rounded down: the next fp16 up (for a positive fp16, its bits + 1; torch.nextafter has no fp16 on
    # every device)
    next_up = (row16.view(torch.int16) + 1).view(SCALE_DTYPE)
    row16 = torch.where(row16.float() < row, next_up, row16)
    ratio = need / torch.where(row16 > 0, row16.float(), torch.ones_like(row))
    u = torch.where(need > 0, torch.floor(-LOG_STEPS * torch.log2(ratio.clamp(min=2.0 ** -30))),
                    torch.full_like(need, LOG_MAX)).clamp(0, LOG_MAX)
    # log2 and fp16 rounding may leave the decoded scale a hair below the need: one step larger fixes it
    # (u = 0 decodes to S itself, which covers every group).
    scale, _ = log8_decode(row16, u, torch.zeros_like(u), bits)
    u = torch.where(scale.float() < need, (u - 1).clamp(min=0), u)
    scale, _ = log8_decode(row16, u, torch.zeros_like(u), bits)
    span = scale.float() * qmax
    z = torch.ceil(-low * ZERO_STEPS / torch.where(span > 0, span, torch.ones_like(span))).clamp(0, ZERO_STEPS)
    return row16, u.to(torch.uint8), z.to(torch.uint8)


def quantize_log8(x: torch.Tensor, bits: int, group_size: int):
    """(codes uint8 [..., d], row_scale, log_scale, zero_code) of ``x``: codes for the decoded scale/zero."""
    compact = log8_encode(x, bits, group_size)
    return codes_for(x, *log8_decode(*compact, bits), bits, group_size), *compact


def fake_quantize_as(x: torch.Tensor, bits: int | None, group_size: int, scale_format: str = "fp16") -> torch.Tensor:
    """:func:`fake_quantize` in either scale format: what the cache of that format rebuilds."""
    if bits is None or scale_format == "fp16":
        return fake_quantize(x, bits, group_size)
    codes, *compact = quantize_log8(x, bits, group_size)
    return dequantize_codes(codes, *log8_decode(*compact, bits), group_size).to(x.dtype)
