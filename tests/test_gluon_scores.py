"""The Gluon scores kernel of ``xq_compile::decode_attention`` (opt-in: config ``gluon=1``, W streamed, or
``gluon=2``, the head tile's W resident in shared memory; ``xq_compile.kernels.decode_attention.gluon_scores``).

Gluon kernels do not run under the Triton interpreter. On CPU: the configuration key, the reasons the kernel
declines inputs (a clear error, never a wrong result), what ``gluon="auto"`` picks (under the interpreter it
falls back to the Triton kernel exactly: ``tests/test_decode_attention.py``'s first interpreter shard),
what it compiles to for sm_90 (``tests/test_compile_report.py``: on wgmma with one MMA group left in flight,
no spills in the loop, for every supported width under triton 3.9 and 3.6), and its values under the Gluon
emulator (``tests/gluon_emulator.py``: the kernel's own code program by program, its asynchronous MMAs and
copies checked for races; stage 2 under the Triton interpreter, in subprocesses): the cases the GPU tests
run, at fewer rows, against the torch reference and stage 1 against the Triton scores kernel's, vLLM's
pages, and faults injected into its waits and fences caught. On a Hopper GPU (skipped elsewhere;
``scripts/gpu_check.sh`` runs them with the other ``-k cuda`` tests): the same on the hardware, real sizes,
CUDA graphs.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
import types
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from test_decode_attention import HAS_TRITON, OP, Case, _subprocess_env, _to, check_close, inputs, make_inputs
from test_paged_decode_attention import CUDA_CASES as PAGED_CUDA_CASES
from test_paged_decode_attention import PagedCase, make_paged
from xq_compile.kernels import decode_attention as da
from xq_compile.kernels.decode_attention import gluon_scores as gs
from xq_compile.kernels.devices import GpuTarget

HOPPER = GpuTarget(capability=90, multiprocessors=132, shared_memory=227 * 1024)
ADA = GpuTarget(capability=89, multiprocessors=58, shared_memory=99 * 1024)
needs_hopper = pytest.mark.skipif(
    not (gs.HAS_GLUON and HAS_TRITON and torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9),
    reason="needs triton with Gluon and a Hopper GPU (sm_90)",
)

# A case the kernel takes: per-token 4-bit keys in groups of 64, a key width and a head size its tiles fit.
SUPPORTED = Case(B=1, Hq=4, Hkv=2, D=64, C=256, L=300, n=257, k_bits=4, k_group=64, S=2, mask="bool",
                 dtype=torch.bfloat16)


def _call(case: Case | dict, target: GpuTarget, config: dict) -> tuple:
    """The arguments the launcher gives ``gs.unsupported`` and ``gs.choose`` for ``case`` (or the op
    arguments ``case``) on ``target``."""
    a = inputs(make_inputs(case) if isinstance(case, Case) else case)
    cfg = da.resolve_config(a, target=target, **{"gluon": 1, **config})
    shapes = a.check()
    half_pad = da.config.pow2_at_least_16(shapes.head_dim // 2)
    r_pad = da.config.pow2_at_least_16(shapes.q_heads // shapes.kv_heads * shapes.seq)
    block_h = min(cfg["block_h"], 1 << max(shapes.kv_heads - 1, 0).bit_length())
    return a, cfg, target, half_pad, r_pad, block_h


def _declined_as_expected(case: Case, config: dict, why: str) -> bool:
    """Whether the kernel declined ``config`` for one of the two reasons the GPU cases meet: W resident where
    the head tile's slice does not fit (7B, GQA), or warp-specialized 8-bit keys in 128-row tiles."""
    if config["gluon"] == 2 and "whole W slice resident" in why:
        return True
    return bool(config.get("gluon_ws")) and case.k_bits == 8 and "8-bit keys in 128-row tiles" in why


def _why(case: Case | dict, target: GpuTarget = HOPPER, **config) -> str | None:
    return gs.unsupported(*_call(case, target, config))


def _auto(case: Case | dict, target: GpuTarget = HOPPER, **config) -> int:
    return gs.choose(*_call(case, target, {**config, "gluon": da.GLUON_AUTO}))


