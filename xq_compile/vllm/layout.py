"""The per-token X state in vLLM's pages: which tensors one cached token holds, and where their bytes sit.

vLLM gives each attention layer a ``[num_blocks, 1, block_size, C]`` uint8 view of its pages (C bytes per
token, declared in the layer's KV cache spec). A token's state is the tensors :func:`token_state_layout`
lists:

  quantized (``bits`` set):  codes uint8 [packed_width(d, bits)], scale fp16 [d / group_size],
                             zero fp16 [d / group_size]
  unquantized (bits=None):   x [d] in the model's dtype

These are exactly the per-token rows of :class:`xq_compile.XQuantCache`'s X form (same quantizer, same
packing, same rotation: :mod:`xq_compile.quant`, :mod:`xq_compile.rotation`), stored by token instead of
in one ``[batch, max_len, ...]`` tensor per name.

Inside a block the bytes are field-major: the block's ``block_size`` code rows first, then its scale rows,
then its zero rows (:func:`field_views`), not one token's fields side by side. A block still holds
``block_size x C`` bytes, so vLLM's block accounting, copies and prefix sharing (whole blocks) are
unchanged; but each field's rows now have their own stride (288 code bytes for SmolLM2 at 4 bits instead
of the 324-byte token), so the GPU kernels read codes with aligned vector loads.
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


def field_views(pages: torch.Tensor, layout: tuple[StateField, ...]) -> dict[str, torch.Tensor]:
    """Each field of every cached token as a view of a layer's pages ``[num_blocks, 1, block_size, C]`` (no
    copy): name -> ``[num_blocks, block_size, width]`` in the field's dtype. Block b's bytes are the fields
    one after another, each ``[block_size, width]`` (field-major, see the module docstring); reading and
    writing these views is the one way the plugin touches page bytes."""
    if pages.dtype != torch.uint8 or pages.dim() != 4 or pages.shape[1] != 1:
        raise ValueError(f"expected a layer's pages as uint8 [num_blocks, 1, block_size, C], got {pages.dtype} "
                         f"{list(pages.shape)}")
    num_blocks, block_size, token_bytes = pages.shape[0], pages.shape[2], pages.shape[3]
    if token_bytes != bytes_per_token(layout):
        raise ValueError(f"the pages hold {token_bytes} bytes per token, the layout {bytes_per_token(layout)}")
    if pages.stride(3) != 1 or pages.stride(2) != token_bytes:
        raise ValueError(f"a block's bytes must be one contiguous run (pages of shape {list(pages.shape)} have "
                         f"strides {pages.stride()}): pass the layer's kv_cache tensor as vLLM allocates it")
    blocks = pages[:, 0].view(num_blocks, block_size * token_bytes)  # a view: writes reach the pages
    views, start = {}, 0
    for f in layout:
        part = blocks.narrow(1, block_size * start, block_size * f.nbytes).view(num_blocks, block_size, f.nbytes)
        if f.dtype != torch.uint8:
            if part.storage_offset() % f.dtype.itemsize or blocks.stride(0) % f.dtype.itemsize:
                raise ValueError(f"the {f.name} rows of a block are not {f.dtype}-aligned (block_size {block_size}, "
                                 f"{token_bytes} bytes per token): use an even block_size")
            part = part.view(f.dtype)
        views[f.name] = part
        start += f.nbytes
    return views
