"""``xq_compile::decode_attention`` over paged sources (vLLM's layout: ``block_table`` given, a fill per
request in ``length``).

Each case is a dense case of tests/test_decode_attention.py whose per-token sources (codes, scales, zeros,
col0) are copied into pages: a shuffled block table, requests of different fills (one empty), the rows
past a request's fill and every page no request owns filled with NaN (scale/zero/col0; the codes 0xFF),
table entries past a request's last block pointing at a NaN page. Checked:

  (a) the CPU kernel (the torch reference): equal to the dense op over the same rows, request by request;
      a wrong block table gives a wrong answer (negative control); bad paged inputs are refused;
  (b) the Triton kernels under the interpreter (subprocess with TRITON_INTERPRET=1, as in
      tests/test_decode_attention.py): bit-equal to the dense Triton launch with the same per-request
      fills (same tiles, same arithmetic: only the addresses differ), within the dtype's bound of the
      reference, and wrong for a wrong table; the vLLM plugin's arguments (views of page bytes) too;
  (c) on a GPU (skipped without CUDA; XQ_CUDA_TEST_DEVICE=cpu dry-runs their code on the reference):
      the compiled kernels at real shapes against the reference and the dense launch, and one captured
      CUDA graph replayed with other fills and other block tables (no host sync, static shapes):
          pytest tests/test_paged_decode_attention.py -k cuda
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch

from test_decode_attention import (CUDA_DEVICE, OP, Case, _subprocess_env, _to, check_close, inputs, make_inputs,
                                   needs_cuda)
from xq_compile.kernels import decode_attention as da

HAS_TRITON = importlib.util.find_spec("triton") is not None

# the op's per-token sources, [B, L, ...] dense and [pages, page_size, ...] paged
PER_ROW = ("k_packed", "k_scale", "k_zero", "v_packed", "v_scale", "v_zero", "col0")


@dataclass(frozen=True)
class PagedCase:
    case: Case
    fills: tuple[int, ...]  # one per request (batch row); L = case.L is a multiple of page_size
    page_size: int

    def __str__(self):
        return f"{self.case}_fills{'-'.join(map(str, self.fills))}_page{self.page_size}"


def _poison(t: torch.Tensor) -> None:
    """NaN (floating), 0xFF (codes) in place: a row read past a fill shows up as a NaN."""
    t.fill_(float("nan") if t.dtype.is_floating_point else 255)


def make_paged(pc: PagedCase, seed: int = 0) -> tuple[dict, dict]:
    """(the dense op arguments with a fill per request, the same rows paged through a shuffled table)."""
    c = pc.case
    assert c.B == len(pc.fills) and c.L % pc.page_size == 0 and c.k_layout == c.v_layout == "per_token"
    dense = make_inputs(replace(c, n=c.L, window=0))  # nothing poisoned yet: the per-request fills poison below
    fills = torch.tensor(pc.fills, dtype=torch.int32)
    dense["length"] = fills
    past = torch.arange(c.L)[None] >= fills[:, None]  # [B, L]: rows past each request's fill
    if c.window:  # ... and the rows behind every window of the request (their blocks freed below)
        dense["window"] = c.window
        first_seen = (fills - c.S + 1 - c.window).clamp(min=0)
        past |= torch.arange(c.L)[None] < first_seen[:, None]
    for key in (*PER_ROW, "cos", "sin", "mask"):
        t = dense[key]
        if t is None or (key == "k_packed" or key == "v_packed"):
            continue
        if key == "mask":
            if t.dtype.is_floating_point and t.shape[0] == c.B:
                t[past[:, None, None].expand_as(t)] = float("nan")
            continue
        t[past] = float("nan")
    if dense["positions"] is not None:
        dense["positions"][past] = 2**40

    g = torch.Generator().manual_seed(seed)
    ps, blocks = pc.page_size, c.L // pc.page_size
    num_pages = c.B * blocks + 3  # a few pages no request owns; page 0 is the null page (vLLM's too)
    owned = 1 + torch.randperm(num_pages - 1, generator=g)[: c.B * blocks]
    table = owned.view(c.B, blocks).int()
    used = -(-fills // ps)
    table[torch.arange(blocks)[None] >= used[:, None]] = 0  # past a request's last block: the null page
    if c.window:  # blocks wholly behind the window: freed, vLLM points them at the null page
        table[(torch.arange(blocks)[None] + 1) * ps <= first_seen[:, None]] = 0
    paged = dict(dense, block_table=table)
    rows = torch.arange(c.L)
    for key in PER_ROW:
        t = dense[key]
        if t is None:
            continue
        pages = t.new_empty((num_pages, ps, *t.shape[2:]))
        _poison(pages)
        for b, n in enumerate(pc.fills):
            r = rows[:n][~past[b, :n]]
            pages[table[b, r // ps].long(), r % ps] = t[b, r]
        paged[key] = pages
    return dense, paged


def per_request_dense(dense: dict) -> torch.Tensor:
    """The dense op (one fill for the whole batch) request by request, concatenated."""
    outs = []
    for b, n in enumerate(dense["length"].tolist()):
        shared = ("k_weight", "k_bias", "v_weight", "v_bias", "rope_inv_freq", "length", "k_norm_weight")
        one = {k: (v[b:b + 1] if isinstance(v, torch.Tensor) and k not in shared else v) for k, v in dense.items()}
        if one["mask"] is not None and dense["mask"].shape[0] == 1:
            one["mask"] = dense["mask"]
        one["length"] = torch.tensor(n)
        outs.append(OP(**one))
    return torch.cat(outs)


def swapped(paged: dict, request: int) -> dict:
    """The negative control: the request's first two blocks swapped in its table (of those it holds: not
    the freed ones behind a window)."""
    table = paged["block_table"].clone()
    first, second = (table[request] != 0).nonzero().flatten()[:2].tolist()
    table[request, [first, second]] = table[request, [second, first]]
    return dict(paged, block_table=table)


MHA = dict(Hq=2, Hkv=2, D=16, C=64, k_group=16, L=48)
LATENT = dict(Hq=6, Hkv=2, D=16, C=32, Cv=32, k_group=16, v_group=16, L=32)
CASES = [
    # X form (one shared source), 4 requests with fills 13 / 0 / 48 / 5, pages of 8 rows, RoPE from positions
    PagedCase(Case(B=4, **MHA, k_bits=4, rope="positions", seed=1), (13, 0, 48, 5), 8),
    # X form, 3 bits, col0 paged, bf16, two query tokens with a bool mask, pages of 16
    PagedCase(Case(B=3, **MHA, k_bits=3, col0=True, S=2, mask="bool", dtype=torch.bfloat16, seed=2), (37, 48, 17), 16),
    # GQA latent form: key latent and value latent, per token, from the same pages; 2-bit keys, 4-bit values
    PagedCase(Case(B=3, **LATENT, k_bits=2, v_bits=4, seed=3), (9, 32, 22), 8),
    # latent form in bf16 with an additive mask and no biases, pages of 4
    PagedCase(Case(B=2, **LATENT, k_bits=4, v_bits=3, bias=False, S=2, mask="float", mask_shape="1H",
                   dtype=torch.bfloat16, seed=4), (30, 11), 4),
    # a Gemma 3 layer: a 10-row window (the blocks behind it freed: the null page's NaN), soft cap, key norm,
    # two query tokens; one request shorter than the window
    PagedCase(Case(B=3, **MHA, k_bits=4, rope="positions", S=2, window=10, soft_cap=1.0, k_norm=True,
                   dtype=torch.bfloat16, seed=6), (45, 7, 29), 4),
]


# --------------------------------------------------------------------------------------------------
# (a) the CPU kernel
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pc", CASES, ids=str)
def test_reference_reads_rows_through_the_block_table(pc):
    dense, paged = make_paged(pc)
    out = OP(**paged)
    assert torch.isfinite(out).all(), "a NaN row (past a fill, or a page no request owns) leaked"
    assert torch.equal(out, per_request_dense(dense))
    assert torch.equal(out, OP(**dense))  # the dense op with a fill per batch row
    empty = [b for b, n in enumerate(pc.fills) if n == 0]
    assert all((out[b] == 0).all() for b in empty), "a request without rows gives 0"
    wrong = OP(**swapped(paged, request=int(torch.tensor(pc.fills).argmax())))
    assert not torch.allclose(wrong, out, atol=1e-3), "a wrong block table must give a wrong answer"


# a fill per batch row on dense sources, with KIVI-style per-channel keys (each row's open token group
# read from its tail; n = 39 poisons what no fill below reads): what the kernels do per row without a table
PER_ROW_KIVI = Case(B=3, Hq=4, Hkv=2, D=16, C=32, Cv=48, L=40, n=39, k_bits=3, k_layout="per_channel", k_group=8,
                    v_bits=4, v_group=16, col0=True, S=2, mask="bool", seed=5)
PER_ROW_FILLS = (37, 8, 0)


def test_reference_fill_per_row_on_dense_sources():
    a = make_inputs(PER_ROW_KIVI)
    a["length"] = torch.tensor(PER_ROW_FILLS)
    out = OP(**a)
    assert torch.isfinite(out).all() and (out[2] == 0).all()
    assert torch.equal(out, per_request_dense(a))


def test_opcheck_paged():
    """The op's schema, fake kernel and dispatch hold with a block table and per-request fills."""
    _, paged = make_paged(CASES[2])
    torch.library.opcheck(OP, (), paged)


