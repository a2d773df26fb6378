"""The model classes served with the X cache: vLLM's own Llama, Phi-3, Qwen2, Qwen3, Gemma 2 and Gemma 3
(text) with the attention swapped.

Mistral computes exactly what Llama does (same layer, same weight names; a sliding window, where it has one,
comes to every layer from vLLM's cache config), so it is served by the Llama class; :func:`check_mistral`
refuses the Mistral variants that do not.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from vllm.config import VllmConfig
from vllm.model_executor.models.gemma2 import Gemma2ForCausalLM
from vllm.model_executor.models.gemma3 import Gemma3ForCausalLM
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from vllm.model_executor.models.phi3 import Phi3ForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM

from .attention import (XCacheAttention, XQuantGemma2Attention, XQuantGemma3Attention, XQuantLlamaAttention,
                        XQuantQwen2Attention, XQuantQwen3Attention, refuse_quantized_checkpoint)


class HandsOverKVWeights:
    """Mixed in before a vLLM model class: once the weights are loaded, each X-cache attention layer takes its
    copy of this rank's K/V weight rows (:meth:`XCacheAttention.hand_over_kv_weights`)."""

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded = super().load_weights(weights)
        for module in self.modules():
            if isinstance(module, XCacheAttention):
                module.hand_over_kv_weights()
        return loaded


def convert_attention(model: torch.nn.Module, attention: type[XCacheAttention], vllm_config: VllmConfig) -> None:
    """For a family whose decoder layer builds its attention itself (it takes no attention class argument, as
    Llama's does): convert each layer's module after construction, before any weight is loaded."""
    for layer in model.model.layers:
        if hasattr(layer, "self_attn"):  # not a pipeline-parallel placeholder
            attn = layer.self_attn
            layer.self_attn = attention.replacing(attn, model.config, vllm_config.cache_config,
                                                  attn.attn.layer_name.removesuffix(".attn"))


def check_mistral(config) -> None:
    """Mistral checkpoints whose computation is not Llama's: Mistral 3's extras."""
    if getattr(config, "model_type", None) != "mistral":
        return
    differs = [name for name in ("llama_4_scaling", "ada_rms_norm_t_cond")
               if getattr(config, name, None)]
    if differs:
        raise NotImplementedError(f"the XQuant X cache serves Mistral models without {', '.join(differs)}; "
                                  "serve this model without xq_compile.vllm.engine_args (stock vLLM).")


class XQuantLlamaDecoderLayer(LlamaDecoderLayer):
    def __init__(self, vllm_config: VllmConfig, prefix: str = "", config=None) -> None:
        check_mistral(config or vllm_config.model_config.hf_config)
        super().__init__(vllm_config, prefix=prefix, config=config, attn_layer_type=XQuantLlamaAttention)


class XQuantLlamaForCausalLM(HandsOverKVWeights, LlamaForCausalLM):
    """``LlamaForCausalLM`` whose layers cache X (see :mod:`xq_compile.vllm.attention`)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=XQuantLlamaDecoderLayer)


class XQuantPhi3ForCausalLM(HandsOverKVWeights, Phi3ForCausalLM):
    """``Phi3ForCausalLM`` (Phi-3, Phi-3.5, Phi-4-mini): vLLM's is Llama's with Phi-3's fused checkpoint names,
    its partial rotary and LongRoPE coming from the config to the same layers."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=XQuantLlamaDecoderLayer)


class XQuantQwen2ForCausalLM(HandsOverKVWeights, Qwen2ForCausalLM):
    """``Qwen2ForCausalLM`` whose layers cache X."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        refuse_quantized_checkpoint(vllm_config.quant_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        convert_attention(self, XQuantQwen2Attention, vllm_config)


class XQuantQwen3ForCausalLM(HandsOverKVWeights, Qwen3ForCausalLM):
    """``Qwen3ForCausalLM`` whose layers cache X (their keys' RMSNorm applied to the rebuilt keys)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        refuse_quantized_checkpoint(vllm_config.quant_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        convert_attention(self, XQuantQwen3Attention, vllm_config)


class XQuantGemma2ForCausalLM(HandsOverKVWeights, Gemma2ForCausalLM):
    """``Gemma2ForCausalLM`` whose layers cache X (soft-capped attention logits; sliding-window layers as Gemma
    3's)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        refuse_quantized_checkpoint(vllm_config.quant_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        convert_attention(self, XQuantGemma2Attention, vllm_config)


class XQuantGemma3ForCausalLM(HandsOverKVWeights, Gemma3ForCausalLM):
    """``Gemma3ForCausalLM`` (text-only Gemma 3) whose layers cache X: the sliding-window layers too, in vLLM's
    sliding-window cache groups (the blocks behind the window are freed), beside the global layers'."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        refuse_quantized_checkpoint(vllm_config.quant_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        convert_attention(self, XQuantGemma3Attention, vllm_config)
