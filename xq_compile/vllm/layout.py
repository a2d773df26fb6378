"""The per-token X state in vLLM's pages: which tensors one cached token holds, and their bytes.

vLLM gives each attention layer a ``[num_blocks, 1, block_size, C]`` uint8 view of its pages (C bytes per
token, declared in the layer's KV cache spec). A token's C bytes are its state tensors side by side, in
the order :func:`token_state_layout` lists them:

  quantized (``bits`` set):  codes uint8 [packed_width(d, bits)], scale fp16 [d / group_size],
                             zero fp16 [d / group_size]
  unquantized (bits=None):   x [d] in the model's dtype

These are exactly the per-token rows of :class:`xq_compile.XQuantCache`'s X form (same quantizer, same
packing, same rotation: :mod:`xq_compile.quant`, :mod:`xq_compile.rotation`), stored by token instead of
in one ``[batch, max_len, ...]`` tensor per name.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..config import XQuantConfig
from ..forms import LayerShape
from ..forms.x import XForm


class StateField(NamedTuple):
    name: str
    width: int  # elements per token
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return self.width * self.dtype.itemsize


def token_state_layout(xquant: XQuantConfig, hidden_size: int, dtype: torch.dtype) -> tuple[StateField, ...]:
    """The tensors one cached token holds for a layer with input width ``hidden_size``: the X form's state
    spec (:class:`xq_compile.forms.x.XForm`, what XQuantCache allocates) for one row."""
    spec = XForm(xquant, 0, LayerShape(hidden_size, hidden_size)).state_spec(1, 1, dtype)
    for name, tensor in spec.items():
        if tensor.shape[:2] != (1, 1) or len(tensor.shape) != 3:
            raise ValueError(f"the X form's {name!r} is not one row per token: it cannot live in vLLM's pages")
    return tuple(StateField(name, tensor.shape[2], tensor.dtype) for name, tensor in spec.items())


def bytes_per_token(layout: tuple[StateField, ...]) -> int:
    return sum(field.nbytes for field in layout)


def encode_rows(layout: tuple[StateField, ...], tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The state tensors ``[..., width]`` of some tokens as their page bytes ``[..., C]`` (uint8)."""
    parts = [tensors[f.name].to(f.dtype).contiguous().view(torch.uint8) for f in layout]
    return torch.cat(parts, dim=-1)


def decode_rows(layout: tuple[StateField, ...], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Inverse of :func:`encode_rows`: page bytes ``[..., C]`` -> the named state tensors."""
    out, start = {}, 0
    for f in layout:
        part = rows.narrow(-1, start, f.nbytes)
        out[f.name] = part if f.dtype == torch.uint8 else part.contiguous().view(f.dtype)
        start += f.nbytes
    return out
