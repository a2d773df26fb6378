"""explain(): what the xquant backend does to a model, layer by layer.

    import xq_compile as xq
    e = xq.explain(model, "The first folio was", tokenizer=tok)           # or input_ids / a batch dict
    print(e)                    # per-layer table, then the graphs before and after the rewrite
    e.write("explain_out")      # before.py, after.py, report.md

It compiles the model's forward with the xquant backend (``aot_eager`` inside by default: the same
rewrite as Inductor would get, without code generation, so it takes seconds), runs the prompt once
(the prefill graph) and, by default, one greedy decode step (the decode graph), and reports the graphs
that this call compiled.

Bytes are reported for a cache of a realistic capacity (``DEFAULT_CACHE_LEN`` tokens), not just the few
tokens the explained run writes: the latent form of a GQA model has a fixed part per layer (its fp16
open key group), which dominates a cache of a few dozen tokens and would make the first look report
a loss. The bytes at the capacity are measured from the allocated tensors; the bytes per token as the
cache grows (n -> infinity) and the ratios at other capacities come from :func:`memory_report`'s
formulas, which the measured numbers agree with.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import torch

from .backend import CompileRecord, collect_records, make_xquant_backend
from .cache import ModelWindowLayer, XQuantCache, XQuantLayer, cache_kwargs
from .config import XQuantConfig
from .memory import MemoryReport, fp16_kv_cache_bytes, memory_report

DEFAULT_CACHE_LEN = 4096  # explain()'s cache capacity: long enough that fixed per-layer bytes stop dominating
REPORTED_CAPACITIES = (128, 512, 2048, 4096, 32768)  # the ratio table, besides the cache's own capacity


@dataclasses.dataclass
class LayerExplanation:
    """One attention layer: was its site found, rewritten or skipped (and why), and what it costs."""

    layer: int | None
    status: str                      # "rewritten", "skipped", or "not found" (no site in the graph)
    reason: str = ""                 # why a site was skipped / not found
    form: str | None = None          # SiteReport.form of a rewritten site, e.g. "X (4-bit)"
    kv_bytes_per_token: float = 0.0  # an fp16 K+V cache of this layer, per token of one sequence
    # This layer's X state per token of one sequence: allocated bytes / (batch x the cache's capacity),
    # measured from its tensors; and the rate as the capacity grows (memory_report's slope).
    x_bytes_per_token: float | None = None
    x_bytes_per_token_limit: float | None = None
    # fp16 K+V per token as n -> infinity, where it differs from kv_bytes_per_token: 0 for a sliding-window
    # layer (its window stops growing; kv_bytes_per_token is then its window at the cache's capacity)
    kv_bytes_per_token_limit: float | None = None

    @property
    def ratio(self) -> float | None:
        """fp16 K+V / X state at the cache's capacity (how many times smaller)."""
        return self.kv_bytes_per_token / self.x_bytes_per_token if self.x_bytes_per_token else None

    @property
    def kv_limit(self) -> float:
        return self.kv_bytes_per_token if self.kv_bytes_per_token_limit is None else self.kv_bytes_per_token_limit

    @property
    def ratio_limit(self) -> float | None:
        """fp16 K+V / X state per token as n -> infinity."""
        return self.kv_limit / self.x_bytes_per_token_limit if self.x_bytes_per_token_limit else None


@dataclasses.dataclass
class GraphExplanation:
    """One graph compiled by the explained call ("prefill", "decode", or "graph N")."""

    name: str
    record: CompileRecord

    @property
    def code_before(self) -> str:
        return self.record.code_before

    @property
    def code_after(self) -> str:
        return self.record.code_after


