"""compile_model(): XQuant for a transformers model in one call.

    model = xq.compile_model(model, xq.XQuantConfig(bits=4), max_cache_len=4096, max_batch_size=4)
    out = model.generate(**inputs, max_new_tokens=64)   # no cache argument, no disable_compile
    model.xquant_cache.nbytes()                         # what the X cache really holds

It does what the explicit form does by hand (an :class:`XQuantCache` sized and typed for the model, the
forward compiled with the xquant backend and ``fullgraph=True``, ``disable_compile=True`` for generate)
and adds what only a wrapper around the model can do: every call's inputs are checked against the cache
*before* Dynamo sees them (rows, dtype, device, room for the new tokens), ``generate()`` is refused up
front when the prompt plus ``max_new_tokens`` cannot fit, and each ``generate()`` without a cache of its
own starts from an empty cache, as transformers' own generate does with the cache it creates.

transformers' ``generation_config.cache_implementation`` accepts only its own cache classes by name,
and its ``compile_config`` compiles with the inductor backend, on GPU, for decode steps only (the prompt
would never reach the X cache). Neither hook can carry an X cache, so the model's ``generate`` and
``forward`` are wrapped on the instance instead; calling ``compile_model`` again replaces the wrappers.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import torch

from . import _torch_private as private
from .cache import XQuantCache, cache_argument
from .config import XQuantConfig

# Enough graphs per model object for a notebook that tries many configurations on one model: each
# XQuantConfig x cache size compiles two (prompt and decode step), and Dynamo's default allows 8.
RECOMPILE_LIMIT = 64


@dataclasses.dataclass
class _Installed:
    """What compile_model put on a model, so that a second call can take it off again."""

    forward: Callable | None   # the instance attribute it replaced (None: the class's forward)
    generate: Callable | None
    hook: Any                  # the forward pre-hook's handle


def compile_model(model: torch.nn.Module, xquant: XQuantConfig | None = None, *, max_cache_len: int,
                  max_batch_size: int = 1, backend: str | Callable = "xquant", mode: str | None = None,
                  recompile_limit: int = RECOMPILE_LIMIT) -> torch.nn.Module:
    """Make ``model`` (a transformers causal LM) cache X instead of K/V; returns ``model`` itself.

    ``max_cache_len`` is the most tokens one sequence may hold (prompt + generated), ``max_batch_size``
    the most rows a call may have (``generate`` runs batch x num_beams x num_return_sequences rows).
    The cache, in the model's dtype and on its device, is ``model.xquant_cache``: allocated now for
    ``max_batch_size`` rows, and again by a ``generate()`` that needs another number of rows (the rows of
    a cache are fixed; its memory is freed first, and the new shapes compile once).
    ``backend`` is ``"xquant"`` (Inductor) or any xquant backend (e.g. ``xq.make_xquant_backend(
    "aot_eager")``); ``mode`` is torch.compile's (e.g. ``"reduce-overhead"`` on CUDA).
    """
    _uninstall(model)
    xquant = xquant or XQuantConfig()
    new_cache = functools.partial(XQuantCache, model.config, max_cache_len=max_cache_len, xquant=xquant,
                                  dtype=model.dtype, device=model.device)
    cache = new_cache(max_batch_size)
    original_forward, original_generate = model.forward, model.generate
    compiled = torch.compile(original_forward, backend=backend, fullgraph=True, mode=mode)

    @functools.wraps(original_forward)
    def forward(*args, **kwargs):
        with private.recompile_limit_at_least(recompile_limit):
            return compiled(*args, **kwargs)

    @functools.wraps(original_generate)
    def generate(*args, **kwargs):
        key = cache_argument(model)
        if kwargs.get(key) is None:  # transformers' generate creates a fresh cache per call; so do we
            rows = _check_generate(model, max_batch_size, max_cache_len, args, kwargs)
            if rows is not None and rows != model.xquant_cache.max_batch_size:
                # the rows of a cache are fixed: one sized for this call (a new batch size recompiles once)
                model.xquant_cache = None  # free the old one first
                model.xquant_cache = new_cache(rows)
            model.xquant_cache.reset()
            kwargs[key] = model.xquant_cache
        kwargs.setdefault("disable_compile", True)  # transformers' own compile would bypass the prompt's store
        return original_generate(*args, **kwargs)

    model.__dict__["_xquant_installed"] = _Installed(
        forward=model.__dict__.get("forward"), generate=model.__dict__.get("generate"),
        hook=model.register_forward_pre_hook(_check_call, with_kwargs=True),
    )
    model.forward, model.generate, model.xquant_cache = forward, generate, cache
    return model


def _uninstall(model: torch.nn.Module) -> None:
    installed = model.__dict__.pop("_xquant_installed", None)
    if installed is None:
        return
    installed.hook.remove()
    for name in ("forward", "generate"):
        previous = getattr(installed, name)
        if previous is None:
            model.__dict__.pop(name, None)
        else:
            model.__dict__[name] = previous
    model.__dict__.pop("xquant_cache", None)


def _input_tokens(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The call's input ids (or embeddings): rows x new tokens are its first two sizes."""
    tokens = kwargs.get("input_ids", args[0] if args else None)
    return kwargs.get("inputs_embeds") if tokens is None else tokens


