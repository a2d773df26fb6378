"""Rows quantized per token: the storage X, X deltas, the value latent and the joint latent share.

A row of width ``w`` is ``packed_width(w, bits)`` bytes of codes plus an fp16 scale and zero per group
of ``group_size`` channels; unquantized, it is the row itself in the cache dtype. In the log8 scale
format (``XQuantConfig.scale_format``) the scale and zero are stored compact, under their own names
(:func:`compact_names`): an fp16 row scale [B, L, 1] and uint8 log scales and zeros [B, L, G]. Plain
torch: the rewrite records these functions into the graph (``ctx.emit``), the same code runs eagerly.
"""

from __future__ import annotations

import torch

from .. import quant
from .base import StateTensor


def compact_names(scale: str, zero: str) -> tuple[str, str, str]:
    """The log8 format's state names (row scale, log scales, zero codes) for the fp16 format's ``scale``/``zero``."""
    return f"{scale}_row", f"{scale}_log8", f"{zero}_u8"


def per_token_spec(names: tuple[str, str, str, str], width: int, bits: int | None, group_size: int, batch, rows,
                   dtype: torch.dtype, scale_format: str = "fp16") -> dict[str, StateTensor]:
    """``names`` = (codes, scale, zero, unquantized rows): the state of ``rows`` rows of ``width``."""
    codes, scale, zero, raw = names
    if bits is None:
        return {raw: StateTensor((batch, rows, width), dtype)}
    groups = width // group_size
    if scale_format == "log8":
        row_scale, log_scale, zero_code = compact_names(scale, zero)
        return {
            codes: StateTensor((batch, rows, quant.packed_width(width, bits)), torch.uint8),
            row_scale: StateTensor((batch, rows, 1), quant.SCALE_DTYPE),
            log_scale: StateTensor((batch, rows, groups), torch.uint8),
            zero_code: StateTensor((batch, rows, groups), torch.uint8),
        }
    return {
        codes: StateTensor((batch, rows, quant.packed_width(width, bits)), torch.uint8),
        scale: StateTensor((batch, rows, groups), quant.SCALE_DTYPE),
        zero: StateTensor((batch, rows, groups), quant.SCALE_DTYPE),
    }


def store_rows(target: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> None:
    """Write ``rows`` [B, s, ...] at token rows ``index`` [s] of ``target`` [B, L, ...], in place."""
    target.index_copy_(1, index, rows.to(target.dtype))


def store_quantized(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, x: torch.Tensor,
                    index: torch.Tensor, bits: int, group_size: int) -> None:
    """Quantize ``x`` [B, s, w] per token and write its codes, scale and zero at rows ``index``."""
    new_scale, new_zero = quant.scale_and_zero(x, bits, group_size)
    store_rows(scale, index, new_scale)
    store_rows(zero, index, new_zero)
    store_rows(codes, index, quant.pack(quant.codes_for(x, new_scale, new_zero, bits, group_size), bits))


def store_quantized_log8(codes: torch.Tensor, row_scale: torch.Tensor, log_scale: torch.Tensor,
                         zero_code: torch.Tensor, x: torch.Tensor, index: torch.Tensor, bits: int,
                         group_size: int) -> None:
    """:func:`store_quantized` in the log8 scale format: the compact scales by the encode op, the codes
    for the scale/zero they decode to (the same functions :func:`quant.quantize_log8` composes)."""
    # indexed, not unpacked: the rewrite runs this on fx proxies, which cannot be iterated
    out = torch.ops.xq_compile.log8_encode.default(x, bits, group_size)
    compact = out[0], out[1], out[2]
    for target, value in zip((row_scale, log_scale, zero_code), compact):
        store_rows(target, index, value)
    decoded = torch.ops.xq_compile.log8_decode.default(*compact, bits)
    scale, zero = decoded[0], decoded[1]
    store_rows(codes, index, quant.pack(quant.codes_for(x, scale, zero, bits, group_size), bits))


def decoded_scales(row_scale: torch.Tensor, log_scale: torch.Tensor, zero_code: torch.Tensor,
                   bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 (scale, zero) of stored log8 rows, for the rebuild (working memory, not cache)."""
    decoded = torch.ops.xq_compile.log8_decode.default(row_scale, log_scale, zero_code, bits)
    return decoded[0], decoded[1]
