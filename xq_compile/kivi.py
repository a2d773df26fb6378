"""KIVI references: simulated per-channel key / per-token value quantization of the KV cache.

KIVI (arXiv 2402.02750) quantizes keys per *channel* (outlier channels of K stay within their own
scale) and values per *token*, and keeps a window of the most recent R tokens in full precision.

* **KIVI*** (:func:`simulate_kivi`) is the XQuant paper's variant without that window, so every cached
  K/V element is quantized: the fair comparison at equal bits. Simulated like
  :mod:`xq_compile.simulate`: forward hooks replace the outputs of every k_proj / v_proj (keys *before*
  RoPE) by their fake-quantized values over the whole window in one pass.
* **KIVI with its residual window** (:class:`KIVICache`) is a transformers ``Cache`` run in the same
  prefill + decode loop as the real paths, and holds what KIVI's reference code holds: keys as the
  attention gets them (*after* RoPE), flushed R at a time into per-channel groups of ``group_size``
  tokens once R of them are in full precision; values quantized per token once they are more than R
  tokens old; attention at each step reads the quantized rows dequantized plus the full-precision ones.

Both use the project's quantizer (asymmetric min/max, fp16 scale and zero per group).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from transformers.cache_utils import Cache, DynamicLayer

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
        if isinstance(v_proj, tuple):
            raise ValueError("KIVI* simulation needs separate k_proj/v_proj; this model fuses them into one projection")
        if v_proj.out_features % group_size:
            raise ValueError(f"group_size={group_size} does not divide the value width {v_proj.out_features}")
        handles += [k_proj.register_forward_hook(key_hook), v_proj.register_forward_hook(value_hook)]
    with hooks_removed_after(handles):
        yield


def kivi_key_group(group_size: int, residual: int) -> int:
    """Tokens per key group: ``group_size``, or the window itself when it is shorter (and not 0: KIVI*)."""
    return min(group_size, residual) if residual else group_size


class KIVILayer(DynamicLayer):
    """One layer of :class:`KIVICache`. ``keys``/``values`` hold every cached row as the attention sees
    it: the first ``quantized_keys`` / ``quantized_values`` rows fake-quantized, the rest exact.

    Rows move into the quantized part at the start of the next ``update``, which is when KIVI's code
    would have flushed them right after the previous call's attention: keys R at a time once the
    full-precision part holds R or more (so the groups of ``group_size`` tokens start at multiples of
    R), values one by one as soon as more than R are in full precision.
    """

    def __init__(self, bits: int, group_size: int, residual: int) -> None:
        super().__init__()
        self.bits, self.group_size, self.residual = bits, group_size, residual
        self.key_group = kivi_key_group(group_size, residual)
        self.quantized_keys = self.quantized_values = 0

    def update(self, key_states, value_states, *args, **kwargs):
        if self.is_initialized:
            self._flush()
        return super().update(key_states, value_states, *args, **kwargs)

    def _flush(self) -> None:
        length, r = self.keys.shape[-2], self.residual
        start, stop = self.quantized_keys, self.quantized_keys + (length - self.quantized_keys) // r * r
        if stop > start:
            self.keys[..., start:stop, :] = fake_quantize_keys(self.keys[..., start:stop, :], self.bits, self.key_group)
            self.quantized_keys = stop
        start, stop = self.quantized_values, max(self.quantized_values, length - r)
        if stop > start:
            self.values[..., start:stop, :] = fake_quantize_values(self.values[..., start:stop, :], self.bits,
                                                                   self.group_size)
            self.quantized_values = stop


class KIVICache(Cache):
    """KIVI with its full-precision window of the ``residual`` most recent tokens, for eager models.

    Simulated memory (the rows are kept as floats); its bytes are :func:`xq_compile.memory.kivi_memory`'s
    formula. Keys are flushed in whole token groups, so ``residual`` must be a multiple of the key group
    (KIVI's own rule), which is ``group_size`` tokens, or ``residual`` tokens for a shorter window (KIVI's
    R = 32 runs with groups of 32). ``group_size`` must divide the head dim (value groups of one head).
    """

    def __init__(self, config, bits: int, group_size: int, residual: int) -> None:
        config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        if residual < 1 or residual % kivi_key_group(group_size, residual):
            raise ValueError(f"KIVI's residual window ({residual} tokens) must be a positive multiple of the "
                             f"group size {group_size} or shorter than it: keys are quantized in whole groups "
                             "of tokens")
        if head_dim % group_size:
            raise ValueError(f"group_size={group_size} does not divide the head dim {head_dim}: KIVI's values "
                             "are quantized per token in groups of channels within each head")
        super().__init__(layers=[KIVILayer(bits, group_size, residual) for _ in range(config.num_hidden_layers)])