def _check_call(model: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook: refuse, before Dynamo traces anything, a call the cache cannot take."""
    cache = kwargs.get(cache_argument(model))
    if not isinstance(cache, XQuantCache):
        return
    tokens = _input_tokens(args, kwargs)
    if tokens is None:
        return
    if not cache.xquant_layers:  # every layer slides and keeps the model's own K/V window: transformers checks
        return
    rows, new_tokens = tokens.shape[0], tokens.shape[1]
    layer = cache.xquant_layers[0]  # every X layer (X windows too) has the same rows, dtype, device and length
    problem = layer.call_problem(rows, new_tokens, model.dtype, model.device)
    if problem is not None:
        error, message = problem
        raise error(message)
    if new_tokens == 0:
        raise ValueError(
            f"This call has no new tokens for the XQuantCache, which holds {layer.host_length}: pass the "
            "tokens after the cached ones, or call model.xquant_cache.reset() before an unrelated prompt."
        )
    layer.check_room(new_tokens)


def _check_generate(model: torch.nn.Module, max_batch_size: int, max_cache_len: int, args: tuple,
                    kwargs: dict) -> int | None:
    """Refuse a generate() whose rows or length cannot fit, before the first token is computed.

    Returns the rows the call needs (None if its inputs are not given as tensors we can read).
    """
    config = kwargs.get("generation_config") or model.generation_config
    setting = lambda name: kwargs.get(name, getattr(config, name, None))  # noqa: E731
    inputs = _input_tokens(args, kwargs)
    if inputs is None:
        return None
    batch, prompt = inputs.shape[0], inputs.shape[1]
    rows = batch * max(setting("num_beams") or 1, setting("num_return_sequences") or 1)
    if rows > max_batch_size:
        raise ValueError(
            f"generate() needs {rows} cache rows (batch {batch} x num_beams {setting('num_beams') or 1}, or x "
            f"num_return_sequences {setting('num_return_sequences') or 1}) but the XQuantCache has "
            f"max_batch_size={max_batch_size}: call xq.compile_model(..., max_batch_size={rows})."
        )
    new, explicit_length = setting("max_new_tokens"), kwargs.get("max_length")
    # transformers' own defaults for the length vary across versions: then only the per-call check runs
    total = prompt + new if new is not None else explicit_length
    # The last generated token is returned, never written: a sequence of `total` tokens caches total - 1.
    if total is not None and total - 1 > max_cache_len:
        raise ValueError(
            f"generate() would cache {total - 1} tokens (prompt {prompt} + max_new_tokens "
            f"{total - prompt} - 1) but the XQuantCache has max_cache_len={max_cache_len}: lower "
            f"max_new_tokens, or call xq.compile_model(..., max_cache_len={total - 1})."
        )
    return rows