def test_paged_inputs_are_checked():
    dense, paged = make_paged(CASES[0])
    with pytest.raises(ValueError, match="block_table must be int32/int64 \\[B=4"):
        OP(**{**paged, "block_table": paged["block_table"][:3]})
    with pytest.raises(ValueError, match="block_table must be int32/int64"):
        OP(**{**paged, "block_table": paged["block_table"].float()})
    with pytest.raises(ValueError, match="k_scale must be .*paged: \\[pages, page_size"):
        OP(**{**paged, "k_scale": dense["k_scale"]})  # a dense source with a block table
    with pytest.raises(ValueError, match="length must be .*\\[B=4\\]"):
        OP(**{**paged, "length": torch.tensor([1, 2])})
    latent = make_inputs(Case(B=1, Hq=2, Hkv=2, D=16, C=32, Cv=32, k_layout="per_channel", k_group=8, L=16,
                              n=16))
    with pytest.raises(ValueError, match="per_channel.*block_table"):
        OP(**{**latent, "block_table": torch.zeros(1, 2, dtype=torch.int32)})


def test_default_config_steps_32_channels_for_paged_3_bit_keys():
    """Paged 3-bit keys in 256-feature tiles (2 heads of 128) step 32 channels, not 64: with the page of
    each row live through the loop the 64-channel tile spills inside it (compile_report.py --paged)."""
    shape = dict(batch=4, kv_heads=8, head_dim=128, query_rows=4, max_len=8192, k_width=1024, v_width=1024,
                 k_layout="per_token", k_group=128, v_layout="per_token", v_group=128, dtype=torch.bfloat16,
                 device=torch.device("cpu"))
    assert da.default_config(**shape, k_bits=3, paged=True)["block_c"] == 32
    assert da.default_config(**shape, k_bits=3)["block_c"] == 64
    assert da.default_config(**shape, k_bits=4, paged=True)["block_c"] == 64
    dense, paged = make_paged(CASES[0])
    assert da.resolve_config(inputs(paged)) == da.resolve_config(inputs(dense))  # 4-bit, 16-wide heads

