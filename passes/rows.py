"""Replay graph code that Dynamo traced for the S tokens of one call over another number of rows.

A static-shape Dynamo graph records the sizes the model read off its tensors as literals. gpt-fast's
rotary embedding reads ``freqs_cis.view(1, x.size(1), 1, x.size(3), 2)``; its graph holds
``view(1, 8, 1, 8, 2)`` for an 8-token prefill and ``view(1, 1, 1, 8, 2)`` for a decode step. The
rewrite clones such code (the model's own RoPE) to apply it to the rebuilt rows of the whole cache,
so every literal that stood for the token count must become the row count: left as it is, the
shape system concludes that the cached length equals S (Inductor then asserts ``u1 <= 1`` when a
decode step runs over more than one cached row).

Which literal stands for the token count cannot be told from its value: in a decode step the batch,
the token count and an unsqueezed axis are all 1. It is found by running the region on meta tensors
whose sequence axis has a sentinel length and keeping, for each shape literal, a choice for which
every node's shape is its traced shape with one axis grown by the same factor. A wrong choice puts
the rows on another axis and is rejected where it meets the real sequence axis (a broadcast of the
two, or the layout of the region's result).
"""

from __future__ import annotations

import math
import operator
from typing import Sequence

import torch
from torch import fx

from .match import example_value

# Growth factor of the sequence axis in the meta run: a prime no model size is a multiple of by chance.
SENTINEL_FACTOR = 7919

RESHAPE_METHODS = {"view", "reshape"}


class RowReplayError(RuntimeError):
    """The region cannot be replayed over a different number of rows."""


def fit_to_rows(nodes: Sequence[fx.Node], clones: dict[fx.Node, fx.Node], inputs: dict[fx.Node, int],
                seq_len, rows, choices: dict[fx.Node, tuple[int, int] | None],
                expected_axis: dict[fx.Node, int] | None = None) -> None:
    """Rewrite the shape literals of ``clones`` (original node -> its clone) that stand for ``seq_len``.

    ``nodes``: the original region in graph order, including nodes cloned earlier (then their decision
    is in ``choices``, which this call extends). ``inputs``: the region's inputs that now hold ``rows``
    rows, with the axis of their rows. ``rows``: an int or an fx node (a data-dependent length).
    ``expected_axis``: region nodes whose rows must end up on that axis (the appended keys: dim 2).

    In a dynamic-shape graph the token count is a symbol (a SymInt input of the graph, e.g. ``s75``):
    its uses in the clones become ``rows``, no search needed.
    """
    if not isinstance(seq_len, int):
        for clone in clones.values():
            clone.args, clone.kwargs = (fx.node.map_arg(a, lambda n: rows if _is_symbol(n, seq_len) else n)
                                        for a in (clone.args, clone.kwargs))
        return
    grown = seq_len * SENTINEL_FACTOR
    meta: dict[fx.Node, object] = {}
    for node, axis in inputs.items():
        value = _as_meta(example_value(node), node)
        shape = list(value.shape)
        if shape[axis] != seq_len:
            raise RowReplayError(f"{node.name} has {shape[axis]} rows on axis {axis}, expected {seq_len}")
        shape[axis] = grown
        meta[node] = torch.empty(shape, dtype=value.dtype, device="meta")
    decided: dict[fx.Node, tuple[int, int] | None] = {}
    furthest = 0  # the first node no choice fits, for the error

    def visit(i: int) -> bool:
        nonlocal furthest
        if i == len(nodes):
            return True
        node = nodes[i]
        furthest = max(furthest, i)
        for choice in ([choices[node]] if node in choices else _candidates(node, meta, seq_len)):
            try:
                out = _evaluate(node, meta, choice, grown)
            except Exception:  # the choice does not fit the tensor it reshapes: try the next one
                continue
            if not _grows_along_one_axis(example_value(node), out, (expected_axis or {}).get(node)):
                continue
            meta[node], decided[node] = out, choice
            if visit(i + 1):
                return True
        return False

    if not visit(0):
        raise RowReplayError(
            f"xquant cannot apply this model's RoPE code to the cached rows: the graph was traced for "
            f"{seq_len} token(s), and {_describe(nodes[furthest])} does not follow the number of rows "
            "(xquant adapts the sizes given to view/reshape only). Compile this model without the xquant "
            "backend, or report its rotary-embedding code.")
    for node, choice in decided.items():
        choices[node] = choice
        if choice is not None and node in clones:
            _set_shape_literal(clones[node], choice, rows)


def _is_symbol(node: fx.Node, symbol) -> bool:
    value = example_value(node)
    return isinstance(value, torch.SymInt) and str(value) == str(symbol)


