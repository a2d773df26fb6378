"""The positions of the cached rows, and the cache length after a call's write, with their checks.

The CPU rebuild covers the n = max(positions) + 1 cached rows, a data-dependent size that the
rewrite reads with ``.item()`` and bounds for the shape system (``torch._check``: S <= n <= L). A
bound that fails at run time would surface as Inductor's bare ``RuntimeError: u1 <= 32``; this op
refuses such positions first, with a message that says what is wrong. It is an opaque custom op
whose result feeds the ``.item()``, so it always runs before the bounds are asserted.
"""

from __future__ import annotations

import operator

import torch


def _check_positions(positions: torch.Tensor, max_rows: int, consecutive: bool) -> int:
    """1 + the highest of ``positions`` once they are known to fit; else a ValueError that says why.

    ``max_rows``: the cache's rows (max_cache_len). ``consecutive``: the cache form stores tokens in
    order (the GQA key latent), so the positions must be p, p+1, ..., p+S-1.
    """
    flat = positions.reshape(-1)
    low, high, count = int(flat.min()), int(flat.max()), flat.numel()
    if low < 0:
        raise ValueError(f"xquant: cache position {low} is negative; positions index the cache rows "
                         f"0..{max_rows - 1}.")
    if high >= max_rows:
        raise ValueError(
            f"xquant: cache position {high} is past the end of the cache ({max_rows} rows, positions "
            f"0..{max_rows - 1}). Allocate a longer cache (gpt-fast: setup_caches(max_seq_length=...); "
            "XQuantCache or StaticCache: max_cache_len=...).")
    if high + 1 < count:
        raise ValueError(f"xquant: the call writes {count} tokens but its highest cache position is {high}: "
                         "the positions a call writes must be distinct.")
    if consecutive and not torch.equal(flat, torch.arange(low, low + count, device=flat.device, dtype=flat.dtype)):
        raise ValueError(f"xquant: the GQA latent cache stores tokens in order, but the call writes positions "
                         f"{flat.tolist()}: write consecutive positions p, p+1, ... (or use form='x').")
    return high + 1


@torch.library.custom_op("xq_compile::rows_after_write", mutates_args=())
def rows_after_write(positions: torch.Tensor, max_rows: int, consecutive: bool) -> torch.Tensor:
    """1 + the highest of ``positions`` (a 0-d int64 tensor) once they are known to fit (_check_positions)."""
    return torch.tensor(_check_positions(positions, max_rows, consecutive), dtype=torch.int64,
                        device=positions.device)


@rows_after_write.register_fake
def _(positions, max_rows, consecutive):
    return positions.new_empty((), dtype=torch.int64)


@torch.library.custom_op("xq_compile::checked_positions", mutates_args=())
def checked_positions(positions: torch.Tensor, max_rows: int, consecutive: bool) -> torch.Tensor:
    """A copy of ``positions`` once they are known to fit (_check_positions).

    For the rebuilds that keep the length on the device (rebuild="op"), on CPU: nothing there reads the
    positions on the host, so a position past the end would surface as Inductor's bare "index out of
    bounds" from whichever kernel indexes first. Every store reads this copy instead, so the check runs
    before any of them.
    """
    _check_positions(positions, max_rows, consecutive)
    return positions.clone()


@checked_positions.register_fake
def _(positions, max_rows, consecutive):
    return torch.empty_like(positions)


def emit_positions_and_length(ctx) -> None:
    """Once per graph, before the first store: record the positions the new rows are written with
    (RoPE is re-applied to rebuilt keys at them), and the number n of rows cached after this call."""
    graph_state, emit, index, site, layer = ctx.graph_state, ctx.emit, ctx.index, ctx.site, ctx.layer
    fetch_layer = ctx.fetch_layer
    positions = graph_state.add_input(("positions",), "positions", lambda args: fetch_layer(args).positions)
    graph_state.positions = positions
    if site.position_source is not None:
        if layer.positions.dim() == 2:  # one row of position ids per sequence (left padding)
            emit(lambda p, i, pos: p.index_copy_(1, i, pos.expand(p.shape[0], -1).to(p.dtype)),
                 positions, index, site.position_source)
        else:  # positions shared by the whole batch (the model indexes its tables with [S])
            emit(lambda p, i, pos: p.index_copy_(0, i, pos.to(p.dtype)), positions, index, site.position_source)
    if ctx.strategy.device_length:
        graph_state.length = emit(lambda i: i.max().reshape(1) + 1, index)
        return
    # checked first (clear errors for positions that do not fit), then bounded for the shape system
    length = emit(lambda i: rows_after_write(i, layer.max_cache_len, layer.form.consecutive_writes).item(), index)
    # The call writes seq_len distinct rows, so n >= seq_len: telling the shape system spares Inductor
    # guards on n it cannot decide (torch 2.11's CPU SDPA lowering asks n > 1).
    written = (max(1, site.seq_len) if isinstance(site.seq_len, int)
               else emit(lambda i: i.shape[0], index))  # dynamic: the index's (symbolic) length
    emit.check(graph_state.graph.call_function(operator.ge, (length, written)))
    emit.check(graph_state.graph.call_function(operator.le, (length, layer.max_cache_len)))
    graph_state.length = length