# --------------------------------------------------------------------------------------------------
# (b) the Triton kernels under the interpreter (subprocess)
# --------------------------------------------------------------------------------------------------

# small blocks (a 16-row tile spans 2-4 pages of 4-8 rows; 3 splits, some empty; K rebuilt as Kᵀ = Wk·X̂ᵀ, the
# form for GPUs without wgmma) and the defaults (Hopper's K = X̂·Wkᵀ)
CONFIGS = [dict(block_n=16, block_c=32, block_h=2, block_m=16, block_nv=16, block_cv=32, num_splits=3, x_as_b=1),
           {}]


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_kernels_read_pages_interpreted():
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--interpreter"],
        env=_subprocess_env(TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    assert "paged interpreter cases passed" in proc.stdout, proc.stdout + proc.stderr


def _run_interpreter_cases() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    for pc in CASES:
        dense, paged = make_paged(pc)
        ref = OP(**paged)
        for cfg in CONFIGS:
            what = f"{pc} cfg={cfg or 'default'}"
            out = da.decode_attention_triton(inputs(paged), **cfg)
            assert torch.isfinite(out).all(), f"{what}: a NaN row leaked"
            assert torch.equal(out, da.decode_attention_triton(inputs(dense), **cfg)), \
                f"{what}: paged and dense launches differ"
            check_close(out, ref, pc.case.dtype, what)
            print(f"ok {what}", flush=True)
        wrong = da.decode_attention_triton(inputs(swapped(paged, int(torch.tensor(pc.fills).argmax()))), **CONFIGS[0])
        assert not torch.allclose(wrong, out, atol=1e-3), f"{pc}: a wrong block table must give a wrong answer"
    a = make_inputs(PER_ROW_KIVI)
    a["length"] = torch.tensor(PER_ROW_FILLS, dtype=torch.int32)
    for cfg in CONFIGS:
        check_close(da.decode_attention_triton(inputs(a), **cfg), OP(**a), PER_ROW_KIVI.dtype, f"per-row fills {cfg}")
    print("ok per-row fills, dense per-channel keys", flush=True)
    _run_plugin_cases()
    print("paged interpreter cases passed")


def _run_plugin_cases() -> None:
    """The vLLM plugin's arguments (xq_compile.vllm.paged.decode_arguments: sources as strided views of the
    page bytes, seq_lens, neox RoPE from positions) through the Triton kernels: the torch path's output."""
    from test_vllm_paged import _decode_step, _rope, _windowed_decode_step
    from xq_compile.vllm import paged as vllm_paged

    for form in ("x", "latent"):
        pages, batch, layout, xquant, proj, query, inv_freq = _decode_step(form, 4, kv_heads=2)
        args = vllm_paged.decode_arguments(query, pages, batch, layout, xquant, proj, inv_freq)
        out = da.decode_attention_triton(da.DecodeAttentionInputs.from_op_args(**args), **CONFIGS[0])
        rows, valid = vllm_paged.gather(pages, batch, layout, xquant, torch.float32)
        want = vllm_paged.attend(query, rows, valid, batch, proj, lambda p, k: _rope(p, k, proj.head_dim), True)
        torch.testing.assert_close(out.reshape(want.shape), want, atol=2e-5, rtol=2e-5)
        print(f"ok plugin {form} form", flush=True)
        # a Gemma-style layer: sliding window over freed blocks, soft cap, key norm
        step, options, rope = _windowed_decode_step(form)
        query, pages, batch, layout, xquant, proj, inv_freq = step
        args = vllm_paged.decode_arguments(*step, **options)
        for cfg in CONFIGS:
            out = da.decode_attention_triton(da.DecodeAttentionInputs.from_op_args(**args), **cfg)
            rows, valid = vllm_paged.gather(pages, batch, layout, xquant, torch.float32, window=options["window"])
            want = vllm_paged.attend(query, rows, valid, batch, proj, rope, True, window=options["window"],
                                     soft_cap=options["soft_cap"])
            torch.testing.assert_close(out.reshape(want.shape), want, atol=2e-5, rtol=2e-5)
        print(f"ok plugin {form} form with a window, a soft cap and a key norm", flush=True)


# --------------------------------------------------------------------------------------------------
# (c) on a GPU
# --------------------------------------------------------------------------------------------------

CUDA_CASES = [
    *CASES,
    # vLLM's pages of 16 tokens at real shapes: SmolLM2's X form (d 576, 9 heads of 64, 4-bit) and a GQA
    # latent form (8 KV heads of 128, latents of 1024, 4-bit keys, 2-bit values), bf16, ragged fills
    PagedCase(Case(B=3, Hq=9, Hkv=9, D=64, C=576, L=1344, k_bits=4, k_group=64, rope="positions",
                   dtype=torch.bfloat16, seed=10), (1337, 1, 700), 16),
    PagedCase(Case(B=2, Hq=32, Hkv=8, D=128, C=1024, Cv=1024, L=2048, k_bits=4, k_group=128, v_bits=2,
                   v_group=128, rope="positions", dtype=torch.bfloat16, seed=11), (2000, 513), 16),
]


@needs_cuda
@pytest.mark.parametrize("pc", CUDA_CASES, ids=str)
def test_cuda_paged_matches_reference_and_dense(pc):
    dense, paged = make_paged(pc)
    out = OP(**_to(paged, CUDA_DEVICE)).cpu()
    check_close(out, OP(**paged), pc.case.dtype, str(pc))
    assert torch.equal(out, OP(**_to(dense, CUDA_DEVICE)).cpu()), "paged and dense launches differ"


# The requests test_cuda_graph_replay_follows_seq_lens_and_block_table captures, then replays at other fills
GRAPH_REPLAY_CASE = Case(B=3, Hq=9, Hkv=9, D=64, C=576, L=512, k_bits=4, k_group=64, rope="positions",
                         dtype=torch.bfloat16)


@needs_cuda
@pytest.mark.skipif(CUDA_DEVICE != "cuda", reason="CUDA graphs")
def test_cuda_graph_replay_follows_seq_lens_and_block_table():
    """One captured graph serves every decode step: the fills (seq_lens) and the block table are read on
    the device by every launch, so replays with other values give the reference's answers."""
    steps = [make_paged(PagedCase(GRAPH_REPLAY_CASE, fills, 16), seed=i) for i, fills in
             enumerate([(5, 512, 100), (17, 1, 300), (512, 64, 0)])]
    dev = _to(steps[0][1], "cuda")
    OP(**dev)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = OP(**dev)
    for _, paged in steps:
        for key in ("k_packed", "k_scale", "k_zero", "length", "block_table", "positions"):
            dev[key].copy_(paged[key])
        graph.replay()
        torch.cuda.synchronize()
        check_close(out.cpu(), OP(**paged), GRAPH_REPLAY_CASE.dtype, f"graph replay fills={paged['length'].tolist()}")


if __name__ == "__main__":
    if sys.argv[1:] == ["--interpreter"]:
        _run_interpreter_cases()
    else:
        sys.exit(f"usage: TRITON_INTERPRET=1 {sys.argv[0]} --interpreter")
