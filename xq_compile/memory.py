"""Cache sizes as formulas: what an fp16 K/V cache would hold, and what the X cache holds."""

from __future__ import annotations

import dataclasses

import sympy

from .config import XQuantConfig
from .forms import form_for, layer_shapes
from .kivi import kivi_key_group

N = sympy.Symbol("n", positive=True, integer=True)  # cached tokens (the cache's capacity, max_cache_len)


def _dims(config) -> tuple[int, int, int, int]:
    config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, config.hidden_size, kv_heads, head_dim


def _fp16_kv_rows(config) -> list[tuple[int, sympy.Expr]]:
    """Per layer, (bytes of one token's fp16 K and V, rows held for a capacity of N): N, or a
    sliding-window layer's min(N, window), as the model's own transformers cache holds them."""
    return [(2 * shape.kv_width * 2, N if shape.sliding_window is None else sympy.Min(N, shape.sliding_window))
            for shape in layer_shapes(config)]


def fp16_kv_cache_bytes(config, batch_size: int, seq_len: int) -> int:
    """Bytes of an fp16 K and V cache of all layers for ``seq_len`` tokens (the paper's baseline; a
    sliding-window layer holds only its window, as in the model's own cache)."""
    return int(sum(width * rows for width, rows in _fp16_kv_rows(config)).subs(N, seq_len)) * batch_size


def _layer_form(config, xquant: XQuantConfig, layer: int):
    return form_for(xquant, layer, layer_shapes(config)[layer])


def _layer_bytes(config, xquant: XQuantConfig, layer: int, dtype_bytes: int) -> tuple[sympy.Expr, sympy.Expr]:
    """(bytes per token at large n, bytes for a capacity of N rows) of one layer's state, one sequence:
    the layer's cache form's state spec (what the cache allocates) evaluated at a symbolic capacity."""
    form = _layer_form(config, xquant, layer)
    return form.bytes_per_token(dtype_bytes), sympy.sympify(form.state_bytes(N, dtype_bytes))


def _xquant_token_bytes(config, xquant: XQuantConfig, dtype_bytes: int) -> sympy.Expr:
    """Bytes one cached token costs over all layers (at large n) + its int64 position."""
    layers = _dims(config)[0]
    return 8 + sum(_layer_bytes(config, xquant, i, dtype_bytes)[0] for i in range(layers))


def _xquant_total(config, xquant: XQuantConfig, batch: int, dtype_bytes: int) -> sympy.Expr:
    """Bytes the X state of all layers (and the shared int64 positions) holds for N rows, fixed part aside."""
    layers = _dims(config)[0]
    return batch * (8 * N + sum(_layer_bytes(config, xquant, i, dtype_bytes)[1] for i in range(layers)))


def xquant_cache_bytes(config, xquant: XQuantConfig, batch_size: int, seq_len: int, dtype_bytes: int = 4) -> int:
    """Bytes of the X state of all layers for ``seq_len`` rows, plus the shared int64 positions."""
    return int(_xquant_total(config, xquant, batch_size, dtype_bytes).subs(N, seq_len))


# --------------------------------------------------------------------------------------------------
# memory_report: the three caches side by side, as formulas in the sequence length and as numbers.


