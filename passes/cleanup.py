"""Graph cleanup after a site is rewritten: later reads of the K/V cache go to the rebuilt tensors,
and the original projection chains that nothing reads any more go away."""

from __future__ import annotations

import operator

from torch import fx

from .match import _descendants


def replace_cache_reads(graph: fx.Graph, site, new_keys: fx.Node, new_values: fx.Node) -> None:
    """Every read of the K/V cache after the (removed) appends now reads the rebuilt tensors."""
    for proj, rebuilt in ((site.key, new_keys), (site.value, new_values)):
        append = proj.append
        position = {n: i for i, n in enumerate(graph.nodes)}
        for user in list(append.cache.users):
            if user is not append.node and position[user] > position[append.node]:
                user.replace_input_with(append.cache, rebuilt)
        append.node.replace_all_uses_with(rebuilt)
        graph.erase_node(append.node)


def erase_site(graph: fx.Graph, site, attention=None, appends: bool = True) -> None:
    """Remove a rewritten site's cache appends (unless already gone: ``appends=False``) and its K/V
    projection chains (and ``attention``'s repeat_kv chains) that nothing reads any more."""
    if appends:
        for append in (site.key.append, site.value.append):
            graph.erase_node(append.node)
    erase_dead(graph, [*site.key.call.nodes, *site.value.call.nodes, *site.key.rope, site.key.heads,
                       site.value.heads, *(attention.chains if attention is not None else ())])


def erase_dead(graph: fx.Graph, roots: list[fx.Node]) -> None:
    """Remove the now-unused original K/V projection chains (and only those)."""
    candidates = set()
    for root in roots:
        candidates |= _descendants(root)
        candidates.add(root)
    changed = True
    while changed:
        changed = False
        for node in reversed(list(graph.nodes)):
            if node in candidates and not node.users and node.op in ("call_function", "call_method"):
                if (node.op == "call_method" and str(node.target).endswith("_")) or node.target is operator.setitem:
                    continue  # in-place ops have effects even without users (e.g. a later layer's cache write)
                graph.erase_node(node)
                candidates.discard(node)
                changed = True
