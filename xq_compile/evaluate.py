"""Perplexity and cache memory of XQuant side by side with KV-cache quantization (``xq-compile eval``).

Every method scores the same windows of the same text: for a window of W tokens, the NLL of every
token after the first, perplexity = exp(mean NLL over all windows' tokens).

Methods (``--methods``, comma separated):
  fp16          the unmodified model, teacher-forced through a transformers StaticCache in the same
                prefill + decode loop as the real XQuant path (reference perplexity; memory = fp16 KV as
                the model's own cache holds it: a sliding-window layer only its window).
  xquant:B      *real*: ``torch.compile(model.forward, backend="xquant")`` with an XQuantCache. The first
                ``prefill`` tokens go through the prefill graph, the rest ``step`` tokens at a time through
                the decode graph, scoring every logit. Memory = ``cache.nbytes()`` (allocated tensors).
  xquant:B:sim  simulated: one eager forward of the whole window under ``simulate_xquant``.
  xquant-auto:Rx  XQuant-CL with per-layer bits from :func:`xq_compile.calibrate` for a cache R times
                smaller than fp16 K/V at the window length (R may be fractional, e.g. 10x or 9.5x),
                calibrated on ``calib_ids`` (``--calib-text``), then evaluated like xquant:B (real, or
                ``:sim``); ``:baseN`` sets XQuant-CL's base layers (default 1), ``:rR`` / ``:sS`` keep
                rows exact as for xquant (their bytes counted in the budget the widths are chosen for).
  kivi:B        KIVI* (K per channel, V per token, no fp16 window), simulated in one pass; memory formula.
  kivi:B:rR     KIVI with its full-precision window of the R most recent tokens (e.g. kivi:2:r32,
                kivi:2:r128): a simulated KIVI cache (:class:`~xq_compile.kivi.KIVICache`, post-RoPE keys
                as KIVI's code quantizes them) in the same prefill + decode loop as the real paths;
                memory formula with the R rows at fp16.
  hf-quanto:B   transformers' QuantizedCache with the optimum-quanto backend (B = 2 or 4), eager, in the
                same prefill + decode loop; memory measured from the quantized tensors it holds.
Suffix ``:norot`` on xquant switches off the Hadamard rotation (the paper's plain XQuant); ``:x`` or
``:latent`` forces the cached form (default: the GQA latent form where X is wider than K+V), ``:ch0``
keeps channel 0 of the key latent in fp16; ``:rR`` / ``:sS`` keep the last R / first S rows exact
(``XQuantConfig(recent=R, sink=S)``, e.g. xquant:2:r128:s4), real path only for ``:rR``: the one-pass
simulation cannot move the window with each query, as the prefill + decode loop does. ``:log8`` (xquant,
xquant-cl, xquant-auto) stores the scales in the compact log8 format (``XQuantConfig(scale_format="log8")``,
e.g. xquant-auto:10x:log8, xquant-auto:12x:r16:s4:log8; xquant-auto then calibrates for its bytes).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import re
import time
from pathlib import Path
from typing import Callable, Iterable

import torch

from . import memory, models
from .cache import cache_kwargs
from .config import XQuantConfig
from .forms import layer_shapes
from .kivi import KIVICache, simulate_kivi
from .simulate import simulate_xquant

DEFAULT_METHODS = "fp16,kivi:4,kivi:2,hf-quanto:4,xquant:4,xquant:3,xquant:2"
KINDS = ("fp16", "kivi", "hf-quanto", "xquant", "xquant-cl", "xquant-auto")
AUTO_BASE_LAYERS = 1  # xquant-auto's XQuant-CL base layers unless :baseN says otherwise


# --------------------------------------------------------------------------------------------------
# methods


@dataclasses.dataclass(frozen=True)
class Method:
    kind: str
    bits: int | None = None
    simulated: bool = False
    rotation: str = "hadamard"
    base_layers: int | None = None  # xquant-cl: layers stored as X at 4 bits (None: the config default)
    form: str = "auto"  # xquant: "x", "latent" or "auto" (XQuantConfig.form)
    keep_channel0: bool = False
    target_ratio: float | None = None  # xquant-auto: fp16 K/V bytes / cache bytes to calibrate for
    residual: int = 0  # kivi, xquant: recent tokens kept in full precision (0: KIVI*, or no window)
    sink: int = 0  # xquant: first tokens kept in full precision
    scale_format: str = "fp16"  # xquant: XQuantConfig.scale_format (":log8")

    @property
    def label(self) -> str:
        if self.kind == "fp16":
            return "fp16"
        label = f"{self.kind}:{self.target_ratio:g}x" if self.kind == "xquant-auto" else f"{self.kind}:{self.bits}"
        if self.base_layers is not None:
            label += f":base{self.base_layers}"
        if self.kind.startswith("xquant") and self.rotation == "none":
            label += ":norot"
        if self.form != "auto":
            label += f":{self.form}"
        if self.keep_channel0:
            label += ":ch0"
        if self.residual:
            label += f":r{self.residual}"
        if self.sink:
            label += f":s{self.sink}"
        if self.scale_format != "fp16":
            label += f":{self.scale_format}"
        if self.kind.startswith("xquant") and self.simulated:
            label += ":sim"
        return label


def parse_methods(spec: str) -> list[Method]:
    """``"fp16,kivi:4,xquant:3:sim,xquant-cl:3:base1"`` -> Methods; errors name the offending entry.

    Suffixes: ``:sim`` (simulated, one pass), ``:norot`` (no Hadamard rotation), ``:baseN`` (XQuant-CL
    with N base layers), ``:x`` / ``:latent`` (force the cached form), ``:ch0`` (key latent channel 0
    in fp16), ``:rR`` / ``:sS`` (the last R / first S rows exact; ``:rR`` also on kivi, its window),
    ``:log8`` (compact scales, ``XQuantConfig(scale_format="log8")``).
    """
    methods = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        kind, *rest = item.split(":")
        if kind not in KINDS:
            raise ValueError(f"unknown method {item!r}: the kind must be one of {KINDS}")
        if kind == "fp16":
            if rest:
                raise ValueError(f"{item!r}: fp16 takes no bits")
            methods.append(Method("fp16"))
            continue
        if kind == "xquant-auto":
            methods.append(_parse_auto(item, rest))
            continue
        if not rest or not rest[0].isdigit():
            raise ValueError(f"{item!r}: give the bits, e.g. {kind}:4")
        bits, flags = int(rest[0]), set(rest[1:])
        window = [f for f in flags if re.fullmatch(r"r\d+", f)]
        sink = [f for f in flags if re.fullmatch(r"s\d+", f)]
        residual = int(window[0][1:]) if len(window) == 1 else 0
        if kind == "kivi" and window and len(flags) == 1:  # kivi:B:rR, KIVI with its fp16 window
            flags = set()
            if residual < 1:
                raise ValueError(f"{item!r}: the window of kivi:B:rR must hold at least one token")
        elif kind in ("xquant", "xquant-cl") and (window or sink):
            if len(window) > 1 or len(sink) > 1 or (window and "sim" in flags):
                raise ValueError(f"{item!r}: give one :rR and one :sS at most, and no :sim with :rR (the one-pass "
                                 "simulation cannot move the recent window with each query: use the real path)")
            flags -= set(window) | set(sink)
        elif window or sink:
            raise ValueError(f"{item!r}: ':rR' applies to kivi, xquant and xquant-cl, ':sS' to xquant and xquant-cl")
        base = [f for f in flags if re.fullmatch(r"base\d+", f)]
        unknown = flags - {"sim", "norot", "x", "latent", "ch0", "log8"} - set(base)
        if unknown or (flags and not kind.startswith("xquant")) or (base and kind != "xquant-cl") \
                or {"x", "latent"} <= flags:
            raise ValueError(f"{item!r}: suffixes ':sim', ':norot', ':x' or ':latent', ':ch0', ':rR', ':sS', ':log8' "
                             "apply to xquant and xquant-cl, ':baseN' to xquant-cl and xquant-auto only, ':rR' also "
                             "to kivi")
        scale_format = "log8" if "log8" in flags else "fp16"
        if scale_format != "fp16":  # the combinations the config refuses (latent form, ch0): fail here
            XQuantConfig(bits=bits, scale_format=scale_format, form=next((f for f in ("x", "latent") if f in flags),
                                                                        "auto"), keep_channel0="ch0" in flags)
        if kind == "hf-quanto" and bits not in (2, 4):
            raise ValueError(f"{item!r}: the quanto backend of QuantizedCache supports 2 and 4 bits only")
        if kind in ("xquant", "xquant-cl", "kivi"):
            XQuantConfig(bits=bits)  # same bit widths as the project's quantizer: fail here, not later
        methods.append(Method(kind, bits, simulated=(kind == "kivi" or "sim" in flags),
                              rotation="none" if "norot" in flags else "hadamard",
                              base_layers=int(base[0][4:]) if base else None,
                              form=next((f for f in ("x", "latent") if f in flags), "auto"),
                              keep_channel0="ch0" in flags, residual=residual,
                              sink=int(sink[0][1:]) if sink else 0, scale_format=scale_format))
    if not methods:
        raise ValueError("no methods given")
    return methods


def _parse_auto(item: str, rest: list[str]) -> Method:
    """``xquant-auto:10x[:sim][:baseN][:rR][:sS][:log8]``."""
    ratio = re.fullmatch(r"(\d+(?:\.\d+)?)x", rest[0]) if rest else None
    if ratio is None or float(ratio.group(1)) <= 1:
        raise ValueError(f"{item!r}: give the target ratio to fp16 K/V (> 1), e.g. xquant-auto:10x")
    flags = set(rest[1:])
    window = [f for f in flags if re.fullmatch(r"r\d+", f)]
    sink = [f for f in flags if re.fullmatch(r"s\d+", f)]
    base = [f for f in flags if re.fullmatch(r"base\d+", f)]
    known = {"sim", "log8"} | set(base) | set(window) | set(sink)
    if flags - known or max(len(base), len(window), len(sink)) > 1:
        raise ValueError(f"{item!r}: xquant-auto takes the suffixes ':sim', ':baseN', ':rR', ':sS' and ':log8' only")
    if window and "sim" in flags:
        raise ValueError(f"{item!r}: no :sim with :rR (the one-pass simulation cannot move the recent window with "
                         "each query: use the real path)")
    return Method("xquant-auto", simulated="sim" in flags, target_ratio=float(ratio.group(1)),
                  base_layers=int(base[0][4:]) if base else None, residual=int(window[0][1:]) if window else 0,
                  sink=int(sink[0][1:]) if sink else 0, scale_format="log8" if "log8" in flags else "fp16")


@dataclasses.dataclass
class MethodResult:
    method: str
    mode: str  # "real", "simulated", or "failed"
    perplexity: float | None
    nll_sum: float
    tokens: int
    bytes_per_token: float | None  # cache bytes per cached token at the window length
    bytes_source: str  # "measured" or "formula"
    wall_s: float
    note: str = ""
    change_vs_fp16: float | None = None  # relative perplexity change, filled in by run_eval
    ratio_to_fp16_kv: float | None = None  # fp16 KV bytes / this method's bytes


# --------------------------------------------------------------------------------------------------
# scoring helpers


def text_windows(ids: torch.Tensor, n_windows: int, window_len: int) -> list[torch.Tensor]:
    """The first ``n_windows`` non-overlapping windows [1, window_len] of a 1-D token tensor."""
    if ids.numel() < n_windows * window_len:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than {n_windows} windows x {window_len}")
    return [ids[i * window_len:(i + 1) * window_len][None] for i in range(n_windows)]


def window_nll(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    """(sum of NLL, count) of every token after the first, from logits [1, T, V] of ids [1, T]."""
    nll = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="sum")
    return nll.item(), ids.shape[1] - 1


def chunks(window_len: int, prefill: int, step: int) -> list[tuple[int, int]]:
    """(start, length) of the prefill chunk and the decode chunks; static shapes need exact tiling."""
    if prefill < 1 or step < 1 or window_len <= prefill or (window_len - prefill) % step:
        raise ValueError(
            f"window_len={window_len} must be prefill={prefill} plus a multiple of step={step} "
            "(every decode call has the same shape, so one decode graph serves them all)"
        )
    return [(0, prefill)] + [(s, step) for s in range(prefill, window_len, step)]


def teacher_forced_logits(forward: Callable, ids: torch.Tensor, cache, prefill: int, step: int) -> torch.Tensor:
    """Logits of every position of ``ids``, fed through ``forward`` chunk by chunk with ``cache``."""
    out = []
    for start, length in chunks(ids.shape[1], prefill, step):
        positions = torch.arange(start, start + length)
        logits = forward(input_ids=ids[:, start:start + length], **cache_kwargs(forward, cache), cache_position=positions,
                         position_ids=positions[None], use_cache=True).logits
        out.append(logits)
    return torch.cat(out, 1)


def tensor_bytes(objects: Iterable) -> int:
    """Bytes of the storages behind tensors, looking inside tensor subclasses (quanto's QTensors)."""
    seen, total = set(), 0

    def visit(t):
        nonlocal total
        if not isinstance(t, torch.Tensor):
            return
        if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):
            names, _ = t.__tensor_flatten__()
            for name in names:
                visit(getattr(t, name))
            return
        storage = t.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key not in seen and storage.nbytes():
            seen.add(key)
            total += storage.nbytes()

    for obj in objects:
        visit(obj)
    return total