@dataclasses.dataclass(frozen=True)
class CacheMemory:
    """One cache layout: ``total`` = bytes for ``n`` tokens (sympy), its numbers at ``seq_len``.

    ``fixed`` is what does not grow with n (placeholders, counters, the Hadamard matrix), kept apart so
    the per-token cost is not flattered or inflated by it; ``total = per_token * n * batch + fixed``
    except where a term rounds up with n (KIVI keys' partial last group: ``total`` is then exact and
    ``per_token`` is the large-n rate).
    """

    name: str
    layout: str
    per_token: sympy.Expr  # bytes per token per sequence (batch row), the asymptotic rate
    total: sympy.Expr  # bytes for the whole batch, function of N
    fixed: int
    seq_len: int
    batch: int

    @property
    def total_at(self) -> int:
        return int(self.total.subs(N, self.seq_len))

    @property
    def per_token_at(self) -> float:
        """Measured-style bytes per token at seq_len: everything allocated / (batch * seq_len)."""
        return self.total_at / (self.batch * self.seq_len)


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    fp16_kv: CacheMemory
    kivi_kv: CacheMemory | None  # None for bits=None (nothing to quantize) and for layer_bits
    xquant: CacheMemory
    seq_len: int
    batch: int

    # Working memory of the rebuild, not cache: freed after each layer, it does not grow with the number
    # of layers. Plain XQuant materializes one X̂ [batch, n, hidden] in the model dtype at a time;
    # XQuant-CL keeps the fp32 accumulator X̂ plus one dequantized fp32 delta.
    rebuild_working: sympy.Expr = sympy.Integer(0)
    # The X state of each layer alone (what ``xquant`` sums over layers, without the shared int64
    # positions and the fixed bytes): for per-layer tables such as ``xq.explain``'s.
    xquant_layers: tuple[CacheMemory, ...] = ()

    @property
    def rebuild_working_at(self) -> int:
        return int(self.rebuild_working.subs(N, self.seq_len))

    def entries(self) -> list[CacheMemory]:
        return [e for e in (self.fp16_kv, self.kivi_kv, self.xquant) if e is not None]

    def ratio_to_fp16(self, entry: CacheMemory) -> float:
        """How many times smaller than the fp16 KV cache, at seq_len (fixed overhead included)."""
        return self.fp16_kv.total_at / entry.total_at

    def ratio_to_fp16_limit(self, entry: CacheMemory) -> sympy.Expr:
        """The same ratio as n -> infinity (the paper's number: fixed overhead vanishes)."""
        return sympy.nsimplify(self.fp16_kv.per_token / entry.per_token)

    def as_dict(self) -> dict:
        return {
            "seq_len": self.seq_len, "batch": self.batch,
            "rebuild_working_formula": str(self.rebuild_working), "rebuild_working_bytes": self.rebuild_working_at,
            "caches": {
                e.name: {"layout": e.layout, "per_token_formula": str(e.per_token), "total_formula": str(e.total),
                         "fixed_bytes": e.fixed, "total_bytes": e.total_at, "bytes_per_token": e.per_token_at,
                         "ratio_to_fp16_kv": self.ratio_to_fp16(e),
                         "ratio_to_fp16_kv_limit": float(self.ratio_to_fp16_limit(e))}
                for e in self.entries()
            },
        }


def kivi_memory(model_config, bits: int, group_size: int, seq_len: int, batch: int = 1,
                residual: int = 0) -> CacheMemory:
    """KIVI's quantized K/V cache as a formula (no allocator is measured).

    Keys per *channel* in groups of ``group_size`` tokens (a partial last group still pays a full
    scale+zero: ``ceiling(n/g)``), values per *token* in groups of ``group_size`` channels; codes densely
    packed (bits/8 bytes per element) plus one fp16 scale and one fp16 zero per group. With ``residual``
    R > 0 the R most recent tokens' K and V are in fp16 instead (KIVI's full-precision window; R = 0 is
    KIVI*): ``max(n - R, 0)`` quantized rows + ``min(n, R)`` fp16 rows; a window shorter than the group
    quantizes keys in groups of R tokens (:func:`~xq_compile.kivi.kivi_key_group`).
    """
    sliding = sum(rows != N for _, rows in _fp16_kv_rows(model_config))
    if sliding:
        raise ValueError(
            f"KIVI's memory formula counts every layer's K/V at full length; this model has {sliding} sliding-window "
            "layers, which hold only their window. Compare KIVI on a model without sliding-window layers.")
    layers, _, kv_heads, head_dim = _dims(model_config)
    kv_dim, g, B = kv_heads * head_dim, group_size, batch
    key_group = kivi_key_group(g, residual)
    quantized = sympy.Max(N - residual, 0)
    codes = sympy.Rational(bits, 8) * kv_dim  # bytes of codes per token, K or V
    key_params = 4 * kv_dim * sympy.ceiling(quantized / key_group)  # fp16 scale+zero per channel per token-group
    value_params = 4 * sympy.Rational(kv_dim, g)  # per token: fp16 scale+zero per channel-group
    window = 2 * 2 * kv_dim * sympy.Min(N, residual)  # K and V rows in fp16
    total = layers * B * (2 * codes * quantized + key_params + value_params * quantized + window)
    rate = layers * (2 * codes + 4 * sympy.Rational(kv_dim, key_group) + 4 * sympy.Rational(kv_dim, g))
    window_text = f", the last {residual} tokens in fp16" if residual else ""
    return CacheMemory(
        "kivi_kv", f"KIVI: K per channel (groups of {key_group} tokens), V per token (groups of {g} channels), "
        f"{bits}-bit codes + fp16 scale/zero{window_text}", rate, total, 0, seq_len, B)


