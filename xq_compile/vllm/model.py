"""The Llama-family model class served with the X cache: vLLM's own Llama with the attention swapped."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from vllm.config import VllmConfig
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM

from .attention import XQuantLlamaAttention


class XQuantLlamaDecoderLayer(LlamaDecoderLayer):
    def __init__(self, vllm_config: VllmConfig, prefix: str = "", config=None) -> None:
        super().__init__(vllm_config, prefix=prefix, config=config, attn_layer_type=XQuantLlamaAttention)


class XQuantLlamaForCausalLM(LlamaForCausalLM):
    """``LlamaForCausalLM`` whose layers cache X (see :mod:`xq_compile.vllm.attention`)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=XQuantLlamaDecoderLayer)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded = super().load_weights(weights)
        for module in self.modules():
            if isinstance(module, XQuantLlamaAttention):
                module.hand_over_kv_weights()
        return loaded
