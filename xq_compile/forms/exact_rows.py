"""Rows kept exact next to their codes: the last R and the first S rows (``XQuantConfig.recent`` / ``sink``).

Per-token quantization of a row does not depend on the other rows, so every row is still stored
quantized as without a window, and a *stream* of rows (X, the value latent, the key latent) adds, in
16 bits (``w`` = the stream's width):

  {stream}_recent       [B, R, w]   row p at slot p % R: the last R rows written
  {stream}_recent_rows  int32 [B, R] which row each slot holds (-1: none; a crop invalidates slots)
  {stream}_sink         [B, S, w]   row p < S at slot p

The rebuild dequantizes every row as before and replaces rows p >= n - R whose slot still holds p,
and rows p < S, by their exact copies: ``torch.where`` over row indices, so the shapes are static as
the window moves (no recompiles) and n may be a device tensor. Only the rows of the window cost twice
(codes and exact copy); that is what keeps the store independent of when a row leaves the window.

The copies are held at 16 bits: in the cache dtype when it has 2 bytes (bf16, fp16), in fp16 when it
is wider (an fp32 model), as the fp16 K/V cache the ratios are measured against holds its rows. An fp32
copy would double the window's bytes for no accuracy fp16 K/V has.
"""

from __future__ import annotations

import dataclasses

import torch

from ..config import XQuantConfig
from ..rotation import rotate
from .base import StateTensor

ROW_INDEX_DTYPE = torch.int32


@dataclasses.dataclass(frozen=True)
class ExactRows:
    """The window of one form: ``recent`` last rows and ``sink`` first rows kept at 16 bits."""

    recent: int
    sink: int

    @classmethod
    def of(cls, xquant: XQuantConfig, bits: int | None) -> "ExactRows | None":
        """The window of a layer with code width ``bits``, or None (no window, or unquantized rows)."""
        return cls(xquant.recent, xquant.sink) if xquant.has_window and bits is not None else None

    @staticmethod
    def row_dtype(dtype: torch.dtype) -> torch.dtype:
        """The dtype the window's rows are held in for a cache of ``dtype``: at most 2 bytes."""
        return dtype if dtype.itemsize <= 2 else torch.float16

    def spec(self, stream: str, batch, width: int, dtype: torch.dtype) -> dict[str, StateTensor]:
        spec = {}
        dtype = self.row_dtype(dtype)
        if self.recent:
            spec[f"{stream}_recent"] = StateTensor((batch, self.recent, width), dtype)
            spec[f"{stream}_recent_rows"] = StateTensor((batch, self.recent), ROW_INDEX_DTYPE)
        if self.sink:
            spec[f"{stream}_sink"] = StateTensor((batch, self.sink, width), dtype)
        return spec

    def describe(self) -> str:
        return f"last {self.recent} + first {self.sink} rows exact (16-bit)"

    # -- the rewrite --------------------------------------------------------------------------------
    def emit_store(self, ctx, stream: str, rows) -> None:
        """Emit the copy of this call's exact ``rows`` [B, s, w] (written at ``ctx.index``) into the window."""
        if self.recent:
            ctx.emit(store_recent, ctx.state[f"{stream}_recent"], ctx.state[f"{stream}_recent_rows"], ctx.index, rows)
        if self.sink:
            ctx.emit(store_sink, ctx.state[f"{stream}_sink"], ctx.index, rows)

    def emit_exact(self, ctx, stream: str, rows):
        """``rows`` [B, ctx.rows, w] (the dequantized rows) with the window's rows replaced by their exact copies."""
        st = ctx.state
        recent = (st[f"{stream}_recent"], st[f"{stream}_recent_rows"]) if self.recent else (None, None)
        return ctx.emit(with_exact_rows, rows, ctx.rows, ctx.length, *recent, st.get(f"{stream}_sink"))

    # -- the runtime ----------------------------------------------------------------------------------
    def after_crop(self, state: dict[str, torch.Tensor], stream: str, after: int) -> None:
        """Slots holding rows the crop removed no longer hold a window row: the rows they had
        replaced (at most min(R, removed) of the last R kept) fall back to their quantized copies."""
        if self.recent:
            slots = state[f"{stream}_recent_rows"]
            slots.masked_fill_(slots >= after, -1)

    # -- the torch reference ----------------------------------------------------------------------------
    def simulate(self, exact: torch.Tensor, approx: torch.Tensor, rotation: torch.Tensor | None = None) -> torch.Tensor:
        """``approx`` with the window's rows from ``exact`` (tokens on dim -2), the call taken as the whole
        sequence: what the compiled path rebuilds for a call that starts on an empty cache. The rows are
        rounded to :meth:`row_dtype` as the cache stores them: in the basis ``exact·rotation`` when the
        stream is stored rotated (X), else as given."""
        stored = rotate(exact, rotation) if rotation is not None else exact
        stored = stored.to(self.row_dtype(exact.dtype)).to(approx.dtype)
        held = rotate(stored, rotation) if rotation is not None else stored  # R⁻¹ = R
        p = torch.arange(exact.shape[-2], device=exact.device)
        keep = (p >= exact.shape[-2] - self.recent) | (p < self.sink)
        return torch.where(keep[:, None], held, approx)


def store_slots(target: torch.Tensor, rows: torch.Tensor, slot: torch.Tensor, keep: torch.Tensor):
    """Write row t of ``rows`` [B, s, w] at slot ``slot[t]`` of ``target`` [B, K, w] where ``keep[t]`` (at most
    one kept row per slot). Static shapes; no duplicate indices. Returns (source row, written) per slot."""
    match = keep[:, None] & (slot[:, None] == torch.arange(target.shape[1], device=slot.device))
    source, written = match.int().argmax(0), match.any(0)
    target.copy_(torch.where(written[None, :, None], rows.index_select(1, source).to(target.dtype), target))
    return source, written


def store_recent(ring: torch.Tensor, ring_rows: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> None:
    """Rows ``index`` [s] of this call into the ring [B, R, w] (row p at slot p % R): only the last R of
    them, the older ones of a long chunk would be overwritten in the same call."""
    r = ring.shape[1]
    source, written = store_slots(ring, rows, index % r, index > index.max() - r)
    held = index.index_select(0, source).to(ring_rows.dtype)
    ring_rows.copy_(torch.where(written[None, :], held[None, :], ring_rows))


def store_sink(sink: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> None:
    """Rows ``index`` [s] of this call that are among the first S into the sink [B, S, w]."""
    store_slots(sink, rows, index, index < sink.shape[1])


def with_exact_rows(rows: torch.Tensor, count, length, ring: torch.Tensor | None, ring_rows: torch.Tensor | None,
                    sink: torch.Tensor | None) -> torch.Tensor:
    """``rows`` [B, count, w] with rows p >= length - R that the ring holds, and rows p < S, exact."""
    p = torch.arange(count, device=rows.device)
    if ring is not None:
        r = ring.shape[1]
        slot = p % r
        held = (ring_rows.index_select(1, slot) == p) & (p >= length - r)
        rows = torch.where(held[..., None], ring.index_select(1, slot).to(rows.dtype), rows)
    if sink is not None:
        s = sink.shape[1]
        rows = torch.where((p < s)[None, :, None], sink.index_select(1, p.clamp(max=s - 1)).to(rows.dtype), rows)
    return rows