def memory_report(model_config, xquant: XQuantConfig, seq_len: int, batch: int = 1,
                  dtype_bytes: int = 4) -> MemoryReport:
    """fp16 KV vs KIVI-style quantized KV vs XQuant, for ``seq_len`` tokens of ``batch`` sequences.

    * fp16 KV: K and V of every layer, 2 bytes per element (the paper's baseline; no overhead counted).
    * quantized KV (KIVI* grouping, same bits and group size as the X cache, no fp16 window; see
      :func:`kivi_memory`; ``None`` with ``layer_bits``, which has no one width to compare at, and for a
      model with sliding-window layers).

    A sliding-window layer holds min(n, window) rows in both: the model's own K/V in fp16 K/V, and in
    XQuant its form's (:mod:`xq_compile.forms.window`: the X window's codes and scales, or the model's K/V
    window in the cache dtype with an int64 length counter as its fixed bytes): its bytes stop growing at
    the window (the shared int64 position per token still grows with n).
    * XQuant: exactly what :class:`~xq_compile.cache.XQuantCache` allocates (``nbytes()``): per token,
      every layer's packed codes + its scales (fp16 scale/zero per group, or log8's compact ones) at that
      layer's bits (``layer_bits``, or XQuant-CL
      base layers at ``base_bits``; X in ``dtype_bytes`` when unquantized) + one int64 position; fixed, per layer a 1-element K and a 1-element V placeholder (``dtype_bytes``
      each) and an int64 length counter, plus the fp32 Hadamard block (group²·4) with rotation.
    """
    layers, hidden, _, _ = _dims(model_config)
    xquant.check_layer_count(layers)
    B = batch

    fp16_rows = _fp16_kv_rows(model_config)
    fp16_per_token = sum(width for width, rows in fp16_rows if rows == N)
    sliding = len(fp16_rows) - sum(rows == N for _, rows in fp16_rows)
    fp16 = CacheMemory("fp16_kv", "K and V of all layers in fp16" + (
        f" ({sliding} sliding-window layers: their window only)" if sliding else ""),
        sympy.Integer(fp16_per_token), B * sum(width * rows for width, rows in fp16_rows), 0, seq_len, B)

    kivi = None
    if xquant.bits is not None and xquant.layer_bits is None and not sliding:
        kivi = kivi_memory(model_config, xquant.bits, xquant.group_size, seq_len, batch)

    xq_per_token = _xquant_token_bytes(model_config, xquant, dtype_bytes)
    fixed = sum(_layer_form(model_config, xquant, i).fixed_bytes(dtype_bytes) for i in range(layers))
    if xquant.rotation == "hadamard":
        fixed += xquant.group_size ** 2 * 4
    xq_total = _xquant_total(model_config, xquant, B, dtype_bytes) + fixed
    x_cache = CacheMemory("xquant", xquant.describe(), sympy.nsimplify(xq_per_token), xq_total, fixed,
                         seq_len, B)
    per_layer = []
    for i in range(layers):
        rate, rows = _layer_bytes(model_config, xquant, i, dtype_bytes)
        what = _layer_form(model_config, xquant, i).describe()
        per_layer.append(CacheMemory(f"xquant_layer{i}", f"layer {i}: {what}", rate, B * rows, 0, seq_len, B))
    working = (2 * 4 if xquant.cross_layer else dtype_bytes) * B * N * hidden
    return MemoryReport(fp16, kivi, x_cache, seq_len, B, working, tuple(per_layer))
