"""Serve XQuant with vLLM: an out-of-tree plugin that keeps each layer's packed X in vLLM's paged memory.

    from vllm import LLM, SamplingParams
    from xq_compile import XQuantConfig
    from xq_compile.vllm import engine_args

    llm = LLM("path/to/model", **engine_args(XQuantConfig(bits=4, form="x"), model="path/to/model"))

Installing xq-compile declares the ``vllm.general_plugins`` entry point :func:`register`, which vLLM
loads in every process: it adds the ``XQUANT`` attention backend and the model classes
``XQuantLlamaForCausalLM`` (Llama, Mistral), ``XQuantQwen2ForCausalLM`` and ``XQuantQwen3ForCausalLM``.
:func:`engine_args` selects them
for one engine (``hf_overrides``), so stock models in the same installation are untouched. Importing this module does not import vLLM.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from ..config import XQuantConfig
from .layout import StateField, bytes_per_token, token_state_layout

__all__ = ["ARCHITECTURES", "StateField", "architecture_of", "bytes_per_token", "check_servable", "decode_config_of",
           "engine_args", "register", "serve_flags", "token_state_layout"]

# The stock architecture each served class stands in for. Mistral is Llama's computation with Llama's weight
# names: the Llama class serves it (and refuses the Mistral variants that differ).
ARCHITECTURES = {"LlamaForCausalLM": "XQuantLlamaForCausalLM", "MistralForCausalLM": "XQuantLlamaForCausalLM",
                 "Phi3ForCausalLM": "XQuantPhi3ForCausalLM", "Qwen2ForCausalLM": "XQuantQwen2ForCausalLM",
                 "Qwen3ForCausalLM": "XQuantQwen3ForCausalLM", "Gemma2ForCausalLM": "XQuantGemma2ForCausalLM",
                 "Gemma3ForCausalLM": "XQuantGemma3ForCausalLM"}


def engine_args(xquant: XQuantConfig, architecture: str | None = None, *, model: str | None = None,
                decode_attention: dict[str, Any] | None = None) -> dict[str, Any]:
    """Keyword arguments for ``vllm.LLM(model, **engine_args(xquant, model=model))`` (or ``AsyncEngineArgs``)
    that serve the model with the X cache: the plugin's model class, and the config it reads.

    The class stands in for the model's own architecture: give ``model`` (a model folder: its config.json
    names it) or ``architecture`` (one of :data:`ARCHITECTURES`); Llama when neither is given.
    ``decode_attention``: overrides of the fused decode kernels' configuration on a GPU
    (``xq_compile.kernels.decode_attention.CONFIG_KEYS``, checked here), e.g. ``{"gluon": "auto"}`` for the
    opt-in Gluon scores kernel on Hopper wherever it takes the call."""
    if not isinstance(xquant, XQuantConfig):
        raise TypeError(f"engine_args takes an XQuantConfig, got {type(xquant).__name__}")
    if model is not None:
        if architecture is not None:
            raise ValueError("give engine_args the model folder or the architecture, not both")
        architecture = architecture_of(model)
    architecture = architecture or "LlamaForCausalLM"
    if architecture not in ARCHITECTURES:
        raise ValueError(f"the vLLM plugin serves {sorted(ARCHITECTURES)} so far, not {architecture!r}; "
                         "serve this model without xq_compile.vllm.engine_args (stock vLLM).")
    check_servable(xquant)
    overrides = {"architectures": [ARCHITECTURES[architecture]], "xquant": dataclasses.asdict(xquant)}
    if decode_attention:
        from ..kernels.decode_attention import check_overrides

        check_overrides(decode_attention)
        overrides[DECODE_CONFIG_KEY] = dict(decode_attention)
    return {"hf_overrides": overrides}


# the model config's attribute (set by engine_args' hf_overrides) with the fused decode's configuration
DECODE_CONFIG_KEY = "xquant_decode_attention"


def decode_config_of(hf_config) -> dict[str, Any]:
    """The fused decode's configuration overrides :func:`engine_args` put into the model's config ({} if none),
    checked again where the model is built."""
    config = dict(getattr(hf_config, DECODE_CONFIG_KEY, None) or {})
    if config:
        from ..kernels.decode_attention import check_overrides

        check_overrides(config)
    return config


def architecture_of(model: str) -> str:
    """The architecture a local model folder's config.json names (its first)."""
    config = Path(model).expanduser() / "config.json"
    if not config.is_file():
        raise ValueError(f"{model!r} is not a model folder with a config.json: pass architecture= instead")
    architectures = json.loads(config.read_text()).get("architectures") or []
    if not architectures:
        raise ValueError(f"{config} names no architecture: pass architecture= instead")
    return architectures[0]


def check_servable(xquant: XQuantConfig) -> None:
    """Refuse the settings the plugin does not serve yet (before any engine starts)."""
    unsupported = [name for name, on in (("cross_layer", xquant.cross_layer), ("layer_bits", xquant.layer_bits),
                                         ("keep_channel0", xquant.keep_channel0),
                                         ("recent/sink rows", xquant.recent or xquant.sink),
                                         (f"scale_format={xquant.scale_format!r}", xquant.scale_format != "fp16"))
                   if on]
    if unsupported:
        raise NotImplementedError(
            f"the vLLM plugin does not serve XQuantConfig({', '.join(unsupported)}) yet: it caches X, or with "
            "grouped-query attention the key and value latents, every row quantized per token with one code "
            "width for all layers and fp16 scales (scale_format='fp16').")


def serve_flags(xquant: XQuantConfig, architecture: str | None = None, *, model: str | None = None,
                decode_attention: dict[str, Any] | None = None) -> list[str]:
    """The same switches for ``vllm serve MODEL ...``."""
    args = engine_args(xquant, architecture, model=model, decode_attention=decode_attention)
    return ["--hf-overrides", json.dumps(args["hf_overrides"])]


def register() -> None:
    """The ``vllm.general_plugins`` entry point (vLLM may call it several times per process)."""
    from vllm import ModelRegistry
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from .attention import BACKEND_NAME

    if BACKEND_NAME not in AttentionBackendEnum.__members__:
        AttentionBackendEnum.register(BACKEND_NAME, "xq_compile.vllm.attention.XQuantAttentionBackend")
    for served in set(ARCHITECTURES.values()):
        if served not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(served, f"xq_compile.vllm.model:{served}")
