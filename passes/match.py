"""Find each attention layer's K/V projection -> heads -> RoPE -> cache append in a Dynamo graph.

A *site* is one layer: the post-norm input X, the K and V projections of X, the per-head reshape,
the RoPE region of the keys (if any), and the two in-place appends into the layer's K and V cache
tensors. Anything that does not fit is reported with the reason and left untouched.

How appends look differs between caches; each form is one entry of ``APPEND_FORMS`` (data, not
code paths), so another cache layout is a new entry, not a copy of the matcher.
"""

from __future__ import annotations

import dataclasses
import operator
import re
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import fx

from xq_compile._torch_private import dynamo_source_name, example_value
from xq_compile.fused_rows import FusedRows

# Dynamo records F.linear calls with the target it prints as torch._C._nn.linear: F.linear is that
# very function object (likewise F.scaled_dot_product_attention below), so no private name is needed.
LINEAR_TARGETS = (F.linear,)

# Ops that only regroup a projection's output into heads: [B, S, H*D] -> [B, H, S, D].
SHAPE_METHODS = {"view", "reshape", "transpose", "permute", "contiguous", "unflatten"}
SHAPE_FUNCTIONS = {torch.reshape, torch.transpose, torch.permute, torch.unflatten}
# Ops that repeat K/V heads for the query heads (as attention may, after the cache), as methods or functions.
HEAD_REPEATS = {"expand", "broadcast_to", "repeat", "repeat_interleave", torch.broadcast_to, torch.repeat_interleave}
# Of the shape ops, the ones that can split the last axis into heads.
RESHAPE_METHODS = {"view", "reshape", "unflatten"}
RESHAPE_FUNCTIONS = {torch.reshape, torch.unflatten}


def is_call(node: fx.Node, *, methods: Iterable[str] = (), functions: Iterable[Callable] = ()) -> bool:
    if node.op == "call_method":
        return node.target in set(methods)
    if node.op == "call_function":
        return node.target in set(functions)
    return False


@dataclasses.dataclass(frozen=True)
class LinearCall:
    """One projection ``x·Wᵀ + b`` as Dynamo recorded it."""

    output: fx.Node
    input: fx.Node
    weight: fx.Node
    bias: fx.Node | None
    nodes: tuple[fx.Node, ...]   # the call's own nodes, input to output
    weight_transposed: bool      # the weight is stored [in, out] (transformers' Conv1D)


def linear_call(node: fx.Node) -> LinearCall | None:
    """The projection whose output ``node`` is: ``F.linear(x, W, b)``; ``x @ W.T`` (+ ``b``), as Falcon's
    ``FalconLinear`` computes it; or transformers' ``Conv1D`` (GPT-2) ``addmm(b, x.view(-1, d), W).view(...)``
    with W stored [d, out]; else None."""
    if node.op == "call_function" and node.target in LINEAR_TARGETS:
        return LinearCall(node, _arg(node, 0, "input"), _arg(node, 1, "weight"), _arg(node, 2, "bias"), (node,),
                          weight_transposed=False)
    return _matmul_by_transposed_weight(node) or _conv1d(node)


def _matmul_by_transposed_weight(node: fx.Node) -> LinearCall | None:
    """``x @ W.T`` or ``x @ W.T + b`` (W [out, in], b [out]) ending at ``node``."""
    bias = b_value = None
    if (node.op == "call_function" and node.target in (operator.add, torch.add) and len(node.args) == 2
            and not node.kwargs):  # (torch.add's alpha would scale the bias)
        product, bias = node.args
        b_value = example_value(bias) if isinstance(bias, fx.Node) else None
        if not isinstance(product, fx.Node) or b_value is None or b_value.dim() != 1:
            return None
    else:
        product = node
    if (product.op != "call_function" or product.target not in (operator.matmul, torch.matmul)
            or len(product.args) != 2 or not all(isinstance(a, fx.Node) for a in product.args)):
        return None
    x, transposed = product.args
    is_t = ((transposed.op == "call_function" and transposed.target is getattr and transposed.args[1] in ("T", "mT"))
            or is_call(transposed, methods={"t"}, functions={torch.t}))
    weight = transposed.args[0] if is_t else None
    if not isinstance(weight, fx.Node) or weight.op != "placeholder":  # a parameter, not some other product
        return None
    w_value, x_value = (example_value(n) if isinstance(n, fx.Node) else None for n in (weight, x))
    if w_value is None or x_value is None or w_value.dim() != 2 or x_value.dim() < 2:
        return None
    if b_value is not None and b_value.shape[0] != w_value.shape[0]:
        return None
    nodes = (transposed, product) + ((node,) if bias is not None else ())
    return LinearCall(node, x, weight, bias, nodes, weight_transposed=False)


