"""The log8 scale format's encode and decode as opaque custom ops (``xq_compile::log8_encode`` / ``log8_decode``).

The compiled store and rebuild call these instead of tracing :func:`xq_compile.quant.log8_encode` /
:func:`~xq_compile.quant.log8_decode` into the graph: Inductor would generate its own log2/exp2 and fp16
roundings, and a last-ulp difference moves a group's log scale to the next step. As ops they run the
very torch code the simulation runs, so the compiled cache and ``simulate_xquant`` hold the same
bytes for the same X. The decoded fp16 scale/zero are working memory of the rebuild, not cache.
"""

from __future__ import annotations

import torch

from xq_compile import quant


@torch.library.custom_op("xq_compile::log8_encode", mutates_args=())
def log8_encode(x: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row_scale fp16 [..., 1], log_scale uint8 [..., G], zero_code uint8 [..., G]) of ``x`` [..., d]."""
    return quant.log8_encode(x, bits, group_size)


@log8_encode.register_fake
def _(x, bits, group_size):
    groups = x.shape[-1] // group_size
    return (x.new_empty((*x.shape[:-1], 1), dtype=quant.SCALE_DTYPE),
            x.new_empty((*x.shape[:-1], groups), dtype=torch.uint8),
            x.new_empty((*x.shape[:-1], groups), dtype=torch.uint8))


@torch.library.custom_op("xq_compile::log8_decode", mutates_args=())
def log8_decode(row_scale: torch.Tensor, log_scale: torch.Tensor, zero_code: torch.Tensor,
                bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 (scale, zero) [..., G] of the default format from the compact tensors."""
    return quant.log8_decode(row_scale, log_scale, zero_code, bits)


@log8_decode.register_fake
def _(row_scale, log_scale, zero_code, bits):
    return (log_scale.new_empty(log_scale.shape, dtype=quant.SCALE_DTYPE),
            log_scale.new_empty(log_scale.shape, dtype=quant.SCALE_DTYPE))