def test_gluon_is_opt_in_and_checked():
    a = inputs(make_inputs(SUPPORTED))
    assert da.resolve_config(a, target=HOPPER)["gluon"] == 0  # the Triton scores kernel unless asked
    assert da.resolve_config(a, target=HOPPER, gluon=1)["gluon"] == 1
    assert da.resolve_config(a, target=HOPPER, gluon="auto")["gluon"] == "auto"
    with da.config_overrides(gluon="auto"):
        assert da.resolve_config(a, target=HOPPER)["gluon"] == "auto"
    for bad in (3, "fast"):
        with pytest.raises(ValueError, match=f"gluon={bad!r} must be 0"):
            da.resolve_config(a, gluon=bad)


def test_warp_specialization_is_opt_in_and_checked():
    a = inputs(make_inputs(SUPPORTED))
    assert da.resolve_config(a, target=HOPPER, gluon=1)["gluon_ws"] == 0
    assert da.resolve_config(a, target=HOPPER, gluon="auto", gluon_ws=1)["gluon_ws"] == 1
    with pytest.raises(ValueError, match="gluon_ws=2 must be 0"):
        da.resolve_config(a, target=HOPPER, gluon=1, gluon_ws=2)
    # alone it would silently do nothing (the default runs the Triton kernel): refused, saying what to add
    with pytest.raises(ValueError, match="gluon_ws=1 .* set gluon to 1, 2 or 'auto'"):
        da.resolve_config(a, target=HOPPER, gluon_ws=1)
    with da.config_overrides(gluon_ws=1):  # (an override may come before the gluon it goes with)
        assert da.resolve_config(a, target=HOPPER, gluon=2)["gluon_ws"] == 1


@pytest.mark.skipif(not gs.HAS_GLUON, reason="triton without Gluon")
def test_warp_specialized_plan_hands_over_one_slot_per_stage():
    """gluon_ws=1: W streamed, one X̂ slot per W stage (handed over together); W resident, two X̂ slots; the
    dequantizing warps' registers 184 next to two MMA warpgroups and, next to one, none where the count is
    optional (else 128); 8-bit keys in 128-row tiles declined, saying what runs them."""
    a = inputs(make_inputs(SUPPORTED))
    for gluon, block_n in itertools.product((1, 2), (64, 128)):
        cfg = da.resolve_config(a, target=HOPPER, gluon=gluon, gluon_ws=1, block_n=block_n, block_h=1)
        _, tile = gs.plan(a, cfg, HOPPER, 32, 16, 1, 2, 8)
        assert tile["WARP_SPECIALIZE"] and tile["DEQUANT_WARPS"] == 4 and tile["num_warps"] == block_n // 16
        assert tile["X_BUFS"] == 2 if gluon == 2 else tile["X_BUFS"] == tile["NUM_STAGES"] == 3, tile
        regs = tile["DEQUANT_REGS"]
        assert regs == 184 if block_n == 128 else regs in (0, 128), tile
        _, plain = gs.plan(a, {**cfg, "gluon_ws": 0}, HOPPER, 32, 16, 1, 2, 8)
        assert not plain["WARP_SPECIALIZE"] and plain["X_BUFS"] == 2 and plain["DEQUANT_REGS"] == 0
    eight = replace(SUPPORTED, k_bits=8)
    assert "8-bit keys in 128-row tiles" in _why(eight, gluon=1, gluon_ws=1, block_n=128)
    assert _why(eight, gluon=1, gluon_ws=1, block_n=64) is None and _why(eight, gluon=1, block_n=128) is None


@pytest.mark.skipif(not gs.HAS_GLUON, reason="triton without Gluon")
def test_auto_runs_the_gluon_kernel_where_it_can_and_triton_elsewhere():
    """gluon="auto" keeps W resident where the head tile's slice fits, streams it where only that fits, and
    leaves every other call to the Triton scores kernel -- never an error."""
    big = replace(SUPPORTED, Hq=4, Hkv=4, D=128, C=4096, k_group=128)  # a 7B layer's 2 MB W slice per head tile
    assert _auto(SUPPORTED) == 2
    assert _auto(big, block_n=128, block_h=2) == 1
    assert _auto(replace(SUPPORTED, k_bits=3)) == 0
    assert _auto(SUPPORTED, target=ADA) == 0
    assert _auto(replace(SUPPORTED, k_group=32)) == 0
    for extra in (dict(window=64), dict(soft_cap=30.0), dict(k_norm=True)):  # Gemma, Qwen3, Mistral's window
        assert "no sliding window, soft cap or key norm" in _why(replace(SUPPORTED, **extra)), extra
        assert _auto(replace(SUPPORTED, **extra)) == 0, extra


