"""SiteContext: what a cache form may use while the rewrite emits its store and rebuild for one site.

A form (:mod:`xq_compile.forms`) writes its graph code as plain torch recorded through ``ctx.emit``; the
context hands it the tensors that code needs as graph nodes: its state (new graph inputs, fetched
from the layer at run time), the rows this call writes, the cached length, the model's weights with
the rotation folded in, and the latent factors of those weights.
"""

from __future__ import annotations

import torch
from torch import fx

from xq_compile.cache import XQuantLayer
from xq_compile.latent import LATENT_FACTORS
from xq_compile.rotation import FOLDED_WEIGHTS

from .emit import Emitter
from .graph_state import GraphState, layer_fetcher
from .match import Projection, Site
from .strategies import RebuildStrategy


class SiteContext:
    def __init__(self, graph_state: GraphState, site: Site, layer: XQuantLayer, strategy: RebuildStrategy) -> None:
        self.graph_state, self.site, self.layer, self.strategy = graph_state, site, layer, strategy
        self.emit = Emitter(graph_state.graph)
        self.x: fx.Node = site.x           # the layer's input X [B, S, d]
        self.dtype: torch.dtype = layer.dtype
        self.index: fx.Node | None = None  # the cache rows this call writes, int64 [S] (set by the driver)
        k_idx = graph_state.arg_index[site.key.append.cache]
        fetch_layer = self.fetch_layer = layer_fetcher(k_idx)
        self._tag = f"layer{layer.layer_idx}"
        self.state: dict[str, fx.Node] = {
            name: graph_state.add_input(("state", k_idx, name), f"{self._tag}_{name}",
                                        lambda args, name=name: fetch_layer(args).state[name])
            for name in layer.state
        }
        self.rotation: fx.Node | None = None
        if layer.rotation is not None:
            self.rotation = graph_state.add_input(("rotation", k_idx), f"{self._tag}_rotation",
                                                  lambda args: fetch_layer(args).rotation)

    # -- rows -------------------------------------------------------------------------------------
    @property
    def length(self) -> fx.Node:
        """Rows cached once this call has written (an int node, or a device tensor: ``device_length``)."""
        return self.graph_state.length

    @property
    def rows(self):
        """How many rows the rebuild produces: n, or max_cache_len where the length stays on device."""
        return self.layer.max_cache_len if self.strategy.device_length else self.length

    def rows_of(self, name: str) -> fx.Node:
        """State tensor ``name`` cut to the rows the rebuild produces."""
        if self.strategy.device_length:
            return self.state[name]
        return self.emit(lambda t, n: t.narrow(1, 0, n), self.state[name], self.length)

    # -- XQuant-CL ------------------------------------------------------------------------------------
    @property
    def accumulator(self) -> fx.Node | None:
        """The reconstruction carried up the layers (fp32, all cached rows), None below the first layer."""
        return self.graph_state.accumulator

    @accumulator.setter
    def accumulator(self, node: fx.Node) -> None:
        self.graph_state.accumulator = node

    # -- weights ---------------------------------------------------------------------------------
    def projection(self, which: str) -> Projection:
        return {"key": self.site.key, "value": self.site.value}[which]

    def model_weight(self, which: str) -> fx.Node:
        """The K (V) projection's weight rows, with the rotation folded in (W·R) when X is rotated."""
        proj = self.projection(which)
        rows = proj.channels  # of a fused projection (Phi-3's qkv_proj; GPT-NeoX's, one block per head)
        if self.rotation is not None:
            w_idx, fetch_layer = self._weight_index(proj), self.fetch_layer
            suffix = f"_{rows}" if rows else ""
            return self.graph_state.add_input(
                ("folded", w_idx, rows), f"{self._tag}_{proj.weight.name}{suffix}_rotated",
                lambda args: FOLDED_WEIGHTS.get(args[w_idx], fetch_layer(args).rotation, rows))
        if rows is None:
            return proj.weight
        return self.emit(lambda w: rows.of_weight(w), proj.weight)

    def bias(self, which: str) -> fx.Node | None:
        """The K (V) projection's bias rows, or None."""
        proj = self.projection(which)
        if proj.bias is None or proj.channels is None:
            return proj.bias
        rows = proj.channels
        return self.emit(lambda b: rows.of(b), proj.bias)

    def latent_factors(self, which: str, rotated: bool) -> tuple[fx.Node, fx.Node]:
        """(down, up) SVD factors of the K (V) weight rows, computed once per weight."""
        proj = self.projection(which)
        w_idx, rows, fetch_layer = self._weight_index(proj), proj.channels, self.fetch_layer

        def fetch(part):  # (the fetchers live as long as the compiled graph: they hold no graph objects)
            return lambda args: LATENT_FACTORS.get(
                args[w_idx], rows, fetch_layer(args).rotation if rotated else None)[part]

        suffix = f"_{rows}" if rows else ""  # K and V of one fused weight: one input each
        return tuple(self.graph_state.add_input(("latent", w_idx, rows, rotated, part),
                                                f"{self._tag}_{proj.weight.name}{suffix}_{name}", fetch(part))
                     for part, name in enumerate(("down", "up")))

    def joint_factors(self) -> tuple[fx.Node, fx.Node]:
        """(down, up) of the stacked [W_k; W_v] (rotated like X): up's first rows rebuild K."""
        key, value = self.site.key, self.site.value
        kw_idx, vw_idx, fetch_layer = self._weight_index(key), self._weight_index(value), self.fetch_layer
        k_rows, v_rows = key.channels, value.channels

        def fetch(part):
            return lambda args: LATENT_FACTORS.get_joint(args[kw_idx], args[vw_idx], k_rows, v_rows,
                                                         fetch_layer(args).rotation)[part]

        return tuple(self.graph_state.add_input(("joint", kw_idx, vw_idx, part), f"{self._tag}_kv_{name}", fetch(part))
                     for part, name in enumerate(("down", "up")))

    def _weight_index(self, proj: Projection) -> int:
        w_idx = self.graph_state.arg_index.get(proj.weight)
        if w_idx is None:
            raise TypeError(f"layer {self.layer.layer_idx}: projection weight is not a graph input")
        return w_idx