# --------------------------------------------------------------------------------------------------
# the methods


def _progress(windows, desc: str, show: bool):
    if not show:
        return windows
    from tqdm.auto import tqdm

    return tqdm(windows, desc=desc, unit="win", leave=False)


def eval_simulated(model, windows, context_factory: Callable, desc: str = "", progress: bool = False):
    """One eager forward per window inside ``context_factory()``: (nll_sum, tokens)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in _progress(windows, desc, progress):
            with context_factory():
                logits = model(ids).logits
            nll, n = window_nll(logits, ids)
            total, count = total + nll, count + n
    return total, count


def compile_xquant(model) -> Callable:
    """A fresh xquant-compiled forward. Each configuration compiles its own graphs (Dynamo guards on the
    cache's settings); resetting first keeps one eval of many methods clear of the recompile limit."""
    torch.compiler.reset()
    return torch.compile(model.forward, backend="xquant", fullgraph=True)


def eval_xquant_real(model, windows, xquant: XQuantConfig, prefill: int, step: int, desc: str = "",
                     progress: bool = False):
    """Compiled prefill + decode from a real packed X cache: (nll_sum, tokens, cache bytes)."""
    import xq_compile as xq

    window_len = windows[0].shape[1]
    cache = xq.XQuantCache(model.config, max_batch_size=1, max_cache_len=window_len, xquant=xquant,
                           dtype=model.dtype)
    forward = compile_xquant(model)
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in _progress(windows, desc, progress):
            cache.reset()  # compiled graphs are reused: only the X state and the counters restart
            logits = teacher_forced_logits(forward, ids, cache, prefill, step)
            nll, n = window_nll(logits, ids)
            total, count = total + nll, count + n
    return total, count, cache.nbytes()


def eval_fp16(model, windows, prefill: int, step: int, desc: str = "", progress: bool = False):
    """The unmodified model (eager) in the same chunked loop, with a transformers StaticCache."""
    from transformers import StaticCache

    window_len = windows[0].shape[1]
    cache = StaticCache(config=model.config, max_cache_len=window_len)
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in _progress(windows, desc, progress):
            cache.reset()
            logits = teacher_forced_logits(model, ids, cache, prefill, step)
            nll, n = window_nll(logits, ids)
            total, count = total + nll, count + n
    held = tensor_bytes(t for layer in cache.layers for t in (layer.keys, layer.values))
    return total, count, held


def _sliding_note(config) -> str:
    windows = [shape.sliding_window for shape in layer_shapes(config) if shape.sliding_window is not None]
    if not windows:
        return ""
    return f" ({len(windows)} sliding-window layers at their window of {max(windows)} rows, as the model's cache)"


def eval_kivi_window(model, windows, bits: int, group_size: int, residual: int, prefill: int, step: int,
                     desc: str = "", progress: bool = False):
    """KIVI with its fp16 window (:class:`~xq_compile.kivi.KIVICache`), eager, chunk by chunk: (nll_sum, tokens)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in _progress(windows, desc, progress):
            cache = KIVICache(model.config, bits, group_size, residual)
            logits = teacher_forced_logits(model, ids, cache, prefill, step)
            nll, n = window_nll(logits, ids)
            total, count = total + nll, count + n
    return total, count


def eval_quanto(model, windows, bits: int, group_size: int, prefill: int, step: int, residual: int,
                desc: str = "", progress: bool = False):
    """transformers' QuantizedCache (quanto backend), eager: (nll_sum, tokens, bytes held at the end)."""
    from transformers.cache_utils import QuantizedCache

    total, count, held = 0.0, 0, 0
    with torch.no_grad():
        for ids in _progress(windows, desc, progress):
            cache = QuantizedCache(backend="quanto", config=model.config, nbits=bits, q_group_size=group_size,
                                   residual_length=residual)
            logits = teacher_forced_logits(model, ids, cache, prefill, step)
            nll, n = window_nll(logits, ids)
            total, count = total + nll, count + n
            held = max(held, tensor_bytes(
                t for layer in cache.layers
                for t in (layer._quantized_keys, layer._quantized_values, layer.keys, layer.values)))
    return total, count, held


# --------------------------------------------------------------------------------------------------
# the whole comparison


def calibration_ids(tokenizer, text: str, n_windows: int, window_len: int, calib_text: str | None = None,
                    calib_tokens: int = 512) -> tuple[torch.Tensor, str]:
    """(calibration tokens [calib_tokens], where they come from): the start of ``calib_text``, or without
    one the tokens of ``text`` right after the evaluated windows (held out from the score)."""
    if calib_text is not None:
        ids, start, what = tokenizer(calib_text, return_tensors="pt").input_ids[0], 0, "the calibration text"
    else:
        ids, start, what = tokenizer(text, return_tensors="pt").input_ids[0], n_windows * window_len, "the text"
    if ids.numel() < start + calib_tokens:
        raise ValueError(f"{what} has {ids.numel()} tokens, fewer than the {start + calib_tokens} needed for "
                         f"{calib_tokens} calibration tokens from token {start} on")
    return ids[start:start + calib_tokens], f"tokens {start}-{start + calib_tokens} of {what}"


def calibrated_config(model, method: Method, calib_ids: torch.Tensor, group_size: int, window_len: int,
                      progress: bool = False) -> tuple[XQuantConfig, str]:
    """xquant-auto: (XQuant-CL config with calibrated layer_bits for the method's ratio at the window
    length, a note saying what was chosen and how long it took)."""
    from .calibration import calibrate

    base_layers = AUTO_BASE_LAYERS if method.base_layers is None else method.base_layers
    # The window's bytes are in every layer's cost (memory_report), so the widths pay for it.
    base = XQuantConfig(bits=3, group_size=group_size, cross_layer=True, base_layers=base_layers,
                        recent=method.residual, sink=method.sink, scale_format=method.scale_format)
    start = time.perf_counter()
    result = calibrate(model, calib_ids, target_ratio=method.target_ratio, base=base, seq_len=window_len,
                       progress=progress, return_details=True)
    widths = "".join(map(str, result.config.layer_bits))
    counts = ", ".join(f"{result.config.layer_bits.count(b)}x{b}-bit" for b in sorted(set(result.config.layer_bits)))
    return result.config, (f"calibrated on {calib_ids.numel()} tokens in {time.perf_counter() - start:.0f} s: "
                           f"layer_bits {widths} ({counts}; XQuant-CL, {base_layers} base layer(s)"
                           f"{', log8 scales' if method.scale_format == 'log8' else ''}), "
                           f"estimated +{result.estimated_damage:.4f} nats/token; ")


def run_eval(model, tokenizer, text: str, methods: list[Method], n_windows: int = 8, window_len: int = 512,
             group_size: int = 64, prefill: int = 64, step: int = 8, quanto_residual: int = 64,
             progress: bool = False, log: Callable[[str], None] = lambda s: None,
             calib_ids: torch.Tensor | None = None) -> list[MethodResult]:
    """Score ``methods`` on ``n_windows`` windows of ``text``. ``calib_ids``: the tokens xquant-auto
    calibrates on (default: see :func:`calibration_ids`)."""
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    windows = text_windows(ids, n_windows, window_len)
    chunks(window_len, prefill, step)  # validate the tiling before anything runs
    # The baseline is the model's own cache in fp16 at the window length: a sliding-window layer holds only
    # its window there (transformers' StaticCache too), so a hybrid model's bytes per token are an average.
    fp16_per_token = memory.fp16_kv_cache_bytes(model.config, 1, window_len) / window_len
    dtype_bytes = torch.finfo(model.dtype).bits // 8
    results = []
    calibrated: dict[tuple, tuple[XQuantConfig, str]] = {}
    for method in methods:
        start = time.perf_counter()
        desc = method.label
        note, source = "", "measured"
        try:
            if method.kind == "fp16":
                nll, n, held = eval_fp16(model, windows, prefill, step, desc, progress)
                per_token, source = fp16_per_token, "formula"
                note = (f"fp16 KV formula{_sliding_note(model.config)}; the model runs in {model.dtype} and its "
                        f"StaticCache held {held / window_len:.0f} B/token (measured)")
                mode = "real"
            elif method.kind.startswith("xquant"):
                if method.kind == "xquant-auto":
                    if calib_ids is None:
                        calib_ids = calibration_ids(tokenizer, text, n_windows, window_len)[0]
                    # :sim and real share one calibration
                    key = (method.target_ratio, method.base_layers, method.residual, method.sink, method.scale_format)
                    if key not in calibrated:
                        calibrated[key] = calibrated_config(model, method, calib_ids, group_size, window_len,
                                                            progress)
                    cfg, note = calibrated[key]
                else:
                    base = {} if method.base_layers is None else {"base_layers": method.base_layers}
                    cfg = XQuantConfig(bits=method.bits, group_size=group_size, rotation=method.rotation,
                                       cross_layer=method.kind == "xquant-cl", form=method.form,
                                       keep_channel0=method.keep_channel0, recent=method.residual,
                                       sink=method.sink, scale_format=method.scale_format, **base)
                report = memory.memory_report(model.config, cfg, window_len, dtype_bytes=dtype_bytes)
                if method.simulated:
                    nll, n = eval_simulated(model, windows, lambda: simulate_xquant(model, cfg), desc, progress)
                    per_token, source, mode = report.xquant.per_token_at, "formula", "simulated"
                else:
                    nll, n, held = eval_xquant_real(model, windows, cfg, prefill, step, desc, progress)
                    per_token, mode = held / window_len, "real"
                    note += f"XQuantCache.nbytes() = {held} B for {window_len} tokens; "
                if cfg.has_window:
                    note += (f"last {cfg.recent} + first {cfg.sink} rows also kept in 16 bits (in the "
                             "bytes); ")
                note += f"rebuild working memory (not cache) {report.rebuild_working_at} B"
                config = model.config
                kv_width = config.num_key_value_heads * getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)
                if cfg.form_of(config.hidden_size, kv_width) == "latent":
                    note = ("GQA latent form (key latent per channel, open group at bits + 4; value latent per token); "
                            + note)
            elif method.kind == "kivi":
                # the formula first: it refuses a model it cannot count before the evaluation runs
                kivi = memory.kivi_memory(model.config, method.bits, group_size, window_len, residual=method.residual)
                if method.residual:
                    nll, n = eval_kivi_window(model, windows, method.bits, group_size, method.residual, prefill,
                                              step, desc, progress)
                    note = (f"KIVI: K after RoPE per channel, V per token, the last {method.residual} tokens in "
                            "full precision (bytes: at fp16), simulated in the prefill + decode loop")
                else:
                    nll, n = eval_simulated(model, windows, lambda: simulate_kivi(model, method.bits, group_size),
                                            desc, progress)
                    note = "KIVI*: K before RoPE per channel, V per token, no fp16 window"
                per_token, source, mode = kivi.per_token_at, "formula", "simulated"
            elif method.kind == "hf-quanto":
                nll, n, held = eval_quanto(model, windows, method.bits, group_size, prefill, step,
                                           quanto_residual, desc, progress)
                per_token, mode = held / window_len, "real"
                note = (f"QuantizedCache(quanto), eager, residual_length={quanto_residual} kept in "
                        f"{model.dtype}; scale/zero in the model dtype")
            else:  # pragma: no cover - parse_methods refuses it
                raise ValueError(method.kind)
            ppl = math.exp(nll / n)
        except Exception as err:  # record why a method could not run instead of faking a number
            results.append(MethodResult(method.label, "failed", None, float("nan"), 0, None, "-",
                                        time.perf_counter() - start, note=f"{type(err).__name__}: {err}"))
            log(f"{method.label}: FAILED ({type(err).__name__}: {err})")
            continue
        result = MethodResult(method.label, mode, ppl, nll, n, per_token, source, time.perf_counter() - start,
                              note, ratio_to_fp16_kv=fp16_per_token / per_token)
        results.append(result)
        log(f"{method.label}: ppl {ppl:.3f} ({mode}), {per_token:.0f} B/token, {result.wall_s:.0f} s")
    base = next((r.perplexity for r in results if r.method == "fp16" and r.perplexity), None)
    if base is None:  # no fp16 row asked for: the simulated unquantized model is the reference
        nll, n = eval_simulated(model, windows, contextlib.nullcontext)
        base = math.exp(nll / n)
    for r in results:
        if r.perplexity is not None:
            r.change_vs_fp16 = r.perplexity / base - 1
    return results