def _conv1d(node: fx.Node) -> LinearCall | None:
    """transformers' ``Conv1D`` (GPT-2): ``addmm(b, x.view(-1, d), W).view(*x.shape[:-1], out)``, W [d, out]."""
    reshapes = dict(methods=RESHAPE_METHODS, functions=RESHAPE_FUNCTIONS)
    mm = node.args[0] if is_call(node, **reshapes) else None
    # addmm(bias, x, W, beta=.., alpha=..) scales its terms: not x·W + b
    if (not isinstance(mm, fx.Node) or mm.op != "call_function" or mm.target is not torch.addmm or mm.kwargs
            or len(mm.args) != 3 or not all(isinstance(n, fx.Node) for n in mm.args)):
        return None
    bias, flat, weight = mm.args
    if not is_call(flat, **reshapes):
        return None
    x = flat.args[0]
    values = [example_value(n) if isinstance(n, fx.Node) else None for n in (x, flat, bias, weight, node)]
    if any(not isinstance(v, torch.Tensor) for v in values):
        return None
    x_value, flat_value, b_value, w_value, out_value = values
    # x's tokens flattened into rows, projected, unflattened again: one projection per token
    if (x_value.dim() < 2 or flat_value.dim() != 2 or out_value.dim() != x_value.dim() or b_value.dim() != 1
            or flat_value.shape[-1] != x_value.shape[-1] or out_value.shape[-1] != w_value.shape[-1]):
        return None
    return LinearCall(node, x, weight, bias, (flat, mm, node), weight_transposed=True)


def is_linear(node: fx.Node) -> bool:
    return linear_call(node) is not None


def _arg(node: fx.Node, index: int, name: str):
    return node.args[index] if len(node.args) > index else node.kwargs.get(name)


@dataclasses.dataclass(frozen=True)
class Append:
    """One in-place write of new key or value states into a cache tensor."""

    node: fx.Node        # the write itself
    cache: fx.Node       # the cache tensor written into ([B, H, L, D])
    index: fx.Node       # the cache positions written ([S] int)
    value: fx.Node       # the new states ([B, H, S, D])
    seq_dim: int


@dataclasses.dataclass(frozen=True)
class AppendForm:
    """How one kind of cache append appears in a Dynamo graph."""

    name: str
    match: Callable[[fx.Node], Append | None]


def _match_index_copy(node: fx.Node) -> Append | None:
    # transformers StaticCache: keys.index_copy_(2, cache_position, key_states)
    if node.op != "call_method" or node.target != "index_copy_":
        return None
    cache, dim, index, value = (_arg(node, i, n) for i, n in enumerate(("self", "dim", "index", "source")))
    if not all(isinstance(x, fx.Node) for x in (cache, index, value)) or not isinstance(dim, int):
        return None
    return Append(node=node, cache=cache, index=index, value=value, seq_dim=dim)


def _match_setitem(node: fx.Node) -> Append | None:
    # a cache kept as module buffers (gpt-fast style): k_cache[:, :, input_pos] = k
    if node.op != "call_function" or node.target is not operator.setitem or len(node.args) != 3:
        return None
    cache, index, value = node.args
    if not isinstance(cache, fx.Node) or not isinstance(value, fx.Node) or not isinstance(index, tuple):
        return None
    tensor_dims = [i for i, item in enumerate(index) if isinstance(item, fx.Node)]
    if len(tensor_dims) != 1 or any(item != slice(None) for i, item in enumerate(index) if i != tensor_dims[0]):
        return None
    return Append(node=node, cache=cache, index=index[tensor_dims[0]], value=value, seq_dim=tensor_dims[0])


APPEND_FORMS: list[AppendForm] = [
    AppendForm("index_copy_", _match_index_copy),
    AppendForm("setitem", _match_setitem),
]


