"""RoPE at the cached rows: the model's own RoPE code, cloned to rotate rebuilt keys at the positions
each cached row was written with (so any RoPE variant the model computes is reproduced exactly)."""

from __future__ import annotations

from .emit import clone_region
from .graph_state import GraphState
from .match import Site, _ancestors, _descendants, example_value
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
    source = site.position_source
    tables = (_descendants(source) - {source}) & set().union(*(_ancestors(i, lambda _: False) for i in roots))
    per_layer = set(per_layer)
    region = [nd for nd in state.graph.nodes if (nd in tables and nd not in cloned) or nd in per_layer]
    mapping = clone_region(state.graph, region, {**cloned, **(replace or {})})
    cloned.update({nd: mapping[nd] for nd in tables if nd in mapping})
    # The code was traced for this call's tokens: sizes it read off them (gpt-fast: freqs_cis.view(1,
    # x.size(1), ...)) are literals or the token-count symbol, and must follow the rows instead.
    inputs = {source: example_value(source).dim() - 1}
    if site.key.heads in (replace or {}):
        inputs[site.key.heads] = 2 if site.key.heads_first else 1
    fit_to_rows([nd for nd in state.graph.nodes if nd in tables or nd in per_layer],
                {nd: mapping[nd] for nd in region}, inputs, site.seq_len, rows, state.row_choices,
                {site.key.append.value: 2} if per_layer else None)
    return mapping