@dataclasses.dataclass
class Explanation:
    """What :func:`explain` found. ``str()`` gives the per-layer table and the graphs as code."""

    model_name: str
    layers: list[LayerExplanation]
    graphs: list[GraphExplanation]
    cache: Any
    logits: list[torch.Tensor]       # the outputs of the explained calls (prefill, then decode)
    notes: list[str] = dataclasses.field(default_factory=list)
    # memory_report of an XQuantCache at its capacity, batch and dtype (None for any other cache)
    memory: MemoryReport | None = None
    model_config: Any = None
    tokens_written: int = 0          # rows the explained run wrote (prompt + decode steps)

    @property
    def rewritten(self) -> int:
        return sum(layer.status == "rewritten" for layer in self.layers)

    @property
    def kept(self) -> int:
        """Sliding-window layers, left with the model's own K/V window by design."""
        return sum(layer.status == "kept" for layer in self.layers)

    @property
    def bytes_per_token(self) -> tuple[float, float | None]:
        """(fp16 K+V, this cache) bytes per token of one sequence, all layers, at the cache's capacity.

        Measured: every tensor the cache allocated (``cache.nbytes()``: X state, the shared int64
        positions, placeholders, counters, Hadamard block; a sliding-window layer's K/V window) / (batch x
        capacity); layers neither rewritten nor kept counted at fp16 K+V instead of their X state. The
        fp16 side counts a sliding-window layer at its window, as the model's own cache holds it. None
        without an XQuantCache.
        """
        kv = sum(r.kv_bytes_per_token for r in self.layers)
        if not isinstance(self.cache, XQuantCache):
            return kv, None
        unchanged = [r for r in self.layers if r.x_bytes_per_token is None]
        allocated = self.cache.nbytes() - sum(_state_bytes(self.cache.layers[r.layer]) for r in unchanged
                                              if r.layer is not None and r.layer < len(self.cache.layers))
        rows = self.cache.max_batch_size * self.cache.max_cache_len
        return kv, allocated / rows + sum(r.kv_bytes_per_token for r in unchanged)

    @property
    def bytes_per_token_limit(self) -> tuple[float, float | None]:
        """(fp16 K+V, this cache) bytes per token as n -> infinity: memory_report's slope per layer,
        + 8 for the int64 position; layers not rewritten at fp16 K+V. None without an XQuantCache."""
        kv = sum(r.kv_limit for r in self.layers)
        if self.memory is None:
            return kv, None
        return kv, 8 + sum(r.x_bytes_per_token_limit if r.x_bytes_per_token_limit is not None
                           else r.kv_limit for r in self.layers)

    def ratio_by_capacity(self, capacities=REPORTED_CAPACITIES) -> list[tuple[int, float, float]]:
        """(capacity, bytes per token, times smaller than fp16 K+V) of this cache's configuration at
        each capacity (and its own), from memory_report; [] unless every layer was rewritten (or kept
        as a sliding-window layer)."""
        if self.memory is None or self.rewritten + self.kept != len(self.layers) or not self.layers:
            return []
        cache, rows = self.cache, []
        for n in sorted({*capacities, cache.max_cache_len}):
            r = memory_report(self.model_config, cache.xquant, n, cache.max_batch_size,
                              dtype_bytes=cache.dtype.itemsize)
            rows.append((n, r.xquant.per_token_at, r.ratio_to_fp16(r.xquant)))
        return rows

    def report(self) -> str:
        """The per-layer table (markdown), without the graph code."""
        lines = [f"# xq-compile explain: {self.model_name}", ""]
        cache = self.cache.__class__.__name__ if self.cache is not None else "none"
        capacity = None
        if isinstance(self.cache, XQuantCache):
            capacity, batch = self.cache.max_cache_len, self.cache.max_batch_size
            cache = (f"XQuantCache({self.cache.xquant.describe()}, max_cache_len={capacity}, batch={batch}); "
                     f"the explained run wrote {self.tokens_written} of its {capacity} token rows")
        graphs = ", ".join(f"{g.name} ({g.record.rewritten} rewritten, {g.record.skipped} skipped)"
                           for g in self.graphs) or "none"
        lines += [f"cache: {cache}", f"graphs compiled by this call: {graphs}", ""]
        if not self.layers:
            lines.append("no attention sites: the graph has no K/V cache write, nothing to rewrite "
                         "(the model runs unmodified).")
            lines += [f"note: {n}" for n in self.notes]
            return "\n".join(lines)
        at = f"at {capacity} tokens" if capacity else "at capacity"
        lines += ["bytes per token of one sequence; fp16/X = how many times smaller than the fp16 K+V cache", "",
                  f"| layer | site | form / reason | fp16 K+V | X state {at} (measured) | fp16/X "
                  "| X state as n -> inf | fp16/X |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in self.layers:
            detail = row.form if row.status == "rewritten" else row.reason
            after = _bytes(row.x_bytes_per_token) if row.x_bytes_per_token is not None else "unchanged"
            limit = _bytes(row.x_bytes_per_token_limit) if row.x_bytes_per_token_limit is not None else "-"
            where = "-" if row.layer is None else row.layer
            lines.append(f"| {where} | {row.status} | {detail} | {_bytes(row.kv_bytes_per_token)} | {after} "
                         f"| {_ratio(row.ratio)} | {limit} | {_ratio(row.ratio_limit)} |")
        kept = f", {self.kept} kept as the model's own K/V window (sliding-window layers)" if self.kept else ""
        lines += ["", f"{self.rewritten}/{len(self.layers)} layers rewritten{kept} (layers neither rewritten nor "
                      "kept are counted at fp16 K+V below)"]
        kv, x = self.bytes_per_token
        if x is None:
            lines.append(f"all layers: {_bytes(kv)} bytes per token of fp16 K+V, unchanged")
        else:
            kv_limit, x_limit = self.bytes_per_token_limit
            lines += [f"all layers {at}: {_bytes(kv)} -> {_bytes(x)} bytes per token ({_times(kv / x)}; measured: "
                      "every tensor the cache allocated, incl. the int64 position of each token and the fixed "
                      "bytes)",
                      f"all layers as n -> inf: {_bytes(kv_limit)} -> {_bytes(x_limit)} bytes per token "
                      f"({_times(kv_limit / x_limit)}; memory_report's rate, incl. 8 bytes of position)"]
        table = self.ratio_by_capacity()
        if table:
            lines += ["", f"by cache capacity (memory_report, batch={self.cache.max_batch_size}):", "",
                      "| tokens | " + " | ".join(str(n) for n, _, _ in table) + " | n -> inf |",
                      "|---|" + "---|" * (len(table) + 1),
                      "| X cache B/token | " + " | ".join(_bytes(b) for _, b, _ in table) + f" | {_bytes(x_limit)} |",
                      "| fp16/X | " + " | ".join(_ratio(r) for _, _, r in table)
                      + f" | {_ratio(kv_limit / x_limit)} |"]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def __str__(self) -> str:
        parts = [self.report()]
        for g in self.graphs:
            parts += [f"\n===== {g.name} graph before the xquant rewrite =====\n{g.code_before.strip()}",
                      f"\n===== {g.name} graph after the xquant rewrite =====\n{g.code_after.strip()}"]
        return "\n".join(parts)

    def write(self, out_dir: str | Path) -> list[Path]:
        """Write before.py / after.py (every graph of the call, in order) and report.md into ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for name, attr in (("before.py", "code_before"), ("after.py", "code_after")):
            text = [f"# xq-compile explain: {self.model_name}: Dynamo graph(s) {name[:-3]} the xquant rewrite\n"]
            for g in self.graphs:
                text.append(f"\n# ===== {g.name} graph =====\n{getattr(g, attr).strip()}\n")
            paths.append(out / name)
            paths[-1].write_text("".join(text))
        paths.append(out / "report.md")
        paths[-1].write_text(self.report() + "\n")
        return paths


def explain(
    model: torch.nn.Module,
    inputs: Any,
    *,
    tokenizer: Any = None,
    cache: Any = None,
    xquant: XQuantConfig | None = None,
    bits: int | None = 4,
    decode_steps: int = 1,
    max_cache_len: int = DEFAULT_CACHE_LEN,
    inner: str | Callable = "aot_eager",
    fullgraph: bool = True,
    rebuild: str = "auto",
) -> Explanation:
    """Compile ``model.forward`` with the xquant backend, run ``inputs`` once, report what happened.

    ``inputs``: a prompt (str or list of str, with ``tokenizer``), a ``[batch, seq]`` tensor of input
    ids, a dict of model inputs (e.g. a tokenizer's output), or -- for a model that is not a
    transformers causal LM -- a tuple of positional arguments (called once, without a cache).
    ``cache``: the cache to run with (an ``XQuantCache``, or any other to see which sites are skipped);
    by default a new ``XQuantCache(xquant=xquant or XQuantConfig(bits=bits))`` of ``max_cache_len``
    tokens (4096: the bytes per token are those of a cache of that capacity; the run still writes only
    the prompt and the decode steps). ``decode_steps`` greedy steps after the prompt make the decode
    graph show.
    ``inner``: the compiler after the rewrite (``"aot_eager"`` is fast; ``"inductor"`` is what
    ``backend="xquant"`` uses). ``rebuild``: as :func:`make_xquant_backend`'s (``"fused"`` shows on CPU
    the fused decode-attention form CUDA runs, with how each site gets RoPE). ``model.forward`` itself
    is not modified.
    """
    compiled = torch.compile(model.forward, backend=make_xquant_backend(inner, rebuild), fullgraph=fullgraph)
    config = getattr(model, "config", None)
    name = getattr(config, "name_or_path", "") or model.__class__.__name__
    logits, names, tokens_written = [], [], 0
    with collect_records() as records, torch.no_grad():
        if isinstance(inputs, tuple):
            out = compiled(*inputs)
            logits.append(out)
            names.append("graph")
        else:
            batch = _as_batch(inputs, tokenizer, model)
            batch_size, prompt_len = batch["input_ids"].shape
            tokens_written = prompt_len + decode_steps
            if cache is None:
                if max_cache_len < tokens_written:
                    raise ValueError(
                        f"explain() needs max_cache_len >= {tokens_written} (the prompt's {prompt_len} tokens "
                        f"+ decode_steps={decode_steps}), got {max_cache_len}: pass a larger max_cache_len "
                        "or a shorter prompt.")
                cache = XQuantCache(config, max_batch_size=batch_size, max_cache_len=max_cache_len,
                                    xquant=xquant or XQuantConfig(bits=bits), dtype=model.dtype,
                                    device=batch["input_ids"].device)
            seen = len(records)
            out = compiled(**batch, **cache_kwargs(model, cache), use_cache=True)
            logits.append(out.logits)
            names += ["prefill"] * (len(records) - seen)
            for _ in range(decode_steps):
                batch = _next_step(batch, out.logits)
                seen = len(records)
                out = compiled(**batch, **cache_kwargs(model, cache), use_cache=True)
                logits.append(out.logits)
                names += ["decode"] * (len(records) - seen)
    graphs = [GraphExplanation(_unique(names, i), r) for i, r in enumerate(records)]
    notes = []
    if not records:
        notes.append("no graph was compiled by this call: Dynamo reused graphs compiled before for this "
                     "forward; call torch.compiler.reset() first to see them.")
    memory = None
    if isinstance(cache, XQuantCache):
        memory = memory_report(config, cache.xquant, cache.max_cache_len, cache.max_batch_size,
                               dtype_bytes=cache.dtype.itemsize)
    return Explanation(name, _layers(graphs, config, cache, memory), graphs, cache, logits, notes,
                       memory=memory, model_config=config, tokens_written=tokens_written)


def _state_bytes(layer: Any) -> int:
    """Bytes of one XQuantCache layer's state (codes, scales, zeros, open key group...; a sliding-window
    layer's X or K/V window); 0 for other layers."""
    if not isinstance(layer, (XQuantLayer, ModelWindowLayer)):
        return 0
    return sum(t.numel() * t.element_size() for t in layer.state.values())


def _bytes(value: float) -> str:
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"


def _ratio(value: float | None) -> str:
    return f"{value:.2f}x" if value else "-"


def _times(ratio: float) -> str:
    """'3.52x smaller' / '2.22x larger' than fp16 K+V, so that a loss does not read as a small gain."""
    return f"{ratio:.2f}x smaller" if ratio >= 1 else f"{1 / ratio:.2f}x larger"


def _unique(names: list[str], i: int) -> str:
    """'prefill', 'decode', or 'prefill 2'... when a graph break made one call compile several graphs."""
    same = [j for j, n in enumerate(names) if n == names[i]]
    return names[i] if len(same) == 1 else f"{names[i]} {same.index(i) + 1}"


def _as_batch(inputs: Any, tokenizer: Any, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    if isinstance(inputs, (str, list)):
        if tokenizer is None:
            raise ValueError("explain() needs tokenizer= to run a text prompt (or pass input ids)")
        if isinstance(inputs, list) and tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        # left padding: rows end together; each row keeps its own positions (see position_ids below)
        side, tokenizer.padding_side = tokenizer.padding_side, "left"
        try:
            inputs = tokenizer(inputs, return_tensors="pt", padding=isinstance(inputs, list))
        finally:
            tokenizer.padding_side = side
    if isinstance(inputs, torch.Tensor):
        inputs = {"input_ids": inputs if inputs.dim() == 2 else inputs[None]}
    if not isinstance(inputs, Mapping) or "input_ids" not in inputs:
        raise TypeError("explain() takes a prompt, a tensor of input ids, a dict with input_ids, or a tuple "
                        f"of positional arguments; got {type(inputs).__name__}")
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in inputs.items() if k in ("input_ids", "attention_mask", "position_ids")}
    batch.setdefault("attention_mask", torch.ones_like(batch["input_ids"]))
    batch.setdefault("position_ids", (batch["attention_mask"].long().cumsum(-1) - 1).clamp(min=0))
    return batch


def _next_step(batch: dict[str, torch.Tensor], logits: torch.Tensor) -> dict[str, torch.Tensor]:
    mask = batch["attention_mask"]
    return {
        "input_ids": logits[:, -1:].argmax(-1),
        "attention_mask": torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1),
        "position_ids": batch["position_ids"][:, -1:] + 1,
    }