def growing_cache_appends(graph: fx.Graph) -> list[fx.Node]:
    """Appends by concatenation (transformers' DynamicCache: keys = cat([keys, k], dim=-2)).

    Not rewritable: the cache is a new, longer tensor every step. Found only to say so clearly.
    """
    found = []
    for node in graph.nodes:
        if node.op == "call_function" and node.target is torch.cat and node.args and len(node.args[0]) == 2:
            first = node.args[0][0]
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            if (isinstance(first, fx.Node) and first.op == "placeholder" and dim in (-2, 2)
                    and re.search(r"\b(keys|values)\b|key_cache|value_cache", source_name(first))):
                found.append(node)
    return found


@dataclasses.dataclass
class Projection:
    """x -> linear(x, weight, bias) [-> channel slice] -> heads -> (RoPE, norms...) -> appended value."""

    call: LinearCall
    channels: FusedRows | None    # the rows of a fused projection (Phi-3's qkv_proj, GPT-NeoX's per head) or
                                  # of a weight stored transposed (GPT-2's Conv1D); None: the whole weight
    heads: fx.Node                # the states where the per-token region (RoPE, norms) starts
    layout: str                   # of ``heads``: one of LAYOUTS
    rope: list[fx.Node]           # descendants of ``heads`` that feed the appended value
    append: Append

    @property
    def linear(self) -> fx.Node:
        """The projection's output."""
        return self.call.output

    @property
    def weight(self) -> fx.Node:
        return self.call.weight

    @property
    def bias(self) -> fx.Node | None:
        return self.call.bias

    @property
    def rows_axis(self) -> int:
        """The axis of ``heads`` that holds the tokens (the cached rows, when rebuilt)."""
        return 2 if self.layout == "[B, H, S, D]" else 1


# How the states are laid out where the per-token region starts:
# - "[B, H, S, D]": split into heads and transposed (Llama: RoPE after `.view(...).transpose(1, 2)`);
# - "[B, S, H, D]": split into heads only (Qwen3: the per-head k_norm comes before the transpose);
# - "[B, S, H·D]": the projection's output itself (OLMo 2/3: k_norm over all heads at once, then the split;
#   the model's own code in the region splits the rebuilt rows into heads).
LAYOUTS = ("[B, H, S, D]", "[B, S, H, D]", "[B, S, H·D]")


@dataclasses.dataclass
class Site:
    """One layer's K/V projection and cache append, ready to rewrite."""

    layer: int
    x: fx.Node
    key: Projection
    value: Projection
    position_source: fx.Node | None   # integer position ids [b, S] that the RoPE tables derive from
    rope_inputs: list[fx.Node]        # the cos/sin-like nodes the RoPE region reads besides the keys
    num_heads: int
    head_dim: int
    seq_len: object                   # int, or a SymInt for a dynamic-shape graph


@dataclasses.dataclass
class SiteReport:
    """What happened at one site: shown by explain() and the backend's log."""

    layer: int | None
    status: str          # "rewritten", "skipped", or "kept" (left as the model wrote it by design: reason says why)
    reason: str = ""
    form: str = "X"

    def __str__(self) -> str:
        where = f"layer {self.layer}" if self.layer is not None else "site"
        return f"{where}: {self.status}" + (f" ({self.form})" if self.status == "rewritten" else f": {self.reason}")


class SkipSite(Exception):
    """Raised while matching a site that cannot be rewritten; the message is the user-facing reason."""


def _ancestors(node: fx.Node, stop: Callable[[fx.Node], bool]) -> set[fx.Node]:
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n is not node and stop(n):
            continue
        todo.extend(n.all_input_nodes)
    return seen


def _descendants(node: fx.Node) -> set[fx.Node]:
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(n.users)
    return seen


