"""The model classes served with the X cache: vLLM's own Llama and Qwen2 with the attention swapped.

Mistral without a sliding window computes exactly what Llama does (same layer, same weight names), so it
is served by the Llama class; :func:`check_mistral` refuses the Mistral variants that do not.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from vllm.config import VllmConfig
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM

from .attention import XCacheAttention, XQuantLlamaAttention, XQuantQwen2Attention, refuse_quantized_checkpoint


def hand_over_kv_weights(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, XCacheAttention):
            module.hand_over_kv_weights()


def check_mistral(config) -> None:
    """Mistral checkpoints whose computation is not Llama's: a sliding window, or Mistral 3's extras."""
    if getattr(config, "model_type", None) != "mistral":
        return
    differs = [name for name in ("sliding_window", "llama_4_scaling", "ada_rms_norm_t_cond")
               if getattr(config, name, None)]
    if differs:
        raise NotImplementedError(f"the XQuant X cache serves Mistral models without {', '.join(differs)}; "
                                  "serve this model without xq_compile.vllm.engine_args (stock vLLM).")


class XQuantLlamaDecoderLayer(LlamaDecoderLayer):
    def __init__(self, vllm_config: VllmConfig, prefix: str = "", config=None) -> None:
        check_mistral(config or vllm_config.model_config.hf_config)
        super().__init__(vllm_config, prefix=prefix, config=config, attn_layer_type=XQuantLlamaAttention)


class XQuantLlamaForCausalLM(LlamaForCausalLM):
    """``LlamaForCausalLM`` whose layers cache X (see :mod:`xq_compile.vllm.attention`)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=XQuantLlamaDecoderLayer)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded = super().load_weights(weights)
        hand_over_kv_weights(self)
        return loaded


class XQuantQwen2ForCausalLM(Qwen2ForCausalLM):
    """``Qwen2ForCausalLM`` whose layers cache X. vLLM's Qwen2 takes no attention class argument (Llama's
    does): each layer's attention module is converted after construction, before any weight is loaded."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        refuse_quantized_checkpoint(vllm_config.quant_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        for layer in self.model.layers:
            if hasattr(layer, "self_attn"):  # not a pipeline-parallel placeholder
                attn = layer.self_attn
                layer.self_attn = XQuantQwen2Attention.replacing(
                    attn, self.config, vllm_config.cache_config, attn.attn.layer_name.removesuffix(".attn"))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded = super().load_weights(weights)
        hand_over_kv_weights(self)
        return loaded
