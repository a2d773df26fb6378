"""KIVI* reference: simulated per-channel key / per-token value quantization of the KV cache.

KIVI (arXiv 2402.02750) quantizes keys per *channel* (outlier channels of K stay within their own
scale) and values per *token*. "KIVI*" is the XQuant paper's variant without KIVI's fp16 window of
recent tokens, so every cached K/V element is quantized: the fair comparison at equal bits.

Simulated, like :mod:`xq_compile.simulate`: forward hooks replace the outputs of every k_proj / v_proj
(keys *before* RoPE, as KIVI quantizes them) by their fake-quantized values over the whole window in
one pass, using the project's quantizer (asymmetric min/max, fp16 scale and zero per group).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from . import quant
from .simulate import _kv_projections, hooks_removed_after


def fake_quantize_keys(k: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Per channel, in groups of ``group_size`` consecutive tokens: k is [..., T, C].

    A window whose length is not a multiple of the group leaves a partial last group: it is quantized
    as a group of its own (its own min/max over the remaining tokens), as a cache holding those tokens
    would have to, rather than padded with values that do not exist.
    """
    t = k.shape[-2]
    full = t - t % group_size
    kt = k.transpose(-1, -2)  # [..., C, T]: the quantizer groups the last dimension
    parts = []
    if full:
        parts.append(quant.fake_quantize(kt[..., :full].contiguous(), bits, group_size))
    if full < t:
        parts.append(quant.fake_quantize(kt[..., full:].contiguous(), bits, t - full))
    return torch.cat(parts, -1).transpose(-1, -2)


def fake_quantize_values(v: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Per token, in groups of ``group_size`` channels: v is [..., T, C], C a multiple of the group."""
    return quant.fake_quantize(v, bits, group_size)


@contextlib.contextmanager
def simulate_kivi(model: torch.nn.Module, bits: int, group_size: int) -> Iterator[None]:
    """Within the block, every k_proj/v_proj output of ``model`` is replaced by its KIVI* fake-quantized value.

    The whole sequence must go through in one forward call (the key groups run along the tokens).
    """
    key_hook = lambda module, args, out: fake_quantize_keys(out, bits, group_size)  # noqa: E731
    value_hook = lambda module, args, out: fake_quantize_values(out, bits, group_size)  # noqa: E731
    handles = []
    for k_proj, v_proj in _kv_projections(model):
        if isinstance(v_proj, int):
            raise ValueError("KIVI* simulation needs separate k_proj/v_proj; this model fuses them (qkv_proj)")
        if v_proj.out_features % group_size:
            raise ValueError(f"group_size={group_size} does not divide the value width {v_proj.out_features}")
        handles += [k_proj.register_forward_hook(key_hook), v_proj.register_forward_hook(value_hook)]
    with hooks_removed_after(handles):
        yield
