"""RoPE at the cached rows: the model's own RoPE code, cloned to rotate rebuilt keys at the positions
each cached row was written with (so any RoPE variant the model computes is reproduced exactly); and
:func:`default_rope`, which recognizes transformers' default rotary embedding so that the fused
decode-attention kernel can compute its cos/sin from the positions instead of reading tables."""

from __future__ import annotations

import operator
from typing import NamedTuple

import torch
from torch import fx

from .emit import clone_region
from .graph_state import GraphState
from .match import Site, _ancestors, _arg, _descendants, example_value, is_call, writes_in_place
from .rows import fit_to_rows


def rope_at_cached_rows(state: GraphState, site: Site, roots, rows, per_layer=(), replace=None,
                        cloned: dict | None = None) -> dict:
    """Clone the model's RoPE table code feeding ``roots`` with the cached rows' positions, at the
    insertion point (``cloned``, by default ``state.rope_tables``, maps the position source to them
    already). The tables are cloned once per graph and set of rows, and shared by the layers that
    share them in the model; ``per_layer`` nodes (a layer's norm and rotation region) are cloned every
    time. ``rows``: how many rows the clones compute (an int, or the node of the data-dependent
    length). Returns the node mapping."""
    cloned = state.rope_tables if cloned is None else cloned
    source = site.position_source  # None: no RoPE, only per-token ops such as a k_norm
    tables = set() if source is None else (
        (_descendants(source) - {source}) & set().union(*(_ancestors(i, lambda _: False) for i in roots)))
    per_layer = set(per_layer)
    region = [nd for nd in state.graph.nodes if (nd in tables and nd not in cloned) or nd in per_layer]
    mapping = clone_region(state.graph, region, {**cloned, **(replace or {})})
    cloned.update({nd: mapping[nd] for nd in tables if nd in mapping})
    # The code was traced for this call's tokens: sizes it read off them (gpt-fast: freqs_cis.view(1,
    # x.size(1), ...)) are literals or the token-count symbol, and must follow the rows instead.
    inputs = {} if source is None else {source: example_value(source).dim() - 1}
    if site.key.heads in (replace or {}):
        inputs[site.key.heads] = site.key.rows_axis
    fit_to_rows([nd for nd in state.graph.nodes if nd in tables or nd in per_layer],
                {nd: mapping[nd] for nd in region}, inputs, site.seq_len, rows, state.row_choices,
                {site.key.append.value: 2} if per_layer else None)
    return mapping


class DefaultRope(NamedTuple):
    """transformers' default rotary embedding, found in a graph: its tables are
    ``cos/sin(cat(f, f)) · scaling`` with ``f = positions · inv_freq`` (fp32), rounded to the model dtype."""

    positions: fx.Node  # the integer position ids the angles are computed from (the site's position source)
    inv_freq: fx.Node   # the rotary module's inv_freq buffer (a graph input), [D/2]
    scaling: float      # attention_scaling (1.0 for the default type; YaRN's mscale; ...)


def default_rope(cos: fx.Node, sin: fx.Node, position_source: fx.Node | None, head_dim: int) -> DefaultRope | str:
    """Whether the tables ``cos`` and ``sin`` (what the keys' RoPE reads) are exactly transformers' default
    rotary embedding of ``position_source``: a :class:`DefaultRope`, else why not (a sentence).

    Matched structurally, in the two forms transformers writes ``RotaryEmbedding.forward``:

    * 5.19 and later:  ``freqs = position_ids[..., None].float() * inv_freq.to(device, float32)``
    * 5.17:            ``freqs = (inv_freq[None, :, None].expand(b, -1, 1).to(float32) @
                                  position_ids[:, None, :].float()).transpose(1, 2)``
      (a matmul over one term: each angle is the same single fp32 product)

    then ``emb = cat((freqs, freqs), -1)``, ``cos = emb.cos() * attention_scaling`` (sin alike) and
    ``cos.to(x.dtype)``, plus the shape ops that reach the keys (``unsqueeze``). Anything between them
    that changes values (a position offset or division, another table layout, a frequency update in
    the graph as dynamic and longrope RoPE do) is no match. Whatever computes inv_freq is irrelevant --
    it is read at run time as the tables read it -- so the init-time variants (linear, llama3, YaRN:
    frequencies and attention_scaling computed when the model is built) match too, and compute in the
    kernel exactly what their tables hold.
    """
    if position_source is None:
        return "no integer position ids feed the RoPE tables"
    found = []
    for root, trig in ((cos, "cos"), (sin, "sin")):
        step = _trig_of(root, trig)
        if isinstance(step, str):
            return step
        found.append(step)
    (cos_emb, cos_scale), (sin_emb, sin_scale) = found
    if cos_emb is not sin_emb:
        return "cos and sin are computed from different angles"
    if cos_scale != sin_scale:
        return f"cos and sin are scaled differently ({cos_scale} and {sin_scale})"
    emb = cos_emb
    if emb.op != "call_function" or emb.target is not torch.cat or len(emb.args[0]) != 2 \
            or emb.args[0][0] is not emb.args[0][1]:
        return "the angles are not cat((freqs, freqs), dim=-1) (a different RoPE layout)"
    freqs, value = emb.args[0][0], example_value(emb)
    dim = _arg(emb, 1, "dim") or 0
    if value is None or dim not in (-1, value.dim() - 1) or value.shape[-1] != head_dim:
        return f"the angles are not concatenated along the last dimension into {head_dim} features"
    if example_value(freqs) is None or example_value(freqs).dtype != torch.float32:
        return "the angles are not computed in float32"
    product = _outer_product(freqs, head_dim // 2)
    if isinstance(product, str):
        return product
    positions, inv_freq = product
    if positions is not position_source:
        return "the angles are computed from something other than the position ids as they are"
    if inv_freq.op not in ("placeholder", "get_attr"):
        return "inv_freq is computed in the graph, not read from a buffer"
    mutated = [u for u in inv_freq.users if writes_in_place(u, inv_freq)]
    if mutated:
        return (f"inv_freq is updated inside the graph ({mutated[0].target}: dynamic or longrope RoPE, whose "
                "frequencies depend on the sequence length)")
    return DefaultRope(positions, inv_freq, cos_scale)


# Ops that only add size-1 axes or broadcast (no value moves to another index): how the tables reach the
# keys, and how inv_freq and the positions reach their product. (No view/reshape: those may regroup.)
_ADD_AXES_METHODS = {"unsqueeze", "expand"}
_ADD_AXES_FUNCTIONS = {torch.unsqueeze}


def _is_axes_only(node: fx.Node) -> bool:
    """Adds size-1 axes or broadcasts: x[..., None], x[None, :, None], unsqueeze, expand."""
    if is_call(node, methods=_ADD_AXES_METHODS, functions=_ADD_AXES_FUNCTIONS):
        return True
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], tuple):
        return all(i is None or i is Ellipsis or i == slice(None) for i in node.args[1])
    return False