def _projection(append: Append) -> Projection:
    calls = [c for c in map(linear_call, _ancestors(append.value, stop=is_linear)) if c is not None]
    if len(calls) != 1:
        raise SkipSite(f"the appended states come from {len(calls)} projections, expected exactly one linear")
    call = calls[0]
    linear = call.output
    one_head = _one_head_axis(linear, append)
    start = one_head or linear
    channels = _channel_slice(start, append)
    if channels is not None:
        start, (first, stop) = channels
        channels = FusedRows(first, stop)
    heads, transposed = _follow_shape_ops(start, append)
    if one_head is not None:
        transposed = True  # [B, 1, S, ...]: the heads axis before the tokens
    per_head = _rows_in_every_head(start, heads, append) if channels is None and heads is not start else None
    if per_head is not None:
        piece, channels = per_head
        heads, more_transposed = _follow_shape_ops(piece, append)
        transposed |= more_transposed
    written = _written_in_place(linear, append)
    if written is not None:
        raise SkipSite(f"the projected states are modified in place on their way to the cache ({written}, e.g. "
                       "OLMo's clip_qkv): a rebuild from X would miss it")
    between = _descendants(heads) & _ancestors(append.value, stop=lambda n: False)
    rope = [n for n in heads.graph.nodes if n in between and n is not heads]
    if heads is not start or one_head is not None:
        layout = "[B, H, S, D]" if transposed else "[B, S, H, D]"
    elif any(is_call(n, methods=RESHAPE_METHODS, functions=RESHAPE_FUNCTIONS) for n in rope):
        layout = "[B, S, H·D]"  # per-token ops over all heads before the split (OLMo 2's k_norm)
    else:
        raise SkipSite("no per-head reshape between the projection and the cache append")
    if call.weight_transposed:
        channels = dataclasses.replace(channels or FusedRows(0, int(example_value(linear).shape[-1])),
                                       weight_transposed=True)
    return Projection(call=call, channels=channels, heads=heads, layout=layout, rope=rope, append=append)


# In-place ops that Dynamo records as functions (``x += y``, ``x[i] = y``); methods are those named ``*_``.
IN_PLACE_FUNCTIONS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.setitem}


def writes_in_place(user: fx.Node, node: fx.Node) -> bool:
    """Whether ``user`` writes into ``node`` in place: ``node.clamp_(..)``, ``node += x``, ``node[i] = x``.
    Dynamo's graphs keep such ops as they are written."""
    if not user.args or user.args[0] is not node:
        return False
    if user.op == "call_method":
        return user.target.endswith("_") and not user.target.startswith("_")
    return user.op == "call_function" and user.target in IN_PLACE_FUNCTIONS


def _written_in_place(linear: fx.Node, append: Append) -> str | None:
    """An in-place op (``clamp_``, ``mul_``, ``x[...] = ...``) on a tensor between the projection and the
    append, which the rewrite would not replay (its result is not on the path, only its side effect): its
    name, or None."""
    path = (_descendants(linear) & _ancestors(append.value, stop=lambda n: False)) | {linear}
    for node in path:
        for user in node.users:
            if user is not append.node and writes_in_place(user, node):
                return user.target if isinstance(user.target, str) else user.target.__name__
    return None


def _follow_shape_ops(node: fx.Node, append: Append) -> tuple[fx.Node, bool]:
    """Follow the head reshape (view/transpose...) from ``node`` towards the append: (the last shape op, or
    ``node`` if none; whether the ops transposed)."""
    transposed = False
    while True:
        nxt = [u for u in node.users if is_call(u, methods=SHAPE_METHODS, functions=SHAPE_FUNCTIONS)
               and append.value in _descendants(u)]
        if len(nxt) != 1:
            return node, transposed
        node = nxt[0]
        transposed |= is_call(node, methods={"transpose", "permute"}, functions={torch.transpose, torch.permute})


def _one_head_axis(linear: fx.Node, append: Append) -> fx.Node | None:
    """GPTBigCode's multi-query ``c_attn(x).unsqueeze(1).split((d, kv, kv), dim=3)``: the projection's output
    [B, S, N] given a heads axis of one before the tokens, [B, 1, S, N], on its way to the append; or None."""
    leading = [u for u in linear.users if append.value in _descendants(u)]
    if len(leading) != 1 or not is_call(leading[0], methods={"unsqueeze"}, functions={torch.unsqueeze}):
        return None
    unsqueeze = leading[0]
    value = example_value(unsqueeze)
    dim = _arg(unsqueeze, 1, "dim")
    if not isinstance(value, torch.Tensor) or value.dim() != 4 or dim not in (1, -4):
        return None
    return unsqueeze


def _rows_in_every_head(projected: fx.Node, heads: fx.Node, append: Append) -> tuple[fx.Node, FusedRows] | None:
    """GPT-NeoX: a fused q/k/v projection split into heads of [q_h, k_h, v_h] first, then each head's channels
    sliced (``qkv.chunk(3, dim=-1)``); or split into groups, some of them taken (``_heads_picked``): (the
    slice, its rows: one block in every head (group) of the weight), or None."""
    period = _heads_of_fused_rows(projected, heads)
    leading = [u for u in heads.users if append.value in _descendants(u)]
    if period and len(leading) == 1:
        picked = _heads_picked(leading[0], projected, period)
        if picked is not None:
            return leading[0], picked
    # the slice must carry all that reaches the append (unlike RoPE's x[..., :D/2], one of several readers)
    piece = _channel_slice(heads, append) if period and len(leading) == 1 else None
    if piece is None:
        return None
    if (is_call(leading[0], methods={"split", "chunk"}, functions={torch.split, torch.chunk})
            and sum(append.value in _descendants(u) for u in leading[0].users) > 1):
        return None  # several pieces of one split reach the append
    piece, (first, stop) = piece
    return piece, FusedRows(first, stop, period)