def _describe(node: fx.Node) -> str:
    """``expand(view_4, 1, 8, 2, -1, -1)`` at the model's source line, for an error message."""
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    text = f"{name}({', '.join(str(a) for a in node.args)})"
    lines = (node.meta.get("stack_trace") or "").splitlines()
    files = [i for i, line in enumerate(lines) if line.strip().startswith("File ")]
    if files and files[-1] + 1 < len(lines):
        text += f" ({lines[files[-1]].strip()}: {lines[files[-1] + 1].strip()})"
    return text


def _as_meta(value, node: fx.Node):
    if isinstance(value, torch.Tensor):
        if any(not isinstance(s, int) for s in (*value.shape, *value.stride())):
            raise RowReplayError(f"{node.name} has a symbolic shape")
        return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta")
    if isinstance(value, (tuple, list)):  # e.g. the pieces of x.chunk(2, dim=-1)
        return type(value)(_as_meta(v, node) for v in value)
    if isinstance(value, (int, float, bool)) or value is None:
        return value
    raise RowReplayError(f"no example value recorded for {node.name}")


def _shape_literals(node: fx.Node) -> list | None:
    """The shape of ``t.view(*shape)``, ``t.reshape(shape)``, ``torch.reshape(t, shape)``."""
    is_reshape = ((node.op == "call_method" and node.target in RESHAPE_METHODS)
                  or (node.op == "call_function" and node.target is torch.reshape))
    if not is_reshape or len(node.args) < 2 or node.kwargs:
        return None
    return list(node.args[1]) if _shape_is_one_arg(node) else list(node.args[1:])


def _shape_is_one_arg(node: fx.Node) -> bool:
    return len(node.args) == 2 and isinstance(node.args[1], (tuple, list))


def _candidates(node: fx.Node, meta: dict, seq_len: int) -> list[tuple[int, int] | None]:
    """Possible (index in the shape, multiple of the token count) of the literal that stands for the
    token count; [None]: the node has no such literal."""
    shape = _shape_literals(node)
    source = node.args[0] if shape is not None else None
    if source not in meta or example_value(source) is None or not all(isinstance(s, int) for s in shape):
        return [None]
    before, after = list(example_value(source).shape), list(meta[source].shape)
    changed = [i for i, (a, b) in enumerate(zip(before, after)) if a != b]
    if not changed:
        return [None]
    leading = math.prod(before[:changed[0]])  # elements before the rows' axis: as many in the result
    traced = list(example_value(node).shape)
    found = [(j, traced[j] // seq_len) for j, size in enumerate(shape)
             if size != -1 and traced[j] % seq_len == 0 and math.prod(traced[:j]) == leading]
    # the axis at the rows' index first (a regrouping of other axes keeps it in place)
    return sorted(found, key=lambda c: c[0] != changed[0]) or [None]


def _evaluate(node: fx.Node, meta: dict, choice, grown: int):
    def value(a):
        if isinstance(a, fx.Node):
            return meta[a] if a in meta else _as_meta(example_value(a), a)
        return a

    args = list(fx.node.map_aggregate(node.args, value))
    kwargs = fx.node.map_aggregate(node.kwargs, value)
    if choice is not None:
        args = _with_literal(node, args, choice, choice[1] * grown)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    raise RowReplayError(f"cannot replay {node.op} {node.name}")


def _with_literal(node: fx.Node, args: list, choice, size) -> list:
    """``args`` with the shape literal ``choice`` points at replaced by ``size``."""
    shape = _shape_literals(node)
    shape[choice[0]] = size
    return [args[0], type(node.args[1])(shape)] if _shape_is_one_arg(node) else [args[0], *shape]


def _set_shape_literal(clone: fx.Node, choice, rows) -> None:
    multiple = choice[1]
    if multiple == 1 or isinstance(rows, int):
        size = rows if multiple == 1 else rows * multiple
    else:
        with clone.graph.inserting_before(clone):
            size = clone.graph.call_function(operator.mul, (rows, multiple))
    clone.args = tuple(_with_literal(clone, list(clone.args), choice, size))


def _grows_along_one_axis(traced, out, axis: int | None) -> bool:
    """``out`` is ``traced`` with at most one axis grown by the sentinel factor (on ``axis`` if given)."""
    if isinstance(traced, (tuple, list)) and isinstance(out, (tuple, list)):
        return len(traced) == len(out) and all(_grows_along_one_axis(t, o, None) for t, o in zip(traced, out))
    if not isinstance(traced, torch.Tensor):
        return not isinstance(out, torch.Tensor)
    if not isinstance(out, torch.Tensor) or out.dim() != traced.dim():
        return False
    diff = [i for i, (a, b) in enumerate(zip(traced.shape, out.shape)) if a != b]
    if not diff:
        return axis is None
    return (len(diff) == 1 and out.shape[diff[0]] == traced.shape[diff[0]] * SENTINEL_FACTOR
            and axis in (None, diff[0]))
