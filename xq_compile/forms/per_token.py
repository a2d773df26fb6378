"""Rows quantized per token: the storage X, X deltas, the value latent and the joint latent share.

A row of width ``w`` is ``packed_width(w, bits)`` bytes of codes plus an fp16 scale and zero per group
of ``group_size`` channels; unquantized, it is the row itself in the cache dtype. Plain torch: the
rewrite records these functions into the graph (``ctx.emit``), the same code runs eagerly.
"""

from __future__ import annotations

import torch

from .. import quant
from .base import StateTensor


def per_token_spec(names: tuple[str, str, str, str], width: int, bits: int | None, group_size: int, batch, rows,
                   dtype: torch.dtype) -> dict[str, StateTensor]:
    """``names`` = (codes, scale, zero, unquantized rows): the state of ``rows`` rows of ``width``."""
    codes, scale, zero, raw = names
    if bits is None:
        return {raw: StateTensor((batch, rows, width), dtype)}
    groups = width // group_size
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
    # codes for the scale/zero as stored (read back from fp16 memory: see quant.codes_for)
    stored = scale.index_select(1, index), zero.index_select(1, index)
    store_rows(codes, index, quant.pack(quant.codes_for(x, *stored, bits, group_size), bits))