def _heads_picked(getitem: fx.Node, projected: fx.Node, group: int) -> FusedRows | None:
    """Falcon, Persimmon: a fused projection split into groups of ``group`` channels ([..., A, group]), then
    some of the A groups taken on axis -2 (``qkv[..., [-2], :]``: Falcon-7B's one key head among its H + 2;
    ``qkv[..., 1, :]`` of [B, S, H, 3, D]: every head's key block): their rows, or None."""
    if getitem.op != "call_function" or getitem.target is not operator.getitem:
        return None
    index = getitem.args[1] if isinstance(getitem.args[1], tuple) else (getitem.args[1],)
    whole = example_value(getitem.args[0])
    if (not isinstance(whole, torch.Tensor) or len(index) < 2 or index[-1] != slice(None)
            or any(i is not Ellipsis and i != slice(None) for i in index[:-2])
            or (Ellipsis not in index[:-2] and len(index) != whole.dim())):
        return None
    count, pick = int(whole.shape[-2]), index[-2]
    if isinstance(pick, int):
        picked = [pick % count]
    elif isinstance(pick, list) and pick and all(isinstance(i, int) for i in pick):
        picked = [i % count for i in pick]
    elif isinstance(pick, slice) and pick.step in (None, 1):
        picked = list(range(*pick.indices(count)))
    else:
        return None
    if not picked or picked != list(range(picked[0], picked[-1] + 1)):
        return None  # not one run of consecutive groups, in order
    if example_value(getitem).dim() != 4:
        return None  # no heads axis left next to the tokens (an integer index of [B, S, H + 2, D])
    width = int(example_value(projected).shape[-1])
    period = count * group if count * group < width else None
    return FusedRows(picked[0] * group, (picked[-1] + 1) * group, period)


def _heads_of_fused_rows(projected: fx.Node, heads: fx.Node) -> int | None:
    """``heads``' last axis size G where ``heads`` only regroups ``projected`` [B, S, H·G] into heads of G
    channels, keeping each head's G channels on its last axis (so channel c of head h is row h·G + c of the
    projection): else None."""
    out, grouped = example_value(projected), example_value(heads)
    if not isinstance(out, torch.Tensor) or not isinstance(grouped, torch.Tensor) or grouped.dim() < 2:
        return None
    width, period = int(out.shape[-1]), int(grouped.shape[-1])
    if period >= width or width % period or grouped.numel() != out.numel():
        return None
    node = heads
    while node is not projected:  # only shape ops, by construction; none may move the last axis
        value = example_value(node)
        if is_call(node, methods={"transpose"}, functions={torch.transpose}):
            if any(d in (-1, value.dim() - 1) for d in node.args[1:3]):
                return None
        elif is_call(node, methods={"permute"}, functions={torch.permute}):
            dims = node.args[1] if isinstance(node.args[1], (tuple, list)) else node.args[1:]
            if dims[-1] not in (-1, value.dim() - 1):
                return None
        elif value.shape[-1] != period:  # a reshape/view must have split the channels into (.., H, G) last
            return None
        node = node.args[0]
    return period


def _channel_slice(linear: fx.Node, append: Append) -> tuple[fx.Node, tuple[int, int]] | None:
    """A fused projection's output (or its heads') sliced on its last dim on the way to the append:
    ``qkv[..., a:b]`` (Phi-3), or one piece of ``qkv.split([dq, dk, dv], dim=-1)`` (gpt-fast's ``wqkv``)
    or of ``qkv.chunk(3, dim=-1)`` (GPT-NeoX, per head)."""
    out = example_value(linear)
    for user in linear.users:
        piece = _split_piece(user, append, out)
        if piece is not None:
            return piece
        if (user.op == "call_function" and user.target is operator.getitem and append.value in _descendants(user)
                and out is not None):
            index = user.args[1]
            index = index if isinstance(index, tuple) else (index,)
            last = index[-1]
            leading_ok = all(i is Ellipsis or i == slice(None) for i in index[:-1])
            if isinstance(last, slice) and last.step in (None, 1) and leading_ok:
                start, stop, _ = last.indices(int(out.shape[-1]))
                return user, (start, stop)
    return None