def _layers(graphs: list[GraphExplanation], config: Any, cache: Any,
            memory: MemoryReport | None) -> list[LayerExplanation]:
    """One row per attention layer, from the first graph that reports it (the prefill)."""
    reports, reasons = {}, {}
    for g in graphs:
        for r in g.record.reports:
            reports.setdefault(r.layer, r)
            if r.status == "skipped":
                reasons.setdefault(r.layer, {}).setdefault(r.reason, []).append(g.name)
    num_layers = getattr(config, "num_hidden_layers", None) if config is not None else None
    if not reports and not graphs:
        return []
    indices = list(range(num_layers)) if num_layers and graphs and reports else []
    indices += [i for i in reports if i not in indices]
    kv = fp16_kv_cache_bytes(config, 1, 1) / num_layers if num_layers else 0.0
    capacity = cache.max_cache_len if isinstance(cache, XQuantCache) else None
    rows = []
    for i in indices:
        r = reports.get(i)
        if r is None:
            rows.append(LayerExplanation(i, "not found", "no K/V cache write of this layer was matched in the "
                                         "compiled graphs", kv_bytes_per_token=kv))
            continue
        reason = r.reason
        if len(reasons.get(i, {})) > 1:  # e.g. a lazily allocated cache: another reason in the prefill graph
            reason = "; ".join(f"{', '.join(names)}: {why}" for why, names in reasons[i].items())
        row = LayerExplanation(i, r.status, reason, r.form if r.status == "rewritten" else None, kv)
        layer = (cache.layers[i] if r.status in ("rewritten", "kept") and i is not None and cache is not None
                 else None)
        if getattr(layer, "is_sliding", False) and capacity:  # fp16 K+V of the window the model would keep
            row.kv_bytes_per_token = kv * layer.form.window_rows(capacity) / capacity
            row.kv_bytes_per_token_limit = 0.0
        if isinstance(layer, (XQuantLayer, ModelWindowLayer)):
            row.x_bytes_per_token = _state_bytes(layer) / (capacity or layer.max_cache_len) / layer.batch_size
            if memory is not None:
                row.x_bytes_per_token_limit = float(memory.xquant_layers[i].per_token)
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------------
# xq-compile explain (registered in cli.SUBCOMMANDS)

