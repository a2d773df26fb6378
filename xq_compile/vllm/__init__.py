"""Serve XQuant with vLLM: an out-of-tree plugin that keeps each layer's packed X in vLLM's paged memory.

    from vllm import LLM, SamplingParams
    from xq_compile import XQuantConfig
    from xq_compile.vllm import engine_args

    llm = LLM("path/to/llama", **engine_args(XQuantConfig(bits=4, form="x")))

Installing xq-compile declares the ``vllm.general_plugins`` entry point :func:`register`, which vLLM
loads in every process: it adds the ``XQUANT`` attention backend and the model class
``XQuantLlamaForCausalLM``. :func:`engine_args` selects them for one engine (``hf_overrides``), so stock
models in the same installation are untouched. Importing this module does not import vLLM.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from ..config import XQuantConfig
from .layout import StateField, bytes_per_token, token_state_layout

__all__ = ["ARCHITECTURES", "StateField", "bytes_per_token", "check_servable", "engine_args", "register",
           "serve_flags", "token_state_layout"]

# The stock architecture each served class stands in for (Llama family first).
ARCHITECTURES = {"LlamaForCausalLM": "XQuantLlamaForCausalLM"}


def engine_args(xquant: XQuantConfig, architecture: str = "LlamaForCausalLM") -> dict[str, Any]:
    """Keyword arguments for ``vllm.LLM(model, **engine_args(xquant))`` (or ``AsyncEngineArgs``) that serve
    the model with the X cache: the plugin's model class, and the config it reads."""
    if not isinstance(xquant, XQuantConfig):
        raise TypeError(f"engine_args takes an XQuantConfig, got {type(xquant).__name__}")
    if architecture not in ARCHITECTURES:
        raise ValueError(f"the vLLM plugin serves {sorted(ARCHITECTURES)} so far, not {architecture!r}")
    check_servable(xquant)
    return {"hf_overrides": {"architectures": [ARCHITECTURES[architecture]], "xquant": dataclasses.asdict(xquant)}}


def check_servable(xquant: XQuantConfig) -> None:
    """Refuse the settings the plugin does not serve yet (before any engine starts)."""
    unsupported = [name for name, on in (("cross_layer", xquant.cross_layer), ("layer_bits", xquant.layer_bits),
                                         ("keep_channel0", xquant.keep_channel0), ("form='latent'",
                                                                                   xquant.form == "latent"),
                                         ("recent/sink rows", xquant.recent or xquant.sink)) if on]
    if unsupported:
        raise NotImplementedError(
            f"the vLLM plugin does not serve XQuantConfig({', '.join(unsupported)}) yet: it caches X itself "
            "(form='x'), one code width for all layers, every row quantized.")


def serve_flags(xquant: XQuantConfig, architecture: str = "LlamaForCausalLM") -> list[str]:
    """The same switches for ``vllm serve MODEL ...``."""
    return ["--hf-overrides", json.dumps(engine_args(xquant, architecture)["hf_overrides"])]


def register() -> None:
    """The ``vllm.general_plugins`` entry point (vLLM may call it several times per process)."""
    from vllm import ModelRegistry
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from .attention import BACKEND_NAME

    if BACKEND_NAME not in AttentionBackendEnum.__members__:
        AttentionBackendEnum.register(BACKEND_NAME, "xq_compile.vllm.attention.XQuantAttentionBackend")
    for served in ARCHITECTURES.values():
        if served not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(served, f"xq_compile.vllm.model:{served}")