@pytest.mark.skipif(not gs.HAS_GLUON, reason="triton without Gluon")
def test_paged_sources_are_taken():
    """vLLM's paged cache (per-token sources in pages, a block table, a fill per request): the Gluon kernel
    reads its rows through the table, so it takes paged calls that it takes dense; what it does not decode
    it declines paged as dense (here 3-bit keys)."""
    _, paged = make_paged(PagedCase(replace(SUPPORTED, B=3, L=320), (300, 0, 17), 16))
    assert paged["block_table"] is not None and _why(paged) is None and _auto(paged) == 2
    _, three = make_paged(PagedCase(replace(SUPPORTED, B=2, L=320, k_bits=3), (300, 17), 16))
    assert "3-bit keys" in _why(three) and _auto(three) == 0


@pytest.mark.skipif(not gs.HAS_GLUON, reason="triton without Gluon")
def test_plan_sizes_the_grid_and_the_stages():
    """gluon=1: one row block per program, 3 W stages; gluon=2: every step's W tile resident and programs that
    loop over the row blocks, enough of them to occupy every multiprocessor (never more than the blocks)."""
    a = inputs(make_inputs(SUPPORTED))  # 256 channels: 4 steps of 64
    for gluon, head_programs, row_blocks in ((1, 2, 64), (2, 2, 64), (2, 2, 3), (2, 400, 64)):
        cfg = da.resolve_config(a, target=HOPPER, gluon=gluon, block_n=64, block_h=1)
        programs, tile = gs.plan(a, cfg, HOPPER, 32, 16, 1, head_programs, row_blocks)
        assert tile["num_warps"] == 4 and tile["W_RESIDENT"] == (gluon == 2)
        if gluon == 1:
            assert (programs, tile["NUM_STAGES"]) == (row_blocks, 3)
            continue
        assert tile["NUM_STAGES"] == 4 and 1 <= programs <= row_blocks
        assert programs == row_blocks or programs * head_programs >= HOPPER.multiprocessors
    with pytest.raises(ValueError, match="gluon=2: .*Leave gluon at 0"):
        big = inputs(make_inputs(replace(SUPPORTED, Hq=4, Hkv=4, D=128, C=4096, k_group=128)))
        gs.plan(big, da.resolve_config(big, target=HOPPER, gluon=2, block_h=2), HOPPER, 64, 16, 2, 2, 64)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_launcher_declines_with_a_clear_error(monkeypatch):
    """Asked for where it cannot run (here: CPU tensors, i.e. the Triton interpreter), the launcher raises
    saying why and what to do, before launching anything."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match="gluon=1: .*cannot run this call: .*Leave gluon at 0"):
        da.decode_attention_triton(inputs(make_inputs(SUPPORTED)), gluon=1)


# On a Hopper GPU: real shapes and the edges of the kernel's cases (per token 2/4/8 bits, per channel with
# col0 and the open token group from the tail, bias, both masks, RoPE tables and positions, S = 1 to 16,
# a head size that is not a power of two, fp16, n = 1, one and two warpgroups).
CUDA_CASES = [
    # SmolLM2's MHA X cache (576 channels, 9 heads of 64)
    Case(B=2, Hq=9, Hkv=9, D=64, C=576, L=1500, n=1337, k_bits=4, k_group=64, S=1, mask="bool",
         dtype=torch.bfloat16),
    Case(B=2, Hq=9, Hkv=9, D=64, C=576, L=700, n=613, k_bits=8, k_group=64, S=16, rope="positions",
         pos_offset=100_000, dtype=torch.float16),
    # a 7B-like MHA tile (2 heads of 128 per program), 2-bit, additive mask, S = 4
    Case(B=1, Hq=4, Hkv=4, D=128, C=512, L=1100, n=1037, k_bits=2, k_group=128, S=4, mask="float",
         dtype=torch.bfloat16),
    # the GQA latent: per-channel keys with col0, the open token group (n - n_full rows) from the tail
    Case(B=2, Hq=32, Hkv=8, D=128, C=1024, Cv=1024, L=2048, n=2000, k_bits=2, k_layout="per_channel",
         k_group=128, v_bits=4, v_group=128, S=2, col0=True, mask="float", dtype=torch.bfloat16),
    Case(B=2, Hq=32, Hkv=8, D=128, C=1024, Cv=1024, L=600, n=455, k_bits=4, k_layout="per_channel",
         k_group=128, v_bits=4, v_group=128, S=16, col0=True, bias=False, rope="positions",
         dtype=torch.bfloat16),
    Case(B=1, Hq=32, Hkv=8, D=128, C=1024, Cv=1024, L=512, n=384, k_bits=8, k_layout="per_channel",
         k_group=128, v_bits=4, v_group=128, S=1, mask="bool", dtype=torch.bfloat16),
    # head size 80 (RoPE halves of 40 padded to 64), GQA group 2 on a shared source, 3 query tokens
    Case(B=2, Hq=4, Hkv=2, D=80, C=256, L=300, n=257, k_bits=4, k_group=64, S=3, mask="bool",
         dtype=torch.bfloat16),
    # one filled row
    Case(B=2, Hq=2, Hkv=2, D=64, C=128, L=130, n=1, k_bits=4, k_group=64, dtype=torch.bfloat16),
]


def _run_gluon(a: dict, resident: bool | None = None, device: str = "cuda", **config) -> torch.Tensor:
    """The op through the launcher with the Gluon scores kernel (``config`` sets ``gluon``) on ``device``,
    asserting it ran (and, unless ``resident`` is None, with W resident or not)."""
    launches = []
    kernel = gs._gluon_scores_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **constexprs):
                launches.append(constexprs)
                return kernel[grid](*args, **constexprs)
            return launch

    gs._gluon_scores_kernel = Spy()
    try:
        out = da.decode_attention_triton(inputs(_to(a, device)), **config)
    finally:
        gs._gluon_scores_kernel = kernel
    assert launches, "the Gluon scores kernel did not run"
    assert resident is None or launches[0]["W_RESIDENT"] == resident
    return out.cpu()


@needs_hopper
@pytest.mark.parametrize("block_n, ws", [(None, 0), (64, 0), (None, 1)],
                         ids=["default_tile", "one_warpgroup", "warp_specialized"])
@pytest.mark.parametrize("gluon", [1, 2], ids=["w_streamed", "w_resident"])
@pytest.mark.parametrize("case", CUDA_CASES, ids=str)
def test_cuda_gluon_scores_match_the_reference(case, gluon, block_n, ws):
    a = make_inputs(case)
    config = {"gluon": gluon, "gluon_ws": ws, **({} if block_n is None else {"block_n": block_n})}
    why = _why(case, **config)
    if why is not None:  # W resident where the head tile's slice does not fit (7B, GQA), ...: declined, saying so
        assert _declined_as_expected(case, config, why), why
        with pytest.raises(ValueError, match="cannot run this call"):
            da.decode_attention_triton(inputs(_to(a, "cuda")), **config)
        return
    out = _run_gluon(a, **config)
    check_close(out, OP(**a), case.dtype, f"{case} {config}")
    triton_out = da.decode_attention_triton(inputs(_to(a, "cuda"))).cpu()
    check_close(out, triton_out, case.dtype, f"{case} {config} vs the Triton scores kernel")


class _StageOneDone(Exception):
    """Raised after stage 1 by :func:`_scores_stage`: stage 2 is not needed for it."""


def _scores_stage(a: dict, monkeypatch, device: str = "cuda", **config) -> torch.Tensor:
    """Stage 1's output, the scores [B, Hkv, rows, L] (fp32; only the columns j < n are written), of the op
    run through the launcher on ``device`` with ``config`` (stopped after stage 1)."""
    recorded = []
    launch = da.triton_kernels._launch_scores

    def record(*args, **kwargs):
        recorded.append(launch(*args, **kwargs))
        raise _StageOneDone

    with monkeypatch.context() as patch:
        patch.setattr(da.triton_kernels, "_launch_scores", record)
        with pytest.raises(_StageOneDone):
            da.decode_attention_triton(inputs(_to(a, device)), **config)
    return recorded[0].cpu()


def where_scores_differ(got: torch.Tensor, want: torch.Tensor, n: int, block_n: int) -> str:
    """Which parts of two score tensors [B, Hkv, rows, L] differ over the columns j < n (None: they agree
    within bf16's tolerance): counts per KV head, per query row, per 64-row warpgroup of a row block and per
    row block, so that one failing GPU run says where a kernel goes wrong (a head tile's halves, the query
    dot, the second warpgroup, the prologue or the last partial block, the resident loop's later blocks)."""
    got, want = got[..., :n].double(), want[..., :n].double()
    both_masked = torch.isneginf(got) & torch.isneginf(want)
    err = torch.where(both_masked, 0.0, (got - want).abs()).nan_to_num(float("inf"))
    finite = want[torch.isfinite(want)]  # (none where every query row is masked whole)
    bad = err > 3e-2 * max(1.0, finite.abs().max().item() if finite.numel() else 0.0)
    if not bad.any():
        return None
    per_column = bad.sum((0, 1, 2))
    j = torch.arange(n)
    per_warpgroup = torch.zeros(block_n // 64, dtype=per_column.dtype).index_add_(0, j % block_n // 64, per_column)
    blocks = (j[per_column > 0] // block_n).unique().tolist()
    return (f"{int(bad.sum())} of {bad.numel()} scores differ (max error {err.max().item():.3g}); "
            f"per KV head {bad.sum((0, 2, 3)).tolist()}; per query row {bad.sum((0, 1, 3)).tolist()}; "
            f"per warpgroup of a row block {per_warpgroup.tolist()} (rows j % {block_n} in 64-row groups); "
            f"in row blocks {blocks[:12]}{' ...' if len(blocks) > 12 else ''} of {-(-n // block_n)}")


def test_where_scores_differ_points_at_the_bad_part():
    """The diagnosis the CUDA tests print: it finds nothing where the scores agree, and names the head,
    query row, warpgroup and row block where one corrupted part of a tile disagrees."""
    want = torch.randn(1, 2, 4, 300)
    want[..., 5] = float("-inf")
    assert where_scores_differ(want + 1e-3, want, 257, 128) is None
    masked = torch.full_like(want, float("-inf"))  # a query row masked whole (a left-padded one)
    assert where_scores_differ(masked, masked, 257, 128) is None
    # (column 5 is -inf in both)
    assert where_scores_differ(masked, want, 257, 128).startswith("2048 of 2056 scores differ")
    got = want.clone()
    got[0, 1, 2, 192:256] += 1.0  # head 1, query row 2, the second warpgroup of row block 1
    got[0, 0, 0, 290] = float("nan")  # past n: never written, never compared
    why = where_scores_differ(got, want, 257, 128)
    assert why.startswith("64 of 2056 scores differ") and "per KV head [0, 64]" in why, why
    assert "per query row [0, 0, 64, 0]" in why and "per warpgroup of a row block [0, 64]" in why, why
    assert "in row blocks [1] of 3" in why, why


@needs_hopper
@pytest.mark.parametrize("ws", [0, 1], ids=["one_role", "warp_specialized"])
@pytest.mark.parametrize("gluon", [1, 2], ids=["w_streamed", "w_resident"])
@pytest.mark.parametrize("case", CUDA_CASES, ids=str)
def test_cuda_gluon_scores_stage_matches_the_triton_kernel(case, gluon, ws, monkeypatch):
    """Stage 1 alone, against the Triton scores kernel's: where the two disagree, the failure says where."""
    if _why(case, gluon=gluon, gluon_ws=ws) is not None:
        pytest.skip("declined (test_cuda_gluon_scores_match_the_reference asserts the reason)")
    a = make_inputs(case)
    got = _scores_stage(a, monkeypatch, gluon=gluon, gluon_ws=ws)
    want = _scores_stage(a, monkeypatch)
    block_n = da.resolve_config(inputs(_to(a, "cuda")), gluon=gluon)["block_n"]
    why = where_scores_differ(got, want, int(a["length"]), block_n)
    assert why is None, f"{case} gluon={gluon} gluon_ws={ws}: {why}"


@needs_hopper
@pytest.mark.parametrize("ws", [0, 1], ids=["one_role", "warp_specialized"])
@pytest.mark.parametrize("gluon", [1, 2], ids=["w_streamed", "w_resident"])
@pytest.mark.parametrize("pc", [pc for pc in PAGED_CUDA_CASES if _why(make_paged(pc)[1]) is None], ids=str)
def test_cuda_gluon_scores_read_pages(pc, gluon, ws):
    """vLLM's pages at real shapes (SmolLM2's X form, a GQA latent form; pages of 16, ragged fills): the
    paged launch gives exactly the dense launch's output over the same rows (only the addresses differ)
    and the reference's within the dtype's bound."""
    dense, paged = make_paged(pc)
    config = {"gluon": gluon, "gluon_ws": ws}
    why = _why(paged, **config)
    if why is not None:
        assert _declined_as_expected(pc.case, config, why), why
        return
    out = _run_gluon(paged, **config)
    check_close(out, OP(**paged), pc.case.dtype, f"{pc} {config}")
    assert torch.equal(out, _run_gluon(dense, **config)), "paged and dense Gluon launches differ"


@needs_hopper
@pytest.mark.parametrize("case", CUDA_CASES, ids=str)
def test_cuda_gluon_auto_runs_what_choose_says(case):
    """gluon="auto" around the call: the Gluon kernel, W resident exactly where gluon=2 can run."""
    a = make_inputs(case)
    with da.config_overrides(gluon="auto"):
        out = _run_gluon(a, resident=_why(case, gluon=2) is None)
    check_close(out, OP(**a), case.dtype, f"{case} gluon=auto")


# The case test_cuda_gluon_scores_n_zero_and_graph_replay captures, then replays at other fills
GRAPH_REPLAY_CASE = replace(CUDA_CASES[0], B=1, L=1024, n=1024, mask=None)


@needs_hopper
@pytest.mark.parametrize("ws", [0, 1], ids=["one_role", "warp_specialized"])
@pytest.mark.parametrize("gluon", [1, 2], ids=["w_streamed", "w_resident"])
def test_cuda_gluon_scores_n_zero_and_graph_replay(gluon, ws):
    """n = 0 gives zeros; one captured graph serves every fill (n read on the device; with W resident the
    programs loop over the filled row blocks)."""
    case = GRAPH_REPLAY_CASE
    fresh = {n: make_inputs(replace(case, n=n)) for n in (0, 1, 63, 700, 1024)}
    dev = _to(make_inputs(case), "cuda")
    dev["length"] = torch.tensor(5, device="cuda")
    a = inputs(dev)
    da.decode_attention_triton(a, gluon=gluon, gluon_ws=ws)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = da.decode_attention_triton(a, gluon=gluon, gluon_ws=ws)
    for n, host in fresh.items():
        for key in ("k_scale", "k_zero", "cos", "sin"):  # the per-fill poison past n moves with n
            dev[key].copy_(host[key])
        dev["length"].fill_(n)
        graph.replay()
        torch.cuda.synchronize()
        if n == 0:
            assert (out == 0).all()
        else:
            check_close(out.cpu(), OP(**host), case.dtype, f"graph replay n={n}")


# On CPU: the Gluon kernel under the emulator, stage 2 (Triton kernels) under the Triton interpreter, which is
# why in subprocesses (TRITON_INTERPRET is read when the kernels are defined).
EMULATED_SHARDS = ("cases", "paged", "faults", "wide")
_GLUON_SCORES_KERNEL = gs._gluon_scores_kernel if gs.HAS_GLUON else None


@pytest.mark.skipif(not (gs.HAS_GLUON and HAS_TRITON), reason="triton with Gluon (>= 3.4) is not installed")
@pytest.mark.parametrize("shard", EMULATED_SHARDS)
def test_emulated_gluon_scores(shard):
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--emulated", shard],
                          env=_subprocess_env(TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    assert f"emulated {shard} passed" in proc.stdout, proc.stdout + proc.stderr


def _emulated_cases() -> list[Case]:
    """CUDA_CASES with at most 200 rows, 150 filled: 2 row blocks of 128 or 3 of 64, the last partial; the
    GQA latent's open token group 22 rows; SmolLM2's W-resident programs each looping over every block."""
    return [case if case.L <= 200 else replace(case, L=200, n=min(case.n, 150)) for case in CUDA_CASES]


def _emulated_paged_cases() -> list[PagedCase]:
    """The paged GPU tests' two real shapes (the small paged cases have scale groups the kernel declines) at
    fewer rows: pages of 16, ragged fills, one of a single row."""
    smol, latent = PAGED_CUDA_CASES[-2:]
    return [PagedCase(replace(smol.case, L=320), (300, 1, 170), 16),
            PagedCase(replace(latent.case, L=256), (250, 129), 16)]


def _emulate(replace_globals: dict | None = None) -> None:
    """From here on the launcher runs the Gluon scores kernel under the emulator (CPU tensors)."""
    from gluon_emulator import emulated

    gs._gluon_scores_kernel = emulated(_GLUON_SCORES_KERNEL, replace=replace_globals)
    gs.interpreted = lambda: False  # (the interpreter runs stage 2; the emulator stage 1)


def _run_emulated_cases() -> None:
    """Each case with W streamed and resident, one and two warpgroups, warp-specialized or not: stage 1
    against the Triton scores kernel's (under the interpreter; where they differ said by where_scores_differ),
    and with the default tile the whole op against the reference."""
    _emulate()
    patch = pytest.MonkeyPatch()
    for case in _emulated_cases():
        a = make_inputs(case)
        ref = OP(**a)
        want = _scores_stage(a, patch, device="cpu")
        for gluon, ws, block_n in itertools.product((1, 2), (0, 1), (None, 64)):
            config = {"gluon": gluon, "gluon_ws": ws, **({} if block_n is None else {"block_n": block_n})}
            why = _why(case, **config)
            if why is not None:
                assert _declined_as_expected(case, config, why), why
                continue
            if block_n is None:  # (stage 2 is the interpreter's, the same for every stage 1: once per kernel)
                check_close(_run_gluon(a, resident=gluon == 2, device="cpu", **config), ref, case.dtype,
                            f"{case} {config}")
            got = _scores_stage(a, patch, device="cpu", **config)
            rows_per_block = da.resolve_config(inputs(a), **config)["block_n"]
            why = where_scores_differ(got, want, int(a["length"]), rows_per_block)
            assert why is None, f"{case} {config}: {why}"
            print(f"ok {case} {config}", flush=True)
    # n = 0: no row block is filled, every score is masked, the output is 0
    a = make_inputs(replace(CUDA_CASES[-1], n=0))
    for gluon, ws in itertools.product((1, 2), (0, 1)):
        assert (_run_gluon(a, device="cpu", gluon=gluon, gluon_ws=ws) == 0).all()
    # gluon="auto": W resident where gluon=2 can run it, else streamed
    for case in (_emulated_cases()[0], _emulated_cases()[3]):
        a = make_inputs(case)
        with da.config_overrides(gluon="auto"):
            out = _run_gluon(a, resident=_why(case, gluon=2) is None, device="cpu")
        check_close(out, OP(**a), case.dtype, f"{case} gluon=auto")
    print("emulated cases passed")


def _run_emulated_paged() -> None:
    """vLLM's pages: the paged launch gives exactly the dense launch's output and the reference's within the
    dtype's bound."""
    _emulate()
    for pc in _emulated_paged_cases():
        dense, paged = make_paged(pc)
        for gluon, ws in itertools.product((1, 2), (0, 1)):
            if _why(paged, gluon=gluon, gluon_ws=ws) is not None:
                continue
            out = _run_gluon(paged, device="cpu", gluon=gluon, gluon_ws=ws)
            check_close(out, OP(**paged), pc.case.dtype, f"{pc} gluon={gluon} gluon_ws={ws}")
            assert torch.equal(out, _run_gluon(dense, device="cpu", gluon=gluon, gluon_ws=ws)), \
                f"{pc} gluon={gluon} gluon_ws={ws}: paged and dense differ"
            print(f"ok {pc} gluon={gluon} gluon_ws={ws}", flush=True)
    print("emulated paged passed")


def _run_emulated_faults() -> None:
    """The kernel's own code with one wait or fence weakened: the emulator reports the race it would be on
    the GPU (so the right kernel's silence above means something)."""
    import gluon_emulator as emu

    faults = {
        "an MMA more left in flight": ({"warpgroup_mma_wait": lambda num_outstanding=0, deps=None:
                                        emu.warpgroup_mma_wait(num_outstanding + 1, deps)},
                                       "while an MMA reading it is in flight"),
        "a W copy not waited for": ({"async_copy": types.SimpleNamespace(
            **{**vars(emu.async_copy), "wait_group": lambda num_outstanding=0: emu.wait_group(num_outstanding + 1)})},
            "cp.async copy into it has not landed"),
        "no fence after the X̂ store": ({"fence_async_shared": lambda cluster=False: None},
                                       "without fence_async_shared"),
    }
    a = make_inputs(_emulated_cases()[0])  # SmolLM2's shape: 9 channel steps
    for name, (replace_globals, error) in faults.items():
        for gluon, ws in itertools.product((1, 2), (0, 1)):
            if ws and gluon == 2 and name == "a W copy not waited for":
                continue  # (W resident: the warp-specialized loop copies nothing)
            _emulate(replace_globals)
            with pytest.raises(emu.EmulationError, match=error):
                da.decode_attention_triton(inputs(a), gluon=gluon, gluon_ws=ws)
            print(f"ok caught: {name} (gluon={gluon}, gluon_ws={ws})", flush=True)
    # warp-specialized without the hand-over (every mbarrier wait returning at once): the MMA warps take the
    # X̂ slots before the dequantizing warps fill them; no rule of the emulator breaks, the scores are wrong
    no_waits = types.SimpleNamespace(**{**vars(emu.mbarrier), "wait": lambda *args, **kwargs: None})
    ref = OP(**a).float()
    for gluon in (1, 2):
        _emulate({"mbarrier": no_waits})
        error = (_run_gluon(a, device="cpu", gluon=gluon, gluon_ws=1).float() - ref).abs().max().item()
        assert error > 0.1, f"gluon={gluon} gluon_ws=1 without its mbarrier waits: off by only {error}"
        print(f"ok wrong without the hand-over: off by {error:.2f} (gluon={gluon}, gluon_ws=1)", flush=True)
    print("emulated faults passed")


def _run_emulated_wide() -> None:
    """Code rows 2**30 + 4096 bytes apart (``test_kernels.wide_rows``: the row stride passes as int32, the
    byte offset of row 2 passes 2**31): the kernel's row offsets are int64, else the emulator raises out of
    bounds. (2 and 8 bits: 4-bit codes are read as 32-bit words, whose offsets would pass 2**31 from row 8.)"""
    from test_kernels import wide_rows

    _emulate()
    for bits in (2, 8):
        a = make_inputs(Case(B=1, Hq=4, Hkv=2, D=64, L=3, n=3, C=128, k_bits=bits, k_group=64, S=2, mask="bool",
                             dtype=torch.bfloat16))
        ref = OP(**a)
        a["k_packed"] = wide_rows(a["k_packed"])
        for gluon, ws in itertools.product((1, 2), (0, 1)):
            out = _run_gluon(a, device="cpu", gluon=gluon, gluon_ws=ws)
            check_close(out, ref, torch.bfloat16,
                        f"{bits}-bit rows 2**30 + 4096 bytes apart, gluon={gluon} gluon_ws={ws}")
    print("emulated wide passed")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--emulated" and sys.argv[2] in EMULATED_SHARDS:
        {"cases": _run_emulated_cases, "paged": _run_emulated_paged, "faults": _run_emulated_faults,
         "wide": _run_emulated_wide}[sys.argv[2]]()
    else:
        sys.exit(f"usage: TRITON_INTERPRET=1 {sys.argv[0]} --emulated {'|'.join(EMULATED_SHARDS)}")