DEFAULT_PROMPT = "Shakespeare, William (1564-1616), English poet, player and playwright, was"


def add_explain_parser(sub) -> None:
    p = sub.add_parser("explain", help="Show, per layer, what the xquant backend rewrites and why; "
                                       "the graphs before and after; bytes per token.")
    p.add_argument("--model", default="smollm2-mha",
                   help="smollm2-mha, smollm2-gqa, or a local directory saved with save_pretrained")
    p.add_argument("--bits", type=int, default=4, choices=[2, 3, 4, 8, 16], help="16 = unquantized X")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--rotation", default="hadamard", choices=["hadamard", "none"])
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--decode-steps", type=int, default=1, help="0: prefill graph only")
    p.add_argument("--max-cache-len", type=int, default=DEFAULT_CACHE_LEN,
                   help="capacity of the explained cache in tokens: the bytes per token reported are those "
                        f"of a cache this long (default {DEFAULT_CACHE_LEN}; the run itself writes only the "
                        "prompt and the decode steps)")
    p.add_argument("--inductor", action="store_true",
                   help="compile the rewritten graph with Inductor (slower) instead of aot_eager")
    p.add_argument("--out", help="write before.py, after.py and report.md into this directory")
    p.set_defaults(func=run_explain)


def run_explain(args) -> None:
    from . import models

    model, tokenizer = models.load_model(args.model)
    config = XQuantConfig(bits=None if args.bits == 16 else args.bits, group_size=args.group_size,
                          rotation=args.rotation)
    result = explain(model, args.prompt, tokenizer=tokenizer, xquant=config, decode_steps=args.decode_steps,
                     max_cache_len=args.max_cache_len, inner="inductor" if args.inductor else "aot_eager")
    if args.out:
        paths = result.write(args.out)
        print(result.report())
        print("\nwrote " + ", ".join(str(p) for p in paths))
    else:
        print(result)
