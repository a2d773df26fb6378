"""The "xquant" torch.compile backend: copy the Dynamo graph, rewrite it, compile it with Inductor.

    model.forward = torch.compile(model.forward, backend="xquant", fullgraph=True)

The rewrite adds graph inputs (the X state of each layer, positions, rotated weights); the callable
returned to Dynamo takes the original inputs, fetches the extra ones from the cache the call was made
with, checks that the new tokens fit, and runs the compiled graph.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import warnings
from typing import Any, Callable, Sequence

import torch

from . import _torch_private as private
from .passes import SiteReport, XQuantRewrite

log = logging.getLogger("xq_compile")


@dataclasses.dataclass
class CompileRecord:
    """One graph the backend compiled: what was rewritten, and the graph before and after."""

    reports: list[SiteReport]
    code_before: str
    code_after: str

    @property
    def rewritten(self) -> int:
        return sum(r.status == "rewritten" for r in self.reports)


# The most recent compiles, for explain() and tests (bounded: a long-running server compiles rarely,
# but must not accumulate graph text forever).
COMPILE_LOG: collections.deque[CompileRecord] = collections.deque(maxlen=32)


def make_xquant_backend(inner: str | Callable = "inductor") -> Callable:
    """An xquant backend whose rewritten graph is compiled by ``inner`` (a backend name or callable).

    ``backend="xquant"`` is ``make_xquant_backend("inductor")``; ``"aot_eager"`` runs the rewritten
    graph without code generation (handy to debug the rewrite itself).
    """

    def xquant(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], mode: str | None = None,
               options: dict | None = None) -> Callable:
        if options:
            raise ValueError(
                "the xquant backend takes its configuration from the XQuantCache passed to the model "
                f"(xq.XQuantCache(..., xquant=xq.XQuantConfig(...))); got options={options}."
            )
        graph_module = private.copy_dynamo_graph_module(gm)
        code_before = graph_module.code
        result = XQuantRewrite().apply(graph_module, example_inputs)
        COMPILE_LOG.append(CompileRecord(result.reports, code_before, graph_module.code))
        _report(result.reports)
        extra = [private.as_static_example(spec.fetch(example_inputs), example_inputs)
                 for spec in result.extra_inputs]
        compiled = _compile_inner(inner, graph_module, [*example_inputs, *extra], mode)
        return _bind_x_state(compiled, result) if result.extra_inputs else compiled

    return xquant


def _compile_inner(inner, gm, example_inputs, mode):
    if inner == "inductor":
        return private.inductor_compile(gm, example_inputs, mode)
    if mode is not None:
        raise ValueError(f"mode={mode!r} only applies to the inductor inner compiler, not {inner!r}")
    compiler = private.lookup_backend(inner) if isinstance(inner, str) else inner
    return compiler(gm, example_inputs)


xquant_backend = make_xquant_backend("inductor")


def _report(reports: list[SiteReport]) -> None:
    skipped = [r for r in reports if r.status == "skipped"]
    log.info("xquant: %d site(s) rewritten, %d skipped", len(reports) - len(skipped), len(skipped))
    if skipped:
        warnings.warn(
            "xquant left these attention sites unmodified (they keep the original computation):\n  "
            + "\n  ".join(str(r) for r in skipped),
            stacklevel=3,
        )


def _bind_x_state(compiled: Callable, result) -> Callable:
    from .cache import layer_of

    extra_inputs = result.extra_inputs
    appends = result.appends

    def run(*args):
        layers = [(layer_of(args[i]), count(args)) for i, count in appends]
        for layer, new_tokens in layers:
            if layer is None:
                raise RuntimeError("xquant graph called without the XQuantCache it was compiled for")
            layer.check_room(new_tokens)
        extra = [spec.fetch(args) for spec in extra_inputs]
        out = compiled(*args, *extra)  # Dynamo's convention for what a backend returns
        for layer, new_tokens in layers:
            layer.host_length += new_tokens
        return out

    return run
