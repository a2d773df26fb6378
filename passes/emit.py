"""Emit Python/torch code into an existing FX graph by running it on proxies.

The rewrite does not hand-build nodes for quantize/pack/dequantize/RoPE: it runs the very same
reference functions from ``xq_compile.quant`` on ``fx.Proxy`` objects, which records their ops at the
current insertion point. One implementation is then the reference, the CPU kernel and the graph code.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import fx
from torch.fx.proxy import GraphAppendingTracer

from xq_compile._torch_private import emit_check, forget_example_values


class Emitter:
    """Records calls into ``graph`` at its current insertion point."""

    def __init__(self, graph: fx.Graph) -> None:
        self.graph = graph
        self.tracer = GraphAppendingTracer(graph)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return fx.Proxy(node, self.tracer)

    def __call__(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``fn`` with every fx.Node argument (also inside tuples and lists) replaced by a proxy; return
        node(s) for its result(s)."""
        wrap = lambda a: self.proxy(a) if isinstance(a, fx.Node) else a  # noqa: E731
        args, kwargs = fx.node.map_aggregate((args, kwargs), wrap)
        out = fn(*args, **kwargs)
        return _unwrap(out)

    def check(self, condition: fx.Node) -> None:
        """A runtime assertion that also teaches the symbolic shape system a fact (e.g. n <= max_len)."""
        emit_check(self.graph, condition)


def _unwrap(out: Any) -> Any:
    if isinstance(out, fx.Proxy):
        return out.node
    if isinstance(out, (tuple, list)):
        return type(out)(_unwrap(o) for o in out)
    return out


def clone_region(graph: fx.Graph, nodes: list[fx.Node], replace: dict[fx.Node, fx.Node]) -> dict[fx.Node, fx.Node]:
    """Copy ``nodes`` (in graph order) at the insertion point, with inputs remapped through ``replace``.

    Used to re-apply the model's own RoPE code to rebuilt keys, so any RoPE variant the model
    computes with pointwise ops is reproduced exactly rather than re-implemented by us.
    """
    mapping = dict(replace)
    for node in nodes:
        new = graph.node_copy(node, lambda n: mapping.get(n, n))
        # The recorded example value has the original shapes (S tokens), not the cached length.
        forget_example_values(new)
        mapping[node] = new
    return mapping