def _is_cast(node: fx.Node) -> bool:
    """A dtype or device conversion: x.float(), x.to(dtype), x.to(device=..., dtype=...), x.type(dtype)."""
    return is_call(node, methods={"float", "to", "type"}) and example_value(node) is not None


def _strip(node: fx.Node, casts: bool = True) -> tuple[fx.Node, int]:
    """Follow ``node`` up through shape ops (and casts, when allowed) to where its values come from; with the
    number of dtype changes passed."""
    changes = 0
    while isinstance(node, fx.Node) and (_is_axes_only(node) or (casts and _is_cast(node))):
        source = node.args[0]
        if not isinstance(source, fx.Node):
            break
        before, after = example_value(source), example_value(node)
        if before is not None and after is not None and before.dtype != after.dtype:
            changes += 1
        node = source
    return node, changes


def _trig_of(root: fx.Node, trig: str) -> tuple[fx.Node, float] | str:
    """``root`` = (shape ops of) ``trig(emb) · scale``, rounded once to its dtype: (emb, scale), or why not."""
    node, changes = _strip(root)
    if changes > 1:
        return f"the {trig} table is converted between dtypes more than once"
    scale = 1.0
    if node.op == "call_function" and node.target in (operator.mul, torch.mul) and len(node.args) == 2:
        a, b = node.args
        if isinstance(a, fx.Node) and isinstance(b, (int, float)):
            node, scale = a, float(b)
        elif isinstance(b, fx.Node) and isinstance(a, (int, float)):
            node, scale = b, float(a)
    is_trig = is_call(node, methods={trig}, functions={getattr(torch, trig)})
    if not is_trig or not isinstance(node.args[0], fx.Node):
        return f"the {trig} table is not {trig}(angles) times a constant"
    value = example_value(node)
    if value is None or value.dtype != torch.float32:
        return f"the {trig} table is not computed in float32"
    return node.args[0], scale


def _outer_product(freqs: fx.Node, half: int) -> tuple[fx.Node, fx.Node] | str:
    """``freqs`` [..., S, half] = positions ⊗ inv_freq in one of transformers' two forms: (positions, inv_freq)."""
    def operand(node):
        source, _ = _strip(node)
        return source, example_value(node), example_value(source)

    if freqs.op == "call_function" and freqs.target in (operator.mul, torch.mul) and len(freqs.args) == 2 \
            and all(isinstance(a, fx.Node) for a in freqs.args):
        # 5.20+: position_ids[..., None].float() * inv_freq.to(float32): [b, S, 1] times [half]
        for p, f in (freqs.args, freqs.args[::-1]):
            (pos, p_val, pos_val), (inv, f_val, inv_val) = operand(p), operand(f)
            if (_is_ids(pos_val) and _is_inv_freq(inv_val, half) and p_val is not None and f_val is not None
                    and tuple(p_val.shape) == (*pos_val.shape, 1) and f_val.numel() == half):
                return pos, inv
        return "the angles are a product, but not position_ids[..., None] times inv_freq"
    if is_call(freqs, methods={"transpose"}, functions={torch.transpose}) and tuple(freqs.args[1:]) in ((1, 2), (2, 1)):
        product = freqs.args[0]
        if is_call(product, methods={"matmul"}, functions={operator.matmul, torch.matmul}) and len(product.args) == 2:
            # 5.17 - 5.19: (inv_freq[None, :, None].expand(b, -1, 1) @ position_ids[:, None, :]).transpose(1, 2)
            (inv, f_val, inv_val), (pos, p_val, pos_val) = operand(product.args[0]), operand(product.args[1])
            if (_is_ids(pos_val) and _is_inv_freq(inv_val, half) and p_val is not None and f_val is not None
                    and p_val.dim() == 3 and tuple(p_val.shape[1:]) == (1, pos_val.shape[-1])
                    and p_val.numel() == pos_val.numel() and f_val.dim() == 3
                    and tuple(f_val.shape[1:]) == (half, 1)):
                return pos, inv
        return "the angles are a transposed product, but not inv_freq[None, :, None] @ position_ids[:, None, :]"
    return "the angles are not an outer product of the position ids and inv_freq"


def _is_ids(value) -> bool:
    return isinstance(value, torch.Tensor) and not value.dtype.is_floating_point and value.dtype != torch.bool


def _is_inv_freq(value, half: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype.is_floating_point and tuple(value.shape) == (half,)
