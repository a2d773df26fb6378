"""Every private torch API xq-compile touches, in one place, each with the reason it is needed.

torch has no public API for these (or only an underscore-named one, like ``torch._check``); if one
changes between torch 2.11 and 2.13+, this file is the only one to adapt. The rest of the package,
``passes/``, ``benchmarks/`` and ``examples/`` reach them only through the functions here.
"""

from __future__ import annotations

import logging

import torch
from torch import fx
from torch.utils.weak import WeakIdKeyDictionary

log = logging.getLogger(__name__)


def mark_static_address(tensor: torch.Tensor) -> None:
    # The X-cache tensors are written in place by compiled graphs and must keep their address for
    # CUDA graphs; transformers' StaticCache uses the same call for its K/V tensors.
    torch._dynamo.mark_static_address(tensor)


def register_backend(fn, name: str) -> None:
    # torch.compile(backend="name") looks names up in Dynamo's registry; entry points cover the
    # installed case, this covers a source checkout (see xq_compile/__init__.py).
    torch._dynamo.register_backend(fn, name=name)


def lookup_backend(name: str):
    # Resolves a backend name the way torch.compile(backend=name) does.
    return torch._dynamo.lookup_backend(name)


def registered_backends() -> list[str]:
    return torch._dynamo.list_backends(exclude_tags=())


def inductor_compile(gm: torch.fx.GraphModule, example_inputs, mode: str | None):
    # Inductor is the default inner compiler; it is only reachable through compile_fx. The mode's
    # option dict (e.g. reduce-overhead -> CUDA graphs) is applied per compile, never globally.
    from torch._inductor import config as inductor_config, list_mode_options
    from torch._inductor.compile_fx import compile_fx

    patches = dict(list_mode_options(mode)) if mode else {}
    if hasattr(inductor_config, "emulate_precision_casts"):
        # A fused kernel then rounds each fp16/bf16 intermediate (the rows cast to the model's dtype
        # before a projection) as eager torch does, so compiled logits match the eager model's. The
        # quantizer does not rely on it: quant.rounded() does its roundings itself, since on torch
        # < 2.13 the C++ backend skips fp16 round trips inside a kernel with this option or not.
        patches["emulate_precision_casts"] = True
    try:
        return compile_fx(gm, example_inputs, config_patches=patches)
    except Exception as error:
        if not _hit_bounds_check_bug(error):
            raise
    # torch 2.11 and 2.12's C++ backend can emit the bounds check of an index computed inside a
    # vectorized loop before the index itself ("'tmp2' was not declared in this scope",
    # pytorch/pytorch#178244, fixed in 2.13). transformers' sliding-window masks hit it (Mistral,
    # Gemma 2/3, with or without xquant). Only a graph that failed so is compiled again without the
    # checks: an index out of range in it then reads another element instead of raising.
    log.warning("torch %s: this graph's C++ failed to compile (pytorch/pytorch#178244); compiling it again "
                "without index bounds checks (torch >= 2.13 needs no such retry)", torch.__version__)
    patches["assert_indirect_indexing"] = False
    return compile_fx(gm, example_inputs, config_patches=patches)


def guarded_on_data_dependent_size(error: BaseException) -> bool:
    """Whether compiling failed because it needed to decide something about a size read with ``.item()``.

    Inductor raises symbolic_shapes.GuardOnDataDependentSymNode (experimental, no public alias) from a
    lowering that asks, e.g., whether a tensor of n rows is contiguous; by the time it reaches us it is
    wrapped in InductorError (``inner_exception``) or chained (``__cause__``/``__context__``)."""
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, GuardOnDataDependentSymNode):
            return True
        seen.add(id(error))
        error = getattr(error, "inner_exception", None) or error.__cause__ or error.__context__
    return False


def _hit_bounds_check_bug(error: Exception) -> bool:
    text = str(error)
    return (torch.__version__ < (2, 13) and "CppCompileError" in type(error).__name__ + text
            and "index out of bounds" in text and "was not declared in this scope" in text)