def _split_piece(split: fx.Node, append: Append, out) -> tuple[fx.Node, tuple[int, int]] | None:
    """``split(sizes, dim=-1)[i]`` or ``chunk(n, dim=-1)[i]`` of a projection's output [..., C] feeding the
    append: (that getitem, its channels)."""
    if out is None or not is_call(split, methods={"split", "chunk"}, functions={torch.split, torch.chunk}):
        return None
    width = int(out.shape[-1])
    if split.target in ("chunk", torch.chunk):
        chunks, dim = _arg(split, 1, "chunks"), _arg(split, 2, "dim") or 0
        sizes = -(-width // chunks) if isinstance(chunks, int) and chunks > 0 else None  # torch.chunk's sizes
    else:
        sizes = _arg(split, 1, "split_size" if split.op == "call_method" else "split_size_or_sections")
        dim = _arg(split, 2, "dim") or 0
    if dim not in (-1, out.dim() - 1):
        return None
    if isinstance(sizes, int):
        sizes = [min(sizes, width - start) for start in range(0, width, sizes)]
    if not isinstance(sizes, (list, tuple)) or not all(isinstance(s, int) for s in sizes):
        return None
    for piece in split.users:
        if (piece.op == "call_function" and piece.target is operator.getitem and isinstance(piece.args[1], int)
                and append.value in _descendants(piece)):
            i = piece.args[1] % len(sizes)
            return piece, (sum(sizes[:i]), sum(sizes[:i + 1]))
    return None


def _rope_inputs(proj: Projection) -> list[fx.Node]:
    region = set(proj.rope) | {proj.heads}
    inputs = []
    for n in proj.rope:
        for a in n.all_input_nodes:
            if a not in region and a not in inputs:
                inputs.append(a)
    return inputs


def _position_source(rope_inputs: list[fx.Node], batch: int, seq_len) -> fx.Node | None:
    """The integer position ids the RoPE tables are computed from: [b, S] (b in {1, B}), or [S]."""
    candidates = set()
    for inp in rope_inputs:
        candidates |= _ancestors(inp, stop=lambda n: False)
    best = None
    for n in candidates:
        v = example_value(n)
        is_ids = isinstance(v, torch.Tensor) and not v.dtype.is_floating_point and v.dtype != torch.bool
        per_row = is_ids and v.dim() == 2 and v.shape[0] in (1, batch) and v.shape[1] == seq_len
        shared = is_ids and v.dim() == 1 and v.shape[0] == seq_len  # one position per token for all rows
        if per_row or shared:
            if best is None or _position(n) > _position(best):
                best = n
    return best


def _same_for_every_token(node: fx.Node) -> bool:
    """A scalar, or a tensor of at most one axis longer than 1, the last (a norm's weight [D]): a region input
    that reads the same for every token, unlike a RoPE table ([.., S, D]; S = 1 in a decode step, so it is
    the shape, not the values, that tells)."""
    value = example_value(node)
    if not isinstance(value, torch.Tensor):
        return isinstance(value, (int, float, bool))
    return all(size == 1 for size in value.shape[:-1])


def _position(node: fx.Node) -> int:
    for i, n in enumerate(node.graph.nodes):
        if n is node:
            return i
    raise ValueError(node)


_LAYER_IN_SOURCE = re.compile(r"layers\[(\d+)\]|layers_(\d+)_")


def source_name(node: fx.Node) -> str:
    """Dynamo's name for where a placeholder comes from, else the node's name (which Dynamo derives from it)."""
    return dynamo_source_name(node) or node.name


def _which_source(cache: fx.Node) -> str | None:
    """'keys' or 'values' from a cache tensor's Dynamo source (cache.layers[3].keys, ...k_cache)."""
    name = source_name(cache)
    for kind, pattern in (("keys", r"\bkeys\b|_keys$|\.keys$|k_cache|key_cache"),
                          ("values", r"\bvalues\b|_values$|\.values$|v_cache|value_cache")):
        if re.search(pattern, name):
            return kind
    return None


def _which(append: Append) -> str | None:
    return _which_source(append.cache)


def layer_from_source(node: fx.Node) -> int | None:
    match = _LAYER_IN_SOURCE.search(source_name(node))
    return int(next(g for g in match.groups() if g is not None)) if match else None


def find_appends(graph: fx.Graph) -> list[Append]:
    found = []
    for node in graph.nodes:
        for form in APPEND_FORMS:
            append = form.match(node)
            if append is not None:
                found.append(append)
                break
    return found


def find_sites(graph: fx.Graph) -> tuple[list[Site], list[SiteReport]]:
    """Group the graph's cache appends into per-layer sites; report the ones that don't fit."""
    appends = find_appends(graph)
    by_x: dict[fx.Node, list[tuple[Append, Projection]]] = {}
    reports: list[SiteReport] = [
        SiteReport(layer_from_source(cat.args[0][0]), "skipped",
                   "the cache grows by torch.cat every step (transformers' DynamicCache): X caching needs a "
                   "fixed-size cache; pass cache=xq.XQuantCache(...)")
        for cat in growing_cache_appends(graph) if _which_source(cat.args[0][0]) == "keys"
    ]
    for append in appends:
        try:
            proj = _projection(append)
        except SkipSite as why:
            reports.append(SiteReport(layer_from_source(append.cache), "skipped", str(why)))
            continue
        x = proj.call.input
        by_x.setdefault(x, []).append((append, proj))

    sites = []
    already_reported = {r.layer for r in reports if r.layer is not None}
    for order, (x, group) in enumerate(by_x.items()):
        layer = layer_from_source(group[0][0].cache)
        if len(group) == 1 and layer in already_reported:
            continue  # the other append of this layer was skipped: its reason is the layer's reason
        layer = order if layer is None else layer
        try:
            sites.append(_site(x, group, layer))
        except SkipSite as why:
            reports.append(SiteReport(layer, "skipped", str(why)))
    return sites, reports


def _site(x: fx.Node, group: list[tuple[Append, Projection]], layer: int) -> Site:
    if len(group) != 2:
        raise SkipSite(f"expected one key and one value append fed by the same input, found {len(group)}")
    kinds = [_which(a) for a, _ in group]
    if set(kinds) == {"keys", "values"}:
        key, value = (p for _, p in sorted(group, key=lambda ap: _which(ap[0]) != "keys"))
    else:  # no names to go by: values never carry RoPE
        with_rope = [p for _, p in group if p.rope]
        if len(with_rope) != 1:
            raise SkipSite("cannot tell the key append from the value append")
        key = with_rope[0]
        value = next(p for _, p in group if p is not key)
    for proj in (key, value):
        if any(is_call(n, methods=HEAD_REPEATS, functions=HEAD_REPEATS) for n in proj.rope):
            raise SkipSite("the K/V heads are repeated for the query heads before the cache (e.g. Falcon's "
                           "new_decoder_architecture), which then holds copies of each head")
    if value.rope:
        raise SkipSite("the value states are transformed between projection and cache (only keys may carry RoPE)")
    for proj in (key, value):
        if proj.append.seq_dim != 2:
            raise SkipSite(f"cache append along dim {proj.append.seq_dim}; expected [batch, heads, seq, head_dim] dim 2")
        if not isinstance(proj.weight, fx.Node) or (proj.bias is not None and not isinstance(proj.bias, fx.Node)):
            raise SkipSite("projection weight/bias are not graph inputs")
    written = example_value(key.append.value)
    cache = example_value(key.append.cache)
    if written is None or cache is None or written.dim() != 4 or cache.dim() != 4:
        raise SkipSite("the appended key states are not [batch, heads, seq, head_dim] tensors")
    batch, num_heads, seq_len, head_dim = written.shape
    rope_inputs = _rope_inputs(key)
    position_source = None
    if rope_inputs:
        position_source = _position_source(rope_inputs, batch, seq_len)
        if position_source is None:
            tables_are_inputs = any(n.op == "placeholder" and example_value(n) is not None
                                    and example_value(n).dtype.is_floating_point and example_value(n).dim() >= 3
                                    for i in rope_inputs for n in _ancestors(i, stop=lambda n: False))
            if tables_are_inputs:
                raise SkipSite("the keys' RoPE cos/sin are inputs of this graph, not computed from position ids "
                               "in it: the model was split by a graph break; compile with fullgraph=True")
            if not all(_same_for_every_token(i) for i in rope_inputs):
                raise SkipSite("the keys' RoPE tables do not derive from a [batch, seq] integer position tensor")
            # else no RoPE, only per-token ops with per-feature weights: a k_norm (EXAONE 4's global layers)
    if key.append.index is not value.append.index:
        # The rewrite stores one X row per position, written at the key's positions.
        raise SkipSite("key and value are written at different positions")
    return Site(layer=layer, x=x, key=key, value=value, position_source=position_source,
                rope_inputs=rope_inputs, num_heads=int(num_heads), head_dim=int(head_dim), seq_len=seq_len)


SDPA_TARGETS = (F.scaled_dot_product_attention,)
# What transformers' repeat_kv does between the cache and attention: [B, Hkv, L, D] -> [B, Hq, L, D].
READ_METHODS = {"expand", "reshape", "view", "contiguous", "unsqueeze"}


@dataclasses.dataclass
class AttentionRead:
    """The one SDPA call reading a layer's K and V cache (possibly through repeat_kv)."""

    sdpa: fx.Node
    chains: list[fx.Node]        # the repeat_kv nodes between the caches and the SDPA call
    query_heads: int
    seq_len: int | object
    head_dim: int
    mask: fx.Node | None
    mask_in_args: bool           # attn_mask passed positionally (args[3]) rather than by keyword


def _is_head_repeat(node: fx.Node) -> bool:
    """gpt-fast's GQA expansion ``k.repeat_interleave(n_head // n_local_heads, dim=1)``: repeat_kv's order."""
    return (node.op == "call_method" and node.target == "repeat_interleave" and len(node.args) == 2
            and isinstance(node.args[1], int) and node.kwargs.get("dim") == 1 and len(node.kwargs) == 1)


def _is_read_step(node: fx.Node) -> bool:
    return (is_call(node, methods=READ_METHODS) or _is_head_repeat(node)
            or (node.op == "call_function" and node.target is operator.getitem))


def _read_chain_end(node: fx.Node, chain: list[fx.Node]) -> fx.Node:
    while len(node.users) == 1:
        user = next(iter(node.users))
        if not _is_read_step(user):
            break
        chain.append(user)
        node = user
    return node


def attention_read(site: Site, max_cache_len: int) -> AttentionRead | None:
    """The SDPA call that alone reads this site's K and V caches after the append, or None.

    Only then may the rebuilt K/V keep just the n cached rows (attention over n, the mask cut to n):
    any other reader would expect max_cache_len rows.
    """
    found = {}
    for role, proj in (("key", site.key), ("value", site.value)):
        order = {n: i for i, n in enumerate(proj.append.node.graph.nodes)}
        readers = [u for u in proj.append.cache.users
                   if u is not proj.append.node and order[u] > order[proj.append.node]]
        readers += list(proj.append.node.users)
        if len(readers) != 1:
            return None
        chain = [] if readers[0].op == "call_function" and readers[0].target in SDPA_TARGETS else [readers[0]]
        if chain and not _is_read_step(readers[0]):
            return None  # the cache is transformed before attention: keep the cache-shaped rebuild
        end = _read_chain_end(readers[0], chain) if chain else proj.append.cache
        sdpa = next(iter(end.users)) if chain and len(end.users) == 1 else readers[0]
        if sdpa.op != "call_function" or sdpa.target not in SDPA_TARGETS:
            return None
        position = 1 if role == "key" else 2
        if _arg(sdpa, position, role) is not end:
            return None
        found[role] = (sdpa, chain)
    (sdpa, k_chain), (v_sdpa, v_chain) = found["key"], found["value"]
    if sdpa is not v_sdpa or _arg(sdpa, 5, "is_causal") or (_arg(sdpa, 4, "dropout_p") or 0.0) != 0.0:
        return None
    mask = _arg(sdpa, 3, "attn_mask")
    mask_value = example_value(mask) if isinstance(mask, fx.Node) else None
    if mask is not None and (mask_value is None or mask_value.shape[-1] != max_cache_len):
        return None
    query = example_value(_arg(sdpa, 0, "query"))
    if query is None:
        return None
    return AttentionRead(sdpa=sdpa, chains=k_chain + v_chain, query_heads=int(query.shape[1]),
                         seq_len=query.shape[2], head_dim=int(query.shape[3]), mask=mask,
                         mask_in_args=len(sdpa.args) > 3)