# --------------------------------------------------------------------------------------------------
# output


def format_table(results: list[MethodResult]) -> str:
    head = ("| method | mode | perplexity | change vs unquantized | cache B/token | bytes source "
            "| x smaller than fp16 KV | wall s |")
    rows = [head, "|" + "---|" * 8]
    for r in results:
        if r.perplexity is None:
            rows.append(f"| {r.method} | failed | - | - | - | - | - | {r.wall_s:.0f} |")
            continue
        rows.append(f"| {r.method} | {r.mode} | {r.perplexity:.3f} | {100 * r.change_vs_fp16:+.2f}% | "
                    f"{r.bytes_per_token:.0f} | {r.bytes_source} | {r.ratio_to_fp16_kv:.2f} | {r.wall_s:.0f} |")
    return "\n".join(rows)


def plot(results: list[MethodResult], path: Path, title: str) -> None:
    """Perplexity change vs cache size relative to fp16 KV, one point per method (cf. the paper's Fig. 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {"fp16": "black", "kivi": "tab:orange", "hf-quanto": "tab:green", "xquant": "tab:blue",
              "xquant-cl": "tab:blue", "xquant-auto": "tab:purple"}
    for r in results:
        if r.perplexity is None:
            continue
        kind = r.method.split(":")[0]
        ax.scatter(1 / r.ratio_to_fp16_kv, 100 * r.change_vs_fp16, color=colors.get(kind, "gray"),
                   marker="o" if r.mode == "real" else "^", s=50)
        ax.annotate(r.method, (1 / r.ratio_to_fp16_kv, 100 * r.change_vs_fp16), textcoords="offset points",
                    xytext=(5, 4), fontsize=8)
    ax.set_xlabel("cache size / fp16 KV cache")
    ax.set_ylabel("perplexity change vs unquantized (%)")
    ax.set_yscale("symlog", linthresh=1)
    ax.grid(alpha=0.3)
    ax.set_title(title + "\n(o real path, ^ simulated)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(results: list[MethodResult], out_dir: Path, meta: dict) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    title = (f"{meta['model']} on {meta['text']}: {meta['windows']} windows x {meta['window_len']} tokens, "
             f"group {meta['group_size']}")
    table = format_table(results)
    notes = "\n".join(f"- **{r.method}**: {r.note}" for r in results if r.note)
    calibration = f" xquant-auto calibrated on {meta['calibration']}." if meta.get("calibration") else ""
    md = (f"# {title}\n\n{table}\n\nPrefill {meta['prefill']} tokens, then {meta['step']} tokens per decode "
          f"call (real paths). XQuant rotation: block Hadamard unless `:norot`.{calibration}\n\n{notes}\n\n"
          f"![perplexity vs memory](results.png)\n")
    paths = {"md": out_dir / "results.md", "json": out_dir / "results.json", "png": out_dir / "results.png"}
    paths["md"].write_text(md)
    paths["json"].write_text(json.dumps({"meta": meta, "results": [dataclasses.asdict(r) for r in results]},
                                        indent=1))
    plot(results, paths["png"], title)
    return paths


def eval_command(args: argparse.Namespace) -> None:
    """Perplexity and cache memory of fp16 / KIVI* / quanto KV quantization / XQuant on a real model."""
    methods = parse_methods(args.methods)
    model, tokenizer = models.load_model(args.model)
    text = models.load_text(args.text)
    meta = {"model": args.model, "text": args.text, "windows": args.windows, "window_len": args.window_len,
            "group_size": args.group_size, "prefill": args.prefill, "step": args.step,
            "torch": torch.__version__}
    calib_ids = None
    if any(m.kind == "xquant-auto" for m in methods):
        calib_text = None if args.calib_text is None else models.load_text(args.calib_text)
        calib_ids, where = calibration_ids(tokenizer, text, args.windows, args.window_len, calib_text,
                                           args.calib_tokens)
        meta["calibration"] = f"{where} ({args.calib_text or args.text})"
        print(f"xquant-auto calibrates on {meta['calibration']}")
    results = run_eval(model, tokenizer, text, methods, n_windows=args.windows, window_len=args.window_len,
                       group_size=args.group_size, prefill=args.prefill, step=args.step, progress=True, log=print,
                       calib_ids=calib_ids)
    paths = write_outputs(results, Path(args.out), meta)
    print(format_table(results))
    print("wrote " + ", ".join(str(p) for p in paths.values()))


def add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", help=eval_command.__doc__)
    p.add_argument("--model", default="smollm2-mha", help="smollm2-mha | smollm2-gqa | a local model directory")
    p.add_argument("--text", default="britannica", help="britannica | the path of a UTF-8 text file")
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help="comma list of fp16, kivi:B[:rR], hf-quanto:B, xquant:B[:norot][:sim], xquant-cl:B[:baseN], "
                        "xquant-auto:Rx[:sim] (see xq_compile/evaluate.py)")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--window-tokens", "--window-len", dest="window_len", type=int, default=512,
                   help="tokens per window, e.g. 2048 for a long-context table (prefill + a multiple of step)")
    p.add_argument("--calib-text", default=None,
                   help="text xquant-auto calibrates on (britannica | hamlet | a file); default: the tokens of "
                        "--text right after the evaluated windows")
    p.add_argument("--calib-tokens", type=int, default=512, help="calibration tokens for xquant-auto")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--prefill", type=int, default=64, help="tokens of the prefill chunk (real paths)")
    p.add_argument("--step", type=int, default=8, help="tokens per decode call (real paths)")
    p.add_argument("--out", default="results/")
    p.set_defaults(func=eval_command)