def recompile_limit_at_least(limit: int):
    # Dynamo allows recompile_limit graphs per code object and guarded object (8 by default); a model
    # compiled for several XQuantConfigs needs two per configuration. There is no per-compile setting,
    # so compile_model raises it only around its own calls (a context manager, restored on exit).
    # The option was named cache_size_limit before torch 2.6.
    from torch._dynamo import config as dynamo_config

    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    return dynamo_config.patch(**{name: max(limit, getattr(dynamo_config, name))})


def copy_dynamo_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    # Dynamo keeps using the graph module it handed to the backend (it reads placeholder
    # meta["grapharg"] after the backend returns), so passes must rewrite a copy. The copy carries the
    # attributes Dynamo and Inductor read off the module.
    graph = torch.fx.Graph()
    old_to_new: dict = {}
    output = graph.graph_copy(gm.graph, old_to_new)
    graph.output(output)
    for old, new in old_to_new.items():
        if old.op == "placeholder" and hasattr(old, "_dynamo_source"):
            # AOT autograd maps each placeholder back to its Dynamo source through this attribute.
            new._dynamo_source = old._dynamo_source
    copy = torch.fx.GraphModule(gm, graph)
    copy.meta = dict(getattr(gm, "meta", {}))
    for attr in ("_dynamo_source", "_param_name_to_source", "_source_to_user_stacks"):
        if hasattr(gm, attr):
            setattr(copy, attr, getattr(gm, attr))
    return copy


def declare_static_placeholder(node: torch.fx.Node) -> None:
    # A placeholder the rewrite adds has no Dynamo source (AOT accepts None, as for DDP-split graphs),
    # and is declared a static input: its address never changes (the cache's buffers), which CUDA
    # graphs rely on instead of copying it in on every replay.
    node._dynamo_source = None
    node.meta["tensor_dict"] = {"_dynamo_static_input_type": "guarded"}


def as_static_example(tensor: torch.Tensor, example_inputs) -> torch.Tensor:
    # Inductor fakeifies real example inputs with Dynamo's shape environment, which makes their sizes
    # symbolic once Dynamo turned on dynamic shapes (e.g. after a prefill of another length), and
    # duck-sizes equal dims together. The X state has fixed shapes: hand Inductor a fake tensor with
    # static shapes from the same fake mode instead.
    fake_mode = torch._guards.detect_fake_mode(example_inputs)
    if fake_mode is None:
        return tensor
    return fake_mode.from_tensor(tensor, static_shapes=True)


# -- logging: make the rewrite visible in TORCH_LOGS / TORCH_TRACE like Inductor's own passes -------
# torch has no public API to declare a log artifact; torch._logging.register_artifact/register_log
# are what torch's own _registrations.py uses. Registering only adds names to torch's registry: it
# changes no log level and attaches no handler, so importing xq_compile leaves logging as it was.
# The artifact is enabled with torch._logging.set_logs(modules={"xquant": True}) after import
# (TORCH_LOGS="xquant" in the environment is parsed when torch is imported, before any library can
# register a name, and is refused by torch), or from the environment with TORCH_LOGS="+xq_compile"
# (the whole package's logger, of which the artifact logger is a child).
XQUANT_ARTIFACT = "xquant"


def register_log_artifact() -> None:
    from torch._logging import _internal

    _internal.register_artifact(
        XQUANT_ARTIFACT,
        "xq-compile: per-layer site reports of the xquant rewrite and the rewritten Dynamo graph",
        visible=True,
    )
    # The artifact logger is xq_compile.backend.__xquant; torch attaches its stderr handler only to
    # registered logs, so register the package logger as a log too (else enabling the artifact alone
    # would produce records with no handler to print them).
    _internal.register_log("xq_compile", "xq_compile")


def artifact_logger(module_name: str):
    return torch._logging.getArtifactLogger(module_name, XQUANT_ARTIFACT)


