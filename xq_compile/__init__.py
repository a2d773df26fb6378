"""xq-compile: XQuant as a torch.compile backend.

Cache a low-bit copy of each attention layer's input X instead of K and V, and rebuild K and V from it
inside the compiled graph::

    import torch, xq_compile as xq
    cache = xq.XQuantCache(model.config, max_batch_size=2, max_cache_len=1024,
                           xquant=xq.XQuantConfig(bits=4), dtype=torch.float32)
    model.forward = torch.compile(model.forward, backend="xquant", fullgraph=True)
    model.generate(**batch, **xq.cache_kwargs(model, cache), max_new_tokens=64, disable_compile=True)
"""

from __future__ import annotations

from importlib import metadata as _metadata

from . import kernels  # registers the xq_compile:: torch.library ops
from .backend import (COMPILE_LOG, CompileRecord, RewrittenGraph, make_xquant_backend, release_kv_buffers,
                      rewrite_for_backend, xquant_backend)
from .calibration import Calibration, calibrate
from .cache import XQuantCache, XQuantLayer, cache_argument, cache_kwargs
from .config import XQuantConfig
from .generation import compile_model
from . import models
from .memory import fp16_kv_cache_bytes, memory_report, xquant_cache_bytes
from .explanation import Explanation, explain

__all__ = [
    "COMPILE_LOG",
    "Calibration",
    "CompileRecord",
    "Explanation",
    "RewrittenGraph",
    "XQuantCache",
    "XQuantConfig",
    "XQuantLayer",
    "cache_argument",
    "calibrate",
    "cache_kwargs",
    "compile_model",
    "explain",
    "fp16_kv_cache_bytes",
    "make_xquant_backend",
    "memory_report",
    "release_kv_buffers",
    "rewrite_for_backend",
    "xquant_backend",
    "xquant_cache_bytes",
]


def _register_backend() -> None:
    """Make backend="xquant" resolve from a source checkout too.

    An installed distribution declares the backend as a ``torch_dynamo_backends`` entry point, and
    Dynamo registers it from there; registering it here as well would fail with "duplicate name".
    """
    from . import _torch_private as private

    declared = any(ep.name == "xquant" for ep in _metadata.entry_points(group="torch_dynamo_backends"))
    if not declared and "xquant" not in private.registered_backends():
        private.register_backend(xquant_backend, "xquant")


_register_backend()
