"""The "xquant" torch.compile backend: copy the Dynamo graph, rewrite it, compile it with Inductor.

    model.forward = torch.compile(model.forward, backend="xquant", fullgraph=True)

The rewrite adds graph inputs (the X state of each layer, positions, rotated weights); the callable
returned to Dynamo takes the original inputs, fetches the extra ones from the cache the call was made
with, checks that the new tokens fit, and runs the compiled graph.

The rewrite is also usable inside a user's own Dynamo backend, before any compiler::

    def my_backend(gm, example_inputs):
        rw = xq.rewrite_for_backend(gm, example_inputs)   # XQuant rewrite of a copy of gm
        my_fx_pass(rw.graph_module)                        # any further FX pass
        compiled = some_compiler(rw.graph_module, rw.example_inputs)
        return rw.bind(compiled)                           # takes Dynamo's original arguments
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import warnings
from typing import Any, Callable, Iterator, Sequence

import torch

from . import _torch_private as private, refusal
from .config import XQuantConfig
from .passes import RewriteResult, SiteReport, XQuantRewrite

log = logging.getLogger("xq_compile")

# The rewrite shows up under TORCH_LOGS like Inductor's passes: torch._logging.set_logs(modules={"xquant":
# True}) (or TORCH_LOGS="+xq_compile") prints each graph's site reports and rewritten code.
private.register_log_artifact()
artifact_log = private.artifact_logger(__name__)


@dataclasses.dataclass
class CompileRecord:
    """One graph the backend compiled: what was rewritten, and the graph before and after."""

    reports: list[SiteReport]
    code_before: str
    code_after: str

    @property
    def rewritten(self) -> int:
        return sum(r.status == "rewritten" for r in self.reports)

    @property
    def skipped(self) -> int:
        return sum(r.status == "skipped" for r in self.reports)

    @property
    def kept(self) -> int:
        """Sites left as the model wrote them by design (sliding-window layers): no warning."""
        return sum(r.status == "kept" for r in self.reports)

    def summary(self) -> str:
        head = f"xquant: {self.rewritten} site(s) rewritten, {self.skipped} skipped"
        if self.kept:
            head += f", {self.kept} kept (sliding-window layers)"
        if not self.reports:
            head += " (no attention K/V cache write found in this graph)"
        return "\n  ".join([head, *(str(r) for r in self.reports)])


# The most recent compiles, for explain() and tests (bounded: a long-running server compiles rarely,
# but must not accumulate graph text forever).
COMPILE_LOG: collections.deque[CompileRecord] = collections.deque(maxlen=32)

# Lists that currently collect every new record (explain() uses one to see exactly the graphs its own
# call compiled, whichever backend object produced them). Dynamo compiles on the calling thread.
_SINKS: list[list[CompileRecord]] = []


@contextlib.contextmanager
def collect_records() -> Iterator[list[CompileRecord]]:
    """Collect the CompileRecords of every graph rewritten inside the ``with`` block."""
    sink: list[CompileRecord] = []
    _SINKS.append(sink)
    try:
        yield sink
    finally:
        _SINKS.remove(sink)


@dataclasses.dataclass
class RewrittenGraph:
    """A Dynamo graph after the XQuant rewrite, ready for any compiler (see :func:`rewrite_for_backend`).

    ``graph_module`` takes ``example_inputs``: Dynamo's inputs followed by the X state of each rewritten
    layer. Compile it with anything, then hand Dynamo ``bind(compiled)``, which takes Dynamo's original
    arguments and appends the X state of the cache each call is made with.
    """

    graph_module: torch.fx.GraphModule
    example_inputs: list[Any]
    result: RewriteResult
    record: CompileRecord
    # An error a check found while Dynamo traced (see refusal.py): the graph must not run, and every
    # call of what bind() returns raises it.
    refused: Exception | None = None

    def bind(self, compiled: Callable) -> Callable:
        """Wrap ``compiled`` (the compiled ``graph_module``) into what a Dynamo backend returns."""
        if self.refused is not None:
            return refusal.raiser(self.refused)
        return _bind_x_state(compiled, self.result) if self.result.extra_inputs else compiled


def rewrite_for_backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any],
                        options: XQuantConfig | None = None, rebuild: str = "auto") -> RewrittenGraph:
    """Apply the XQuant rewrite to (a copy of) a Dynamo graph, for use inside any Dynamo backend.

    ``gm`` itself is left untouched (Dynamo keeps reading it after the backend returns). The record is
    published like the built-in backend's: ``COMPILE_LOG``, the ``xquant`` log artifact, TORCH_TRACE,
    ``torch._dynamo.utils.counters["xquant"]`` and a warning for skipped sites.
    """
    rewritten = _rewrite(gm, example_inputs, options, rebuild)
    if rewritten.refused is None:
        _publish(rewritten.record)
    return rewritten


def _rewrite(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], options: XQuantConfig | None,
             rebuild: str) -> RewrittenGraph:
    """rewrite_for_backend() without publishing the record."""
    graph_module = private.copy_dynamo_graph_module(gm)
    code_before = graph_module.code
    refused = refusal.refusal_in(graph_module)
    if refused is not None:  # a check failed while Dynamo traced: nothing to rewrite, nothing may run
        result = RewriteResult(graph_module, extra_inputs=[], reports=[], appends=[])
        return RewrittenGraph(graph_module, list(example_inputs), result,
                              CompileRecord([], code_before, code_before), refused)
    result = XQuantRewrite(options, rebuild).apply(graph_module, example_inputs)
    record = CompileRecord(result.reports, code_before, graph_module.code)
    extra = [private.as_static_example(spec.fetch(example_inputs), example_inputs)
             for spec in result.extra_inputs]
    return RewrittenGraph(graph_module, [*example_inputs, *extra], result, record)


def make_xquant_backend(inner: str | Callable = "inductor", rebuild: str = "auto") -> Callable:
    """An xquant backend whose rewritten graph is compiled by ``inner``.

    ``inner`` is a backend name (``"inductor"``, ``"aot_eager"``, ...) or any callable
    ``(graph_module, example_inputs) -> callable`` -- for instance a function that runs your own FX
    passes on the rewritten graph and then calls another backend. ``backend="xquant"`` is
    ``make_xquant_backend("inductor")``; ``"aot_eager"`` runs the rewritten graph without code
    generation (fast, and handy to debug the rewrite itself). ``rebuild`` picks the form of the rebuild:
    ``"auto"`` (CUDA: the fused ``xq_compile::decode_attention`` op for decode steps whose RoPE it
    knows, the ``xq_compile::dequant_project`` op otherwise, both over max_cache_len rows with the
    length read on device; CPU: plain torch over the n cached rows). ``"fused"`` and ``"op"`` force
    the CUDA forms on any device (their CPU kernels are the torch references: how they are tested
    without a GPU), ``"inline"`` the plain-torch form.
    """

    def xquant(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], mode: str | None = None,
               options: dict | None = None) -> Callable:
        # options= configures caches that are not an XQuantCache (a model's own K/V buffers, a
        # StaticCache): their X state is then created by the rewrite and owned by the compiled function.
        config = XQuantConfig.from_options(options) if options else None
        rewritten = _rewrite(gm, example_inputs, config, rebuild)
        if rewritten.refused is not None:  # refused while Dynamo traced: nothing to compile or publish
            return rewritten.bind(None)  # every call raises the error
        if config is not None:
            rewritten.refused = _options_ignored(config, rewritten.record)
        if rewritten.refused is not None:
            _publish(rewritten.record)
            return rewritten.bind(None)
        compiled = None
        try:
            compiled = _compile_inner(inner, rewritten.graph_module, rewritten.example_inputs, mode)
        except Exception as error:
            retry = _rewrite_for_static_shapes(gm, example_inputs, config, rebuild, rewritten, error)
            if retry is None:
                _publish(rewritten.record)  # the graph that failed, for the user to look at
                raise
            rewritten = retry
        # one record per graph Dynamo gets back: the retry's, if any (published before it compiles, so
        # that a failure shows it)
        _publish(rewritten.record)
        if compiled is None:
            compiled = _compile_inner(inner, rewritten.graph_module, rewritten.example_inputs, mode)
        return rewritten.bind(compiled)

    return xquant


def _rewrite_for_static_shapes(gm, example_inputs, config, rebuild: str, failed: RewrittenGraph,
                               error: Exception) -> RewrittenGraph | None:
    """The graph rewritten again with the ``op`` rebuild, if ``rebuild="auto"``'s graph failed to compile
    on a size read with ``.item()`` and the op form changes it; else None.

    On CPU "auto" rebuilds K/V over the n cached rows, n read with ``.item()``: a size only known at run
    time, which some Inductor lowerings cannot handle (torch 2.12's cat asks whether n rows are
    contiguous, for a model whose RoPE stacks its rotated halves). The op form rebuilds max_cache_len
    rows with the length on the device: static shapes, the same values.
    """
    if rebuild != "auto" or not private.guarded_on_data_dependent_size(error):
        return None
    try:
        retry = _rewrite(gm, example_inputs, config, "op")
    except Exception:  # e.g. a GPU whose Triton dots the op form needs (strategies.strategy_for)
        log.debug("xquant: no rebuild='op' retry", exc_info=True)
        return None
    if retry.record.code_after == failed.record.code_after:
        return None  # no site took the n-row form: the size the compile failed on is the model's own
    log.warning("xquant: Inductor could not compile the rows rebuilt over the cache's current length (%s: %s); "
                "rebuilding over max_cache_len rows instead (rebuild='op': the same values, more work per "
                "step). Pass rebuild='op' to make_xquant_backend to choose it up front.",
                type(error).__name__, str(error).splitlines()[0] if str(error) else "")
    return retry


def _options_ignored(config: XQuantConfig, record: CompileRecord) -> Exception | None:
    """The error for options= that would change nothing: attention sites found, none rewritten.

    The user asked for an X cache; running the model with its full K/V cache instead would look like
    success. (A graph with no attention at all, e.g. one side of a graph break, is not an error.)
    """
    if not record.reports or record.rewritten:
        return None
    message = (f"xquant was asked for {config.describe()} (options=), but none of this graph's "
               f"{len(record.reports)} attention sites could be rewritten, so the model would run with its "
               "full K/V cache:\n  " + "\n  ".join(str(r) for r in record.reports))
    if any("allocated lazily" in r.reason for r in record.reports):
        message += (
            "\nA StaticCache created the usual way allocates its K/V inside the first compiled call. Allocate "
            "it before that call with transformers' cache.early_initialization(batch_size=..., "
            "num_heads=config.num_key_value_heads, head_dim=..., dtype=model.dtype, device=model.device), "
            "or use xq.compile_model(model, ...) / an xq.XQuantCache."
        )
    return ValueError(message)


def _compile_inner(inner, gm, example_inputs, mode):
    if inner == "inductor":
        return private.inductor_compile(gm, example_inputs, mode)
    if mode is not None:
        raise ValueError(f"mode={mode!r} only applies to the inductor inner compiler, not {inner!r}")
    compiler = private.lookup_backend(inner) if isinstance(inner, str) else inner
    return compiler(gm, example_inputs)


xquant_backend = make_xquant_backend("inductor")


def _publish(record: CompileRecord) -> None:
    """Make one graph's outcome visible everywhere a user or a test may look."""
    COMPILE_LOG.append(record)
    for sink in _SINKS:
        sink.append(record)
    counters = private.compile_counters()["xquant"]
    counters["graphs"] += 1
    counters["sites_rewritten"] += record.rewritten
    counters["sites_skipped"] += record.skipped
    log.info("xquant: %d site(s) rewritten, %d skipped", record.rewritten, record.skipped)
    artifact_log.debug("%s\n\n===== graph after the xquant rewrite =====\n%s", record.summary(), record.code_after)
    private.trace_artifact("xquant_rewrite", lambda: f"{record.summary()}\n\n{record.code_after}")
    skipped = [r for r in record.reports if r.status == "skipped"]
    if skipped:
        warnings.warn(
            "xquant left these attention sites unmodified (they keep the original computation):\n  "
            + "\n  ".join(str(r) for r in skipped),
            stacklevel=4,
        )


def _bind_x_state(compiled: Callable, result: RewriteResult) -> Callable:
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


def release_kv_buffers(model: torch.nn.Module) -> int:
    """Free the K/V buffers of ``model`` whose contents now live in an xquant X state (options= mode).

    Each such buffer is replaced by a stride-0 view of one element (same shape, 4 bytes): the next call
    recompiles once against the placeholder, and any eager write into it fails loudly. Returns the
    number of bytes released.
    """
    from .cache import layer_of, register_placeholders

    released = 0
    for module in model.modules():
        for name, buffer in list(module._buffers.items()):
            layer = layer_of(buffer) if buffer is not None else None
            if layer is None or layer.tracks_length or buffer.stride() == (0,) * buffer.dim():
                continue
            placeholder = torch.zeros(1, dtype=buffer.dtype, device=buffer.device).expand(buffer.shape)
            released += buffer.untyped_storage().nbytes()
            module._buffers[name] = placeholder
            if buffer is layer.keys:
                register_placeholders(layer, placeholder, layer.values)
            else:
                register_placeholders(layer, layer.keys, placeholder)
    return released