def trace_artifact(name: str, payload_fn) -> None:
    # TORCH_TRACE (tlparse) records structured artifacts; this is how Inductor logs its graphs there.
    # payload_fn is only called when a trace is being written.
    torch._logging.trace_structured(
        "artifact", metadata_fn=lambda: {"name": name, "encoding": "string"}, payload_fn=payload_fn
    )


def compile_counters():
    # The counters dict Dynamo and Inductor increment per compile (counters["inductor"][...]); tests and
    # users read match counts from counters["xquant"]. torch._dynamo.reset() does not clear it;
    # counters.clear() does.
    return torch._dynamo.utils.counters


# -- what Dynamo records on the graph it hands to a backend -------------------------------------------
# The matcher reads both; torch documents neither (they are Dynamo's own bookkeeping).


def example_value(node) -> object | None:
    """The value Dynamo recorded for a node while tracing (a FakeTensor, SymInt...), None if none."""
    # Dynamo stores it as meta["example_value"] on every node it creates; AOT autograd and Inductor
    # use meta["val"] instead, which Dynamo's graph does not have yet.
    return node.meta.get("example_value") if isinstance(node, fx.Node) else None


def forget_example_values(node: fx.Node) -> None:
    """Drop the recorded values of a node copied to a new place, where its shapes differ (e.g. a region
    cloned to run over the n cached rows instead of the S new tokens): downstream passes recompute them."""
    node.meta.pop("example_value", None)
    node.meta.pop("val", None)


def dynamo_source_name(node: fx.Node) -> str | None:
    """Where Dynamo lifted a placeholder from, e.g. ``L['kwargs']['cache'].layers[3].keys``; None if unknown.

    The only record of which Python object a graph input is (the cache tensor of which layer, keys or
    values). Dynamo keeps it in meta["grapharg"] while the backend runs and deletes it afterwards.
    """
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    if source is None:
        return None
    name = source.name  # a property in recent torch, a method in older ones
    return name() if callable(name) else str(name)


# -- tensors ------------------------------------------------------------------------------------------


def version_counter(tensor: torch.Tensor) -> int:
    """A number that changes with every in-place write to ``tensor`` (autograd's version counter).

    Weights are folded with the rotation, or factored by SVD, once and reused while unchanged; a
    weight modified in place (fine-tuning, loading a checkpoint into the model) must be redone. torch
    has no public way to ask whether a tensor was written since; ``Tensor._version`` is that counter.
    """
    return tensor._version


def weak_tensor_map() -> WeakIdKeyDictionary:
    """A dict keyed by tensor identity that does not keep its keys alive.

    ``weakref.WeakKeyDictionary`` compares keys with ``==``, which on tensors is elementwise (and
    fails); torch's own WeakIdKeyDictionary (what Dynamo uses for the same purpose) compares identity.
    """
    return WeakIdKeyDictionary()


# -- compiling ----------------------------------------------------------------------------------------


def check(condition) -> None:
    """A runtime assertion that also tells the symbolic-shape system a fact, e.g. of a data-dependent
    length n (``n <= max_len``), so compiled code needs no guard on it. ``torch._check`` is documented
    but underscore-named."""
    torch._check(condition)


def emit_check(graph: fx.Graph, condition: fx.Node) -> fx.Node:
    """:func:`check` as a node of a graph being rewritten (its target is ``torch._check`` itself, which
    AOT autograd and Inductor know)."""
    return graph.call_function(torch._check, (condition,))


def mark_dynamic(tensor: torch.Tensor, dim: int) -> None:
    """Compile ``dim`` of ``tensor`` as a symbolic size from the first call on (one graph for every
    length) instead of a static graph followed by a dynamic recompile. No public API does this."""
    torch._dynamo.mark_dynamic(tensor, dim)


def capture_scalar_outputs():
    """A context in which Dynamo keeps ``tensor.item()`` inside the graph (a data-dependent size)
    instead of breaking the graph there. A Dynamo config option; patched for the context only, never
    globally, so a library importing xq-compile keeps its own setting."""
    return torch._dynamo.config.patch(capture_scalar_outputs=True)
