"""XQuantConfig: what the X cache stores and how.

One frozen dataclass, validated on construction so that a bad setting fails where the user wrote it,
not deep inside a compiled graph. The same keys are accepted as ``torch.compile(..., options={...})``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

SUPPORTED_BITS = (2, 3, 4, 8)
ROTATIONS = ("none", "hadamard")
FORMS = ("auto", "x", "latent")
SCALE_FORMATS = ("fp16", "log8")


@dataclasses.dataclass(frozen=True)
class XQuantConfig:
    """How each layer's attention input X is cached.

    Args:
        bits: code width of the cached X: 2, 3, 4 or 8. ``None`` caches X unquantized in the model's
            dtype (exactly reproduces the unmodified model; useful as a reference and for debugging).
        group_size: channels that share one fp16 scale and one fp16 zero (per token). Must divide the
            hidden size; with rotation it must be a power of two (the block Hadamard size).
        rotation: ``"hadamard"`` rotates X by a block-diagonal Hadamard matrix of ``group_size`` before
            quantizing and folds the inverse into the K/V weights, so it costs nothing when rebuilding.
            It spreads the outlier channels of X inside each group (docs/design.md §2: 4-bit loss +13% -> +2%
            on SmolLM2). ``"none"`` quantizes X as it is (the paper's plain XQuant).
        cross_layer: XQuant-CL. Layer i caches the delta Q(X_i - X̂_{i-1}) against the *reconstructed*
            X of the layer below (closed loop: errors do not pile up); an accumulator carries X̂ up the
            layers when rebuilding, so each layer reads one delta. Needs every layer in one graph.
        base_layers: with cross_layer, the first layers store X itself (not a delta), at ``base_bits``;
            the last of them seeds the accumulator.
        base_bits: code width of the base layers (``None``: unquantized).
        form: what a layer caches. ``"x"``: X itself. ``"latent"``: the GQA latents X·U_k and X·U_v
            (SVD of the K/V weights; see :mod:`xq_compile.latent`): the key latent quantized per channel
            in groups of ``group_size`` tokens (the group still filling at ``bits`` + 4 bits per channel,
            quantized at ``bits`` when it completes), the value latent per token (rotated with ``rotation``). ``"auto"`` (default): the latent form where X is wider than
            K+V (grouped-query attention with group > 2), X otherwise.
        keep_channel0: latent form only: keep channel 0 of the key latent (the largest singular
            direction, which carries the outliers) in fp16 for every token (+2 bytes per token per layer).
        absorb_values: in decode steps, compute attention as (softmax·X̂)·W_vᵀ instead of rebuilding V
            for every cached row (V has no RoPE); exact up to rounding. ``False`` rebuilds V, for
            comparison.
        layer_bits: one code width (2, 3, 4 or 8) per attention layer, in layer order; when given it
            decides every layer's width and ``bits`` / ``base_bits`` are not used for the cache
            (with ``cross_layer`` the layers above ``base_layers`` still store deltas, at their own
            width). :func:`xq_compile.calibrate` picks it for a memory target.
        recent: keep the last ``recent`` cached rows also at 16 bits (a ring of that many rows
            per layer), and rebuild them from it instead of from their codes: the tokens attention
            weighs most are exact. Every row is still stored quantized too (its codes serve once it
            leaves the window), so the window costs ``recent`` 16-bit rows (the cache dtype, fp16 for
            an fp32 cache) per layer on top. With XQuant-CL the chain of deltas runs on the quantized
            rows only (closed loop at every length); the exact rows replace them in what K and V are
            projected from.
        sink: the same for the first ``sink`` rows (attention sinks: the first tokens draw large
            attention weights whatever they say).
        scale_format: how each quantized row stores its per-group scale and zero. ``"fp16"``
            (default): one fp16 scale and one fp16 zero per group (4 bytes per group). ``"log8"``: one
            fp16 scale per row (the largest group scale) and per group one byte of log scale
            (S·2^(-u/16)) and one byte of zero (on a 1/255 grid of the code range): 2 + 2·G bytes per
            row instead of 4·G (20 instead of 36 at hidden 576, group 64), for slightly coarser
            ranges (each group's range widens by up to 4.4%; never clipped). X forms only (not the
            GQA latent forms); decoded to fp16 scale/zero before the rebuild, so the kernels are the
            same. See :mod:`xq_compile.quant`.
    """

    bits: int | None = 4
    group_size: int = 64
    rotation: str = "hadamard"
    cross_layer: bool = False
    base_layers: int = 3
    base_bits: int | None = 4
    absorb_values: bool = True
    form: str = "auto"
    keep_channel0: bool = False
    layer_bits: tuple[int, ...] | None = None
    recent: int = 0
    sink: int = 0
    scale_format: str = "fp16"

    def __post_init__(self) -> None:
        self._check_window()
        self._check_scale_format()
        if self.layer_bits is not None:
            # A tuple, so that the frozen config stays hashable (options= may pass a list).
            object.__setattr__(self, "layer_bits", tuple(self.layer_bits))
            wrong = [b for b in self.layer_bits if b not in SUPPORTED_BITS]
            if wrong or not self.layer_bits:
                raise ValueError(
                    f"XQuantConfig.layer_bits={self.layer_bits!r}: give one width per layer, each one of "
                    f"{SUPPORTED_BITS} (use bits=None, not layer_bits, for an unquantized cache)."
                )
        if self.bits is not None and self.bits not in SUPPORTED_BITS:
            raise ValueError(
                f"XQuantConfig.bits={self.bits!r} is not supported: use one of {SUPPORTED_BITS}, "
                "or bits=None to cache X unquantized."
            )
        if not isinstance(self.group_size, int) or self.group_size < 2:
            raise ValueError(f"XQuantConfig.group_size must be an integer >= 2, got {self.group_size!r}.")
        if self.base_bits is not None and self.base_bits not in SUPPORTED_BITS:
            raise ValueError(f"XQuantConfig.base_bits={self.base_bits!r}: use one of {SUPPORTED_BITS} or None.")
        if not isinstance(self.base_layers, int) or self.base_layers < 1:
            raise ValueError(
                f"XQuantConfig.base_layers must be >= 1 (the last base layer seeds the cross-layer "
                f"accumulator), got {self.base_layers!r}."
            )
        if self.form not in FORMS:
            raise ValueError(f"XQuantConfig.form={self.form!r}: use one of {FORMS}.")
        if self.keep_channel0 and self.form == "x":
            raise ValueError("keep_channel0 applies to the latent form only; use form='latent' or 'auto'.")
        if self.rotation not in ROTATIONS:
            raise ValueError(f"XQuantConfig.rotation={self.rotation!r}: use one of {ROTATIONS}.")
        if self.rotation == "hadamard" and self.group_size & (self.group_size - 1):
            raise ValueError(
                f"rotation='hadamard' needs a power-of-two group_size (the Hadamard block size), got "
                f"{self.group_size}. Use group_size=64 or 128, or rotation='none'."
            )

    def _check_window(self) -> None:
        for name in ("recent", "sink"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"XQuantConfig.{name} must be an integer >= 0 (rows kept exact), got {value!r}.")
        if (self.recent or self.sink) and not self.quantized:
            raise ValueError("XQuantConfig.recent/sink keep rows exact next to quantized ones; with bits=None every "
                             "row is exact already: set bits (e.g. bits=2) or leave recent=0, sink=0.")

    def _check_scale_format(self) -> None:
        if self.scale_format not in SCALE_FORMATS:
            raise ValueError(f"XQuantConfig.scale_format={self.scale_format!r}: use one of {SCALE_FORMATS}.")
        if self.scale_format == "fp16":
            return
        if not self.quantized:
            raise ValueError("XQuantConfig.scale_format='log8' compacts the scales of quantized rows; with bits=None "
                             "there are none: set bits (e.g. bits=3) or leave scale_format='fp16'.")
        if self.form == "latent" or self.keep_channel0:
            raise ValueError("XQuantConfig.scale_format='log8' applies to the X forms only, not to the GQA latent "
                             "form (form='latent', keep_channel0): use form='x' or 'auto', or scale_format='fp16'.")

    @property
    def has_window(self) -> bool:
        """Whether some rows are kept exact (``recent`` or ``sink``)."""
        return bool(self.recent or self.sink)

    def check_window_fits(self, max_cache_len: int) -> None:
        """Refuse a window that holds the whole cache: every row would be exact and the codes wasted."""
        if self.has_window and self.recent + self.sink >= max_cache_len:
            raise ValueError(
                f"XQuantConfig recent={self.recent} + sink={self.sink} rows kept exact >= max_cache_len="
                f"{max_cache_len}: every cached row would be exact and its quantized copy wasted. Use a "
                "smaller window, or bits=None for an unquantized cache."
            )

    @property
    def quantized(self) -> bool:
        return self.bits is not None or self.layer_bits is not None

    def bits_of_layer(self, layer_idx: int) -> int | None:
        """Code width of one layer's cached rows: ``layer_bits[layer_idx]`` when given, else ``bits``
        (base layers of XQuant-CL: ``base_bits``)."""
        if self.layer_bits is not None:
            if not 0 <= layer_idx < len(self.layer_bits):
                raise ValueError(
                    f"XQuantConfig.layer_bits has {len(self.layer_bits)} entries, but the model has a layer "
                    f"{layer_idx}: give one width per attention layer."
                )
            return self.layer_bits[layer_idx]
        if self.cross_layer and layer_idx < self.base_layers:
            return self.base_bits
        return self.bits

    def stores_delta(self, layer_idx: int) -> bool:
        """Whether the layer caches X - X̂ of the layer below (XQuant-CL above the base layers)."""
        return self.cross_layer and layer_idx >= self.base_layers

    def check_layer_count(self, num_layers: int) -> None:
        """Refuse ``layer_bits`` of another length than the model's number of layers."""
        if self.layer_bits is not None and len(self.layer_bits) != num_layers:
            raise ValueError(
                f"XQuantConfig.layer_bits has {len(self.layer_bits)} entries but the model has {num_layers} "
                "attention layers: give one width per layer."
            )

    def form_of(self, hidden_size: int, kv_width: int) -> str:
        """``"x"`` or ``"latent"`` for a layer with input width ``hidden_size`` and K (= V) width
        ``kv_width`` (K/V heads x head dim). ``auto`` picks the latent form where X is wider than K+V."""
        if self.form != "auto":
            return self.form
        return "latent" if hidden_size > 2 * kv_width else "x"

    def check_hidden_size(self, hidden_size: int, what: str = "the hidden size") -> None:
        """Refuse a width the groups (and Hadamard blocks) cannot tile exactly."""
        if hidden_size % self.group_size:
            divisors = [g for g in (16, 32, 64, 128, 256) if hidden_size % g == 0]
            raise ValueError(
                f"group_size={self.group_size} does not divide {what} {hidden_size}; "
                f"choose a group size that does (e.g. {divisors or 'a divisor of it'})."
            )

    def effective_bits(self) -> float:
        """Bits per cached element, scales and zeros included (paper: b + 32/g; log8: b + 16/g, not
        counting the fp16 row scale, 16/d); with ``layer_bits`` the mean over the layers."""
        metadata = (16.0 if self.scale_format == "log8" else 32.0) / self.group_size
        if self.layer_bits is not None:
            return sum(self.layer_bits) / len(self.layer_bits) + metadata
        if self.bits is None:
            return 16.0
        return self.bits + metadata

    def describe(self) -> str:
        name = "XQuant-CL" if self.cross_layer else "XQuant"
        bits = "unquantized" if self.bits is None else f"{self.bits}-bit g{self.group_size}"
        if self.layer_bits is not None:
            bits = f"per-layer bits {''.join(map(str, self.layer_bits))} g{self.group_size}"
        base = ""
        if self.cross_layer and self.layer_bits is not None:
            base = f", first {self.base_layers} layers store X"
        elif self.cross_layer:
            base_bits = "unquantized" if self.base_bits is None else f"{self.base_bits}-bit"
            base = f", first {self.base_layers} layers {base_bits}"
        form = "" if self.form == "auto" else f", form={self.form}"
        if self.keep_channel0:
            form += ", key latent channel 0 in fp16"
        if self.has_window:
            form += f", exact rows: last {self.recent} + first {self.sink}"
        if self.scale_format != "fp16":
            form += f", {self.scale_format} scales"
        return f"{name} {bits}{base}, rotation={self.rotation}{form}"

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> "XQuantConfig":
        """Build from ``torch.compile(options=...)``; unknown keys are an error, not silently ignored."""
        options = dict(options or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown xquant option(s) {unknown}; valid keys are {sorted(known)}.")
        return cls(**options)
