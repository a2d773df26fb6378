"""Per-graph bookkeeping of the rewrite: the inputs it adds, the layer behind each site, and what is
emitted once per graph (positions, length, RoPE tables at the cached rows, XQuant-CL's accumulator)."""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import torch
from torch import fx

from xq_compile._torch_private import declare_static_placeholder
from xq_compile.cache import XQuantLayer, layer_of
from xq_compile.config import XQuantConfig
from xq_compile.rotation import rotation_of

from .match import Site, example_value


@dataclasses.dataclass(frozen=True)
class GraphInput:
    """A tensor the rewritten graph takes as an extra input, fetched from the original call's args."""

    name: str
    fetch: Callable[[Sequence[torch.Tensor]], torch.Tensor]


def layer_fetcher(arg_index: int) -> Callable[[Sequence[torch.Tensor]], XQuantLayer]:
    def fetch(args):
        layer = layer_of(args[arg_index])
        if layer is None:
            raise RuntimeError(
                "a graph compiled by the xquant backend was called with a cache that is not the "
                "XQuantCache it was compiled for (or that cache was garbage collected); use an XQuantCache."
            )
        return layer

    return fetch


class GraphState:
    """Per-graph bookkeeping: new inputs (deduplicated), and what is emitted once per graph."""

    def __init__(self, graph: fx.Graph, example_inputs: Sequence[torch.Tensor], options: XQuantConfig | None,
                 rebuild: str):
        self.graph = graph
        self.placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        self.arg_index = {n: i for i, n in enumerate(self.placeholders)}
        self.rebuild = rebuild
        self.options = options
        self.owned: list[XQuantLayer] = []  # X state created for a model's own K/V buffers (options=)
        self.example_inputs = example_inputs
        self.extra_inputs: list[GraphInput] = []
        self._inputs_by_key: dict[tuple, fx.Node] = {}
        self.length: fx.Node | None = None        # tokens cached after this call's append (int or tensor)
        self.positions: fx.Node | None = None
        # source of the rows written -> their checked copy (rewrite._rows_written; CPU, length on the device)
        self.checked_positions: dict[fx.Node, fx.Node] = {}
        self.accumulator: fx.Node | None = None   # XQuant-CL: X̂ of the layer below, all cached rows
        self.cut_masks: dict[fx.Node, fx.Node] = {}  # attention mask -> its first n columns
        self.rope_tables: dict[fx.Node, fx.Node] = {}  # position source / RoPE table node -> at cached rows
        self.window_rope_tables: dict[tuple, dict] = {}  # the same at an X window's rows, per (first, count)
        self.row_choices: dict = {}  # RoPE table node -> which of its shape literals counts the rows
        self.next_cross_layer = 0
        self.shared_positions: torch.Tensor | None = None  # options= mode: shared by the graph's layers
        self.shared_rotation: torch.Tensor | None = None
        self.longest_buffer = 0  # rows of the longest K cache the graph writes (see model_window)

    # -- inputs -------------------------------------------------------------------------------
    def add_input(self, key: tuple, name: str, fetch) -> fx.Node:
        if key in self._inputs_by_key:
            return self._inputs_by_key[key]
        anchor = self._inputs_by_key and list(self._inputs_by_key.values())[-1] or self.placeholders[-1]
        with self.graph.inserting_after(anchor):
            node = self.graph.placeholder(f"xq_{name}")
        declare_static_placeholder(node)
        self._inputs_by_key[key] = node
        self.extra_inputs.append(GraphInput(name, fetch))
        return node

    def layer_for(self, site: Site) -> XQuantLayer | str:
        """The XQuantLayer behind a site, or the reason the site cannot be rewritten."""
        k_cache, v_cache = site.key.append.cache, site.value.append.cache
        if k_cache.op != "placeholder" or v_cache.op != "placeholder":
            return ("the K/V cache tensors are not graph inputs (a cache allocated lazily inside this graph, "
                    "e.g. a StaticCache before its first call: allocate it before compiling)")
        layer = layer_of(self.example_inputs[self.arg_index[k_cache]])
        if layer is None and self.options is not None:
            layer = self.state_for_model_buffers(site)
        if layer is None:
            return ("the cache is not an XQuantCache (pass cache=xq.XQuantCache(...), or configure the "
                    "backend with torch.compile(..., options={...}))")
        if isinstance(layer, str):
            return layer
        if layer_of(self.example_inputs[self.arg_index[v_cache]]) is not layer:
            return "the K and V caches belong to different XQuantCache layers"
        x = example_value(site.x)
        if x is None or x.shape[-1] != layer.hidden_size:
            return f"the projection input is not [batch, seq, {layer.hidden_size}]"
        if x.dtype != layer.dtype or x.device.type != layer.device.type:
            raise TypeError(
                f"XQuantCache was created with dtype={layer.dtype}, device={layer.device}, but layer "
                f"{layer.layer_idx} runs in dtype={x.dtype} on {x.device}: create the cache with "
                f"dtype={x.dtype}, device='{x.device}' (the model's)."
            )
        if (site.num_heads, site.head_dim) != (layer.num_heads, layer.k_head_dim):
            return (f"the model writes {site.num_heads} heads of {site.head_dim}, the cache expects "
                    f"{layer.num_heads} of {layer.k_head_dim}")
        if x.shape[0] != layer.batch_size:
            raise ValueError(
                f"XQuantCache has max_batch_size={layer.batch_size} but the model is called with batch "
                f"{x.shape[0]}: create the cache with max_batch_size={x.shape[0]}."
            )
        return layer

    def check_chain_order(self, layer: XQuantLayer) -> None:
        """XQuant-CL chains every layer to the one below: all of them must be in this graph, in order."""
        if not layer.form.chained:
            return
        if layer.layer_idx != self.next_cross_layer:
            raise RuntimeError(
                f"XQuant-CL needs every attention layer in one graph, in order, but this graph reaches "
                f"layer {layer.layer_idx} after layer {self.next_cross_layer - 1}. Compile with "
                "fullgraph=True (a graph break splits the layer chain), or use cross_layer=False."
            )
        self.next_cross_layer += 1

    def model_window(self, site: Site) -> str | None:
        """options= mode: why a site's K/V buffers are a sliding-window layer's window, left unmodified; None
        if they are not. transformers' StaticCache gives such a layer min(capacity, window) rows where the
        full layers have the capacity: a buffer shorter than the graph's longest is a window that rolls once
        full (a window at least the capacity never rolls, and is rewritten as a full layer)."""
        cache = site.key.append.cache
        if cache.op in ("call_method", "call_function") and str(cache.target).split(".")[-1] == "roll":
            cache = cache.args[0]  # a full window rolls its buffer before writing the new row
        if self.options is None or cache not in self.arg_index:
            return None
        keys = self.example_inputs[self.arg_index[cache]]
        if layer_of(keys) is not None or not isinstance(keys, torch.Tensor) or keys.dim() != 4:
            return None
        rows = keys.shape[2]
        if isinstance(rows, int) and rows < self.longest_buffer:
            return (f"sliding-window layer (its K/V buffer holds {rows} rows, the full layers' "
                    f"{self.longest_buffer}): K/V kept in the model's own window cache")
        return None

    def state_for_model_buffers(self, site: Site) -> XQuantLayer | str:
        """options= mode: X state for a model's own K/V buffers, owned by the compiled function."""
        keys = self.example_inputs[self.arg_index[site.key.append.cache]]
        values = self.example_inputs[self.arg_index[site.value.append.cache]]
        x = example_value(site.x)
        if not isinstance(keys, torch.Tensor) or keys.dim() != 4 or x is None:
            return "the K/V cache is not a [batch, heads, max_len, head_dim] tensor"
        if keys.count_nonzero() or values.count_nonzero():
            return ("the K/V cache already holds states written without xquant (e.g. a cache filled by an "
                    "earlier uncompiled or unrewritten call): reset it, or allocate it before compiling")
        self.options.check_hidden_size(x.shape[-1])
        batch, heads, max_len, head_dim = keys.shape
        if self.shared_positions is None:
            source = example_value(site.position_source) if site.position_source is not None else None
            shape = (batch, max_len) if source is None or source.dim() == 2 else (max_len,)
            self.shared_positions = torch.zeros(shape, dtype=torch.int64, device=keys.device)
            self.shared_rotation = rotation_of(self.options, keys.device)
        layer = XQuantLayer(layer_idx=site.layer, max_cache_len=max_len, batch_size=batch, hidden_size=x.shape[-1],
                            num_kv_heads=heads, head_dim=head_dim, xquant=self.options, dtype=x.dtype,
                            device=keys.device, positions=self.shared_positions, rotation=self.shared_rotation,
                            model_buffers=(keys, values))
        self.owned.append(layer)
        return layer

    def token_count(self, seq_len) -> Callable[[Sequence[torch.Tensor]], int]:
        """How many tokens a call appends: a constant, or read off an input's shape if dynamic."""
        if isinstance(seq_len, int):
            return lambda args: seq_len
        for i, n in enumerate(self.placeholders):
            v = example_value(n)
            if isinstance(v, torch.Tensor):
                for dim, size in enumerate(v.shape):
                    if isinstance(size, torch.SymInt) and str(size) == str(seq_len):
                        return lambda args, i=i, dim=dim: args[i].shape[dim]
        raise RuntimeError(f"cannot find the input whose shape gives the appended length {seq_len}")
