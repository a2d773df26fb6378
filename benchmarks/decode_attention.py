"""The fused decode-attention op (``xq_compile::decode_attention``) against the unfused XQuant path and
SDPA over a plain 16-bit K/V cache of the same length.

    python benchmarks/decode_attention.py --device cuda --dtype bf16               # H200: < 60 s
    python benchmarks/decode_attention.py --device cpu --lengths 64 128 --shape smollm2 --repeats 3  # smoke
    python benchmarks/decode_attention.py --sweep --lengths 8192 32768    # H200: time sweep_configs() too
    python benchmarks/decode_attention.py --graph --sweep --lengths 8192 32768  # ... replayed from CUDA graphs
    python benchmarks/decode_attention.py --graph --control --profile   # the K rebuild vs plain matmuls
    python benchmarks/decode_attention.py --graph --sweep-gluon         # H200: the Gluon scores kernel's variants
    TRITON_INTERPRET=1 python benchmarks/decode_attention.py --device cpu --lengths 64 --shape gqa \\
        --iters 1 --repeats 1 --sweep --out /tmp/sweep.json    # the sweep code path on CPU (interpreter)
    # fill Triton's disk cache from 4 processes at once, then time with no compilation in the way
    for i in 0 1 2 3; do python benchmarks/decode_attention.py --sweep --compile-only --shard $i/4 & done; wait
    python benchmarks/decode_attention.py --sweep

Shapes (``--shape``, several allowed; default all three):
  * ``smollm2``  d = 576, 9 heads of 64, MHA: one shared X source (per-token groups of 64);
  * ``llama7b``  d = 4096, 32 heads of 128, MHA: one shared X source (per-token groups of 128);
  * ``gqa``      8 KV heads of 128, 32 query heads: key latent C = 1024 per-channel (groups of 128 tokens,
                 fp16 tail, fp16 channel 0) and a per-token value latent C = 1024.

Per shape and length n (capacity L = max length; the cache holds n rows):
  * ``fused``    the op (on CUDA its Triton kernels), n read on the device;
  * ``unfused``  dequant_project for K (torch dequantize + linear for a per-channel source) + RoPE in torch
                 + absorbed values in torch (xq_compile.attention.absorbed_attention), n sliced on the host;
  * ``sdpa``     F.scaled_dot_product_attention over a 16-bit K/V cache of n rows (what a normal cache costs).
Times are CUDA-event averages over ``--iters`` calls (fewer for a call so slow that a round would take
more than ``--max-round-ms``), median of ``--repeats`` rounds. ``--graph`` (CUDA) also times the fused op
and SDPA replayed from a CUDA graph of ``--iters`` calls, as a server's compiled decode step runs them:
device time without the host's launch overhead (about 0.3 ms per eager call of the fused op's launches,
which hides the kernels at small shapes); the sweep then ranks the configurations by that time.
``--control`` puts the K rebuild's FLOPs (2·n·Ck·Hkv·D) as % of peak side by side: in the scores kernel
(device time from ``--profile``; it also does RoPE and the scores), in a plain Triton bf16 matmul X·Wkᵀ
of the scores kernel's tile and of the sweep's 256-row tile (the same MMAs and Wk traffic, no
dequantization), and in torch.mm: what the dequantization costs, apart from what the tile can reach.
TFLOP/s counts the rebuild: 2·n·Ck·D·Hkv + 2·n·D·Hq·S + 2·n·Cv·Hq·S per batch row; "peak" is the H200's
dense bf16 989 TFLOP/s.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

H200_BF16_DENSE_TFLOPS = 989.0
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}
SHAPES = {
    "smollm2": dict(Hq=9, Hkv=9, D=64, Ck=576, Cv=None, k_layout="per_token", k_group=64, col0=False),
    "llama7b": dict(Hq=32, Hkv=32, D=128, Ck=4096, Cv=None, k_layout="per_token", k_group=128, col0=False),
    "gqa": dict(Hq=32, Hkv=8, D=128, Ck=1024, Cv=1024, k_layout="per_channel", k_group=128, col0=True,
                v_group=128),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--shape", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--queries", type=int, default=1, help="query tokens S per step (decode: 1)")
    p.add_argument("--bits", type=int, default=4, choices=[2, 3, 4, 8])
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--max-round-ms", type=float, default=100.0,
                   help="fewer than --iters calls per round when one call takes longer than this / --iters (at "
                        "least one): a slow configuration of the sweep then costs seconds, not minutes")
    p.add_argument("--config", nargs="*", default=[], metavar="KEY=VALUE",
                   help="decode_attention config overrides for the fused op (xq_compile.kernels.decode_attention."
                        "CONFIG_KEYS), e.g. block_h=2 num_warps=8")
    p.add_argument("--sweep", action="store_true",
                   help="also time the fused op under each configuration of sweep_configs() per shape and length "
                        "(correctness checked for each), and report the fastest")
    p.add_argument("--sweep-gluon", action="store_true",
                   help="time the Gluon scores kernel's variants (sweep_configs(gluon=True), Hopper) next to the "
                        "default instead, ranked the same way (--sweep --sweep-gluon: both sets)")
    p.add_argument("--sweep-min-length", type=int, default=8192,
                   help="sweep only lengths from this one on (the target is for n >= 8K; short ones are launch-bound)")
    p.add_argument("--graph", action="store_true",
                   help="CUDA: also time the fused op and SDPA replayed from CUDA graphs (no launch overhead), "
                        "and rank the sweep by that time")
    p.add_argument("--control", action="store_true",
                   help="also time the K rebuild's MMA work without the dequantization: a plain Triton bf16 "
                        "matmul X·Wkᵀ in the scores kernel's tile (and the sweep's 256-row tile) and torch.mm, "
                        "as % of peak next to the scores kernel's (with --profile)")
    p.add_argument("--profile", action="store_true",
                   help="CUDA: also record the device time of each Triton kernel of the fused op (torch.profiler), "
                        "to see which of the scores / softmax / values / combine / project launches dominates")
    p.add_argument("--compile-only", action="store_true",
                   help="launch every kernel the timed run would (fused default and, with --sweep, each sweep "
                        "configuration; the unfused path) once, untimed, to fill Triton's disk cache; no output")
    p.add_argument("--shard", default="0/1", metavar="I/N",
                   help="with --compile-only: only the I-th of every N launches (run N such processes in parallel: "
                        "Triton compiles on one CPU core per process)")
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks/decode_attention.json"))
    args = p.parse_args(argv)
    index, _, count = args.shard.partition("/")
    if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
        p.error(f"--shard {args.shard!r}: expected I/N with 0 <= I < N")
    args.shard = (int(index), int(count))
    if args.graph and args.device != "cuda":
        p.error("--graph replays CUDA graphs: it needs --device cuda")
    if args.control and args.device != "cuda" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        p.error("--control launches a Triton kernel: it needs --device cuda (or TRITON_INTERPRET=1 on CPU)")
    return args


def kernel_times_ms(fn, iters: int) -> dict:
    """Average device time per call of every CUDA kernel ``fn`` launches, by kernel name (ms)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    times = {e.key: e.device_time_total / 1e3 / iters for e in prof.key_averages() if e.device_time_total}
    return dict(sorted(times.items(), key=lambda kv: -kv[1]))


def parse_config(items: list[str], option: str = "--config") -> dict:
    """decode_attention config overrides from ``KEY=VALUE`` arguments (the benchmarks' ``option``): integers,
    and ``gluon=auto``."""
    from xq_compile.kernels.decode_attention import CONFIG_KEYS, GLUON_AUTO

    cfg = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in CONFIG_KEYS:
            raise SystemExit(f"{option} {item!r}: expected KEY=VALUE with KEY in {CONFIG_KEYS}")
        cfg[key] = value if (key, value) == ("gluon", GLUON_AUTO) else int(value)
    return cfg


def sweep_configs(default: dict, gluon: bool = False) -> list[dict]:
    """Alternatives to the default configuration worth timing on a GPU (see default_config's docstring
    for why the default is what it is): wider and shorter tiles, other pipelining depths, channel
    steps, split counts and projection blocks; with ``gluon``, instead, the Gluon scores kernel's
    variants (Hopper; timed apart, ``--sweep-gluon``, so that a kernel never run on a GPU before cannot
    take the Triton sweep down with it). Each is a dict of overrides ({} = the default, first);
    overrides that come to the default or to an earlier entry are left out."""
    h, splits = default["block_h"], default["num_splits"]
    candidates = [
        {},
        {"block_h": max(1, h // 2)},                           # half the features per tile (up to 128)
        {"block_n": 64, "num_warps": 4},                       # 64 rows on one warpgroup
        {"block_n": 64, "block_h": max(1, h // 2), "num_warps": 4},
        # 256 rows by half the features: if the 7B scores kernel (39% of peak on the H200 with its MMAs in
        # flight) waits on Wk from L2 (32 KB per 64-channel step of a 128 x 256 tile), this halves those
        # bytes per FLOP, for twice the dequantization per FLOP; sm_90 compiles it without spills in the
        # MMA loop (the GQA latent's with 32 channels per step: at 64 it needs 288 KB of shared memory)
        {"block_n": 256, "block_h": max(1, h // 2)},
        {"block_n": 256, "block_h": max(1, h // 2), "block_c": 32},
        {"num_stages": 2},
        {"num_stages": 4},
        {"block_c": 32},
        {"num_splits": 2 * splits},
        {"num_splits": max(1, splits // 2)},
        {"num_splits": max(1, splits // 4)},
        {"block_d": 2 * default["block_d"]},                  # half as many Wv projection programs
    ]
    short_loop = default["block_n"] == 64 and default["num_warps"] == 4
    if short_loop:  # the short channel loops' tile: also time
        candidates += [{"block_h": 2 * h},                                # twice the features,
                       {"block_n": 128, "block_h": 2 * h, "num_warps": 8}]  # the long loops' tile
    if gluon:
        from xq_compile.kernels.decode_attention import gluon_scores
        from xq_compile.kernels.decode_attention.config import interpreted

        # Hopper: the Gluon scores kernel (opt-in until timed here) in the default tile, on one warpgroup
        # of 64 rows and, for short loops (small models), with twice the features (its dequantization then
        # feeds twice the MMA work) and with the head tile's W resident in shared memory (gluon=2); each
        # form of the default tile also warp-specialized (gluon_ws=1: 4 more warps dequantize for the MMA
        # warps; declined for 8-bit keys in 128-row tiles, which the timed run reports)
        candidates = [{}]
        if gluon_scores.HAS_GLUON and not default["x_as_b"] and not interpreted():
            candidates += [{"gluon": 1}, {"gluon": 1, "gluon_ws": 1}, {"gluon": 1, "block_n": 64, "num_warps": 4}]
            if short_loop:
                candidates += [{"gluon": 1, "block_h": 2 * h},
                               {"gluon": 1, "block_n": 128, "block_h": 2 * h, "num_warps": 8},
                               {"gluon": 2}, {"gluon": 2, "gluon_ws": 1}, {"gluon": 2, "block_h": 2 * h}]
    configs, seen = [], []
    for over in candidates:
        if {**default, **over} not in seen:
            seen.append({**default, **over})
            configs.append(over)
    return configs


def swept_configs(args, default: dict) -> list[dict]:
    """What the run sweeps ({} first): sweep_configs() with --sweep, its Gluon set with --sweep-gluon, both
    with both; [{}] with neither."""
    configs = sweep_configs(default) if args.sweep else [{}]
    if args.sweep_gluon:
        configs += [c for c in sweep_configs(default, gluon=True) if c not in configs]
    return configs


try:
    import triton
    import triton.language as tl
except ImportError:  # the benchmark's torch paths (and the op's CPU kernel) need no triton
    triton = None

if triton is not None:

    @triton.jit
    def _control_matmul_kernel(a_ptr, b_ptr, c_ptr, K, s_am, s_ak, s_bk, s_bn, s_cm, s_cn,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """C = A·B in bf16, both operand tiles loaded straight from global memory in the loop: the case
        Triton's pipeliner turns into multi-buffered loads and asynchronous wgmma (``wait_group 1``). The
        compile report's positive control, and ``--control``'s plain matmul in the scores kernel's tile."""
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            a = tl.load(a_ptr + rm[:, None] * s_am + (k0 + rk)[None, :] * s_ak)
            b = tl.load(b_ptr + (k0 + rk)[:, None] * s_bk + rn[None, :] * s_bn)
            acc = tl.dot(a, b, acc)
        tl.store(c_ptr + rm[:, None] * s_cm + rn[None, :] * s_cn, acc.to(c_ptr.dtype.element_ty))


def control_tiles(shape: dict, default: dict) -> dict[str, dict]:
    """The scores kernel's K tile as plain-matmul blocks (rows x features x channels per step, warps,
    stages): its default one ("scores tile"), and the sweep's 256 rows by half the features."""
    from xq_compile.kernels.decode_attention.config import pow2_at_least_16
    from xq_compile.kernels.tiles import next_power_of_2

    heads = min(default["block_h"], next_power_of_2(shape["Hkv"]))
    head_width = 2 * pow2_at_least_16(shape["D"] // 2)
    tile = lambda rows, h: dict(BLOCK_M=rows, BLOCK_N=h * head_width, BLOCK_K=default["block_c"],  # noqa: E731
                                num_warps=default["num_warps"], num_stages=default["num_stages"])
    return {"scores tile": tile(default["block_n"], heads), "256-row tile": tile(256, max(1, heads // 2))}


def control_matmul(shape: dict, n: int, tile: dict, dtype, dev) -> tuple:
    """(kernel, grid, args, kwargs) of a plain bf16 matmul X [n, C] · Wkᵀ [C, Hkv·D] in ``tile``: the K
    rebuild's MMA work and Wk traffic without the dequantization, RoPE and scores (features and rows
    padded to whole tiles, as the scores kernel's grid pads them)."""
    c, features = shape["Ck"], shape["Hkv"] * shape["D"]
    rows = -(-n // tile["BLOCK_M"]) * tile["BLOCK_M"]
    padded = -(-features // tile["BLOCK_N"]) * tile["BLOCK_N"]
    g = torch.Generator(device=dev).manual_seed(1)
    x = torch.randn(rows, c, device=dev, generator=g, dtype=dtype)
    w = torch.randn(padded, c, device=dev, generator=g, dtype=dtype) / math.sqrt(c)
    out = torch.empty(rows, padded, device=dev, dtype=dtype)
    wt = w.t()  # [C, features] with the channel stride 1, as the scores kernel reads Wk
    grid = (rows // tile["BLOCK_M"], padded // tile["BLOCK_N"])
    return _control_matmul_kernel, grid, (x, wt, out, c, *x.stride(), *wt.stride(), *out.stride()), dict(tile)


def _per_channel(x: torch.Tensor, bits: int, group: int):
    """KIVI-style codes/scale/zero: groups of ``group`` tokens per channel (L a multiple of group)."""
    from xq_compile import quant

    B, L, C = x.shape
    padded = -(-L // group) * group  # scale/zero cover ceil(L / group) token groups
    x = torch.cat([x, x[:, : padded - L]], 1) if padded > L else x
    g = x.float().view(B, padded // group, group, C)
    low, high = g.amin(2), g.amax(2)
    scale = ((high - low) / ((1 << bits) - 1)).to(torch.float16)
    zero = low.to(torch.float16)
    safe = torch.where(scale.float() > 0, scale.float(), torch.ones_like(scale.float()))
    codes = ((g - zero.float()[:, :, None]) / safe[:, :, None]).round().clamp(0, (1 << bits) - 1).to(torch.uint8)
    return quant.pack(codes.view(B, padded, C)[:, :L], bits), scale, zero


def make_inputs(shape: dict, B: int, L: int, S: int, bits: int, dtype, dev) -> dict:
    from xq_compile import quant

    g = torch.Generator(device=dev).manual_seed(0)
    Hq, Hkv, D, Ck = shape["Hq"], shape["Hkv"], shape["D"], shape["Ck"]
    Cv = shape["Cv"] or Ck
    x = torch.randn(B, L, Ck, device=dev, generator=g, dtype=dtype)
    a = dict(k_tail=None, v_packed=None, v_scale=None, v_zero=None, v_tail=None, col0=None)
    if shape["k_layout"] == "per_token":
        codes, a["k_scale"], a["k_zero"] = quant.quantize(x, bits, shape["k_group"])
        a["k_packed"] = quant.pack(codes, bits)
    else:
        a["k_packed"], a["k_scale"], a["k_zero"] = _per_channel(x, bits, shape["k_group"])
        a["k_tail"] = torch.randn(B, shape["k_group"], Ck, device=dev, generator=g, dtype=dtype)
    if shape["col0"]:
        a["col0"] = x[..., 0].to(torch.float16)
    if shape["Cv"] is not None:
        xv = torch.randn(B, L, Cv, device=dev, generator=g, dtype=dtype)
        codes, a["v_scale"], a["v_zero"] = quant.quantize(xv, bits, shape["v_group"])
        a["v_packed"] = quant.pack(codes, bits)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2, device=dev, dtype=torch.float32) / D))
    emb = torch.arange(L, device=dev, dtype=torch.float32)[:, None] * inv_freq
    emb = torch.cat([emb, emb], -1).expand(B, L, D)
    return dict(
        query=torch.randn(B, Hq, S, D, device=dev, generator=g, dtype=dtype),
        k_packed=a["k_packed"], k_scale=a["k_scale"], k_zero=a["k_zero"], k_tail=a["k_tail"],
        v_packed=a["v_packed"], v_scale=a["v_scale"], v_zero=a["v_zero"], v_tail=a["v_tail"], col0=a["col0"],
        k_weight=(torch.randn(Hkv * D, Ck, device=dev, generator=g) / math.sqrt(Ck)).to(dtype), k_bias=None,
        v_weight=(torch.randn(Hkv * D, Cv, device=dev, generator=g) / math.sqrt(Cv)).to(dtype), v_bias=None,
        cos=emb.cos().to(dtype).contiguous(), sin=emb.sin().to(dtype).contiguous(), mask=None,
        length=torch.tensor(L, device=dev),
        k_bits=bits, k_group=shape["k_group"], k_layout=shape["k_layout"],
        v_bits=bits, v_group=shape.get("v_group", shape["k_group"]), v_layout="per_token", sm_scale=D ** -0.5,
    )


def unfused(a: dict, n: int) -> torch.Tensor:
    """The XQuant path without the fused op: rebuild K (dequant_project), RoPE and absorbed values in torch."""
    from xq_compile.attention import absorbed_attention
    from xq_compile.kernels import decode_attention as da

    inputs = da.DecodeAttentionInputs.from_op_args(**a)
    q = a["query"]
    B, Hq, S, D = q.shape
    Hkv = a["k_weight"].shape[0] // D
    dtype = a["k_weight"].dtype
    if a["k_layout"] == "per_token" and a["col0"] is None:
        k = torch.ops.xq_compile.dequant_project(a["k_packed"], a["k_scale"], a["k_zero"], a["k_weight"],
                                                 a["k_bias"], a["length"], a["k_bits"], a["k_group"])[:, :n]
        x_k = None
    else:
        x_k = da.source_rows(inputs.keys, n, dtype)
        if a["col0"] is not None:
            x_k = torch.cat([a["col0"][:, :n, None].to(dtype), x_k[..., 1:]], -1)
        k = F.linear(x_k, a["k_weight"], a["k_bias"])
    k = k.view(B, n, Hkv, D).transpose(1, 2)
    cos, sin = a["cos"][:, None, :n], a["sin"][:, None, :n]
    k = k * cos + da.rotate_half(k) * sin
    if inputs.values is None and x_k is not None:
        x_v = x_k
    else:
        x_v = da.source_rows(inputs.value_source, n, dtype)
    return absorbed_attention(q, k, x_v, a["v_weight"], a["v_bias"], None, scale=a["sm_scale"], query_heads=Hq,
                              kv_heads=Hkv, head_dim=D, seq_len=S, mask_is_bool=True)


def time_ms(fn, dev: str, iters: int, repeats: int, max_round_ms: float = float("inf")) -> float:
    def synced():
        fn()
        if dev == "cuda":
            torch.cuda.synchronize()

    synced()  # the first call compiles
    t0 = time.perf_counter()
    synced()
    one_ms = max((time.perf_counter() - t0) * 1e3, 1e-6)
    iters = max(1, min(iters, int(max_round_ms / one_ms)))
    rounds = []
    for _ in range(repeats):
        if dev == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            torch.cuda.synchronize()
            rounds.append(start.elapsed_time(end) / iters)
        else:
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            rounds.append((time.perf_counter() - t0) * 1e3 / iters)
    return statistics.median(rounds)


def graph_time_ms(fn, iters: int, repeats: int) -> float:
    """Device time per call of ``fn`` replayed from a CUDA graph that holds ``iters`` calls (the launches'
    host overhead is paid at capture, not per replay), median of ``repeats`` replays."""
    fn()  # compiles outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    rounds = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        rounds.append(start.elapsed_time(end) / iters)
    return statistics.median(rounds)


def timed_ms(args, fn) -> float:
    """``fn``'s time as the run was asked to measure it: replayed from a CUDA graph (``--graph``), else
    eager (:func:`time_ms`)."""
    if args.graph:
        return graph_time_ms(fn, args.iters, args.repeats)
    return time_ms(fn, args.device, args.iters, args.repeats, args.max_round_ms)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest deviation from the reference, relative to the reference's largest magnitude."""
    return ((out.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()


def fused_launcher(a: dict, config: dict):
    """The fused op on the inputs ``a``: through the registered op for the default configuration (what the
    rewritten graphs call), else its Triton launcher with the ``config`` overrides."""
    from xq_compile.kernels import decode_attention as da

    if config:
        return lambda: da.decode_attention_triton(da.DecodeAttentionInputs.from_op_args(**a), **config)
    return lambda: torch.ops.xq_compile.decode_attention.default(**a)


def compile_only(args, config: dict, dtype) -> int:
    """Launch, once each and untimed, this shard's share of the kernels the timed run launches. Triton
    compiles a kernel at its first launch and keeps it in its disk cache (``TRITON_CACHE_DIR``), keyed
    by the specialization: the capacity (max of --lengths) and the shapes are those of the timed run,
    and the length is read on the device, so every timed launch then finds its kernel compiled."""
    from xq_compile.kernels import decode_attention as da

    index, count = args.shard
    L, t_start, job, failures = max(args.lengths), time.perf_counter(), 0, 0
    for name in args.shape:
        a = make_inputs(SHAPES[name], args.batch, L, args.queries, args.bits, dtype, args.device)
        overrides = swept_configs(args, da.resolve_config(da.DecodeAttentionInputs.from_op_args(**a)))[1:]
        launches = {"unfused": [lambda n=n: unfused(a, n) for n in args.lengths],
                    "fused": [fused_launcher(a, config)]}
        launches.update({f"sweep {over}": [fused_launcher(a, {**config, **over})]
                         for over in overrides})
        if args.control:
            default = da.resolve_config(da.DecodeAttentionInputs.from_op_args(**a))
            for tile_name, tile in control_tiles(SHAPES[name], default).items():
                kernel, grid, kernel_args, kwargs = control_matmul(SHAPES[name], args.batch * L, tile, dtype,
                                                                   args.device)
                launches[f"control {tile_name}"] = [partial(kernel[grid], *kernel_args, **kwargs)]
        for what, calls in launches.items():
            job += 1
            if (job - 1) % count != index:
                continue
            try:
                for call in calls:
                    call()
                if args.device == "cuda":
                    torch.cuda.synchronize()
            except Exception as exc:  # a config that does not compile is reported by the timed run
                failures += 1
                print(f"{name} {what}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                continue
            print(f"{name} {what}: compiled [{time.perf_counter() - t_start:.0f}s]", flush=True)
    print(f"shard {index}/{count}: {job} launch groups in all, done in {time.perf_counter() - t_start:.0f}s "
          f"({failures} failed)")
    return 0


def measure(args, name: str, a: dict, n: int, config: dict, dtype) -> dict:
    """One row: the fused op, the unfused path and SDPA at n cached rows (and the sweep, the profile)."""
    from xq_compile.kernels import decode_attention as da

    dev, B, S = args.device, args.batch, args.queries
    shape = SHAPES[name]
    Hq, Hkv, D, Ck = shape["Hq"], shape["Hkv"], shape["D"], shape["Ck"]
    Cv = shape["Cv"] or Ck
    a["length"] = torch.tensor(n, device=dev)
    kc = torch.randn(B, Hkv, n, D, device=dev, dtype=dtype)
    vc = torch.randn(B, Hkv, n, D, device=dev, dtype=dtype)
    q = a["query"]
    fns = {
        "fused": fused_launcher(a, config),
        "unfused": lambda: unfused(a, n),
        "sdpa": lambda: F.scaled_dot_product_attention(q, kc, vc, enable_gqa=Hq != Hkv),
    }
    # correctness of what is timed: fused against the unfused path
    ref = unfused(a, n).float()
    err = rel_err(fns["fused"](), ref)
    ms = {k: time_ms(f, dev, args.iters, args.repeats, args.max_round_ms) for k, f in fns.items()}
    if args.graph:
        ms.update({f"{k}_graph": graph_time_ms(fns[k], args.iters, args.repeats) for k in ("fused", "sdpa")})
    flops = B * (2 * n * Ck * D * Hkv + 2 * n * D * Hq * S + 2 * n * Cv * Hq * S)
    tflops = flops / (ms["fused"] * 1e-3) / 1e12
    sweep = []
    if (args.sweep or args.sweep_gluon) and n >= min(args.sweep_min_length, max(args.lengths)):
        for over in swept_configs(args, da.resolve_config(da.DecodeAttentionInputs.from_op_args(**a))):
            run = fused_launcher(a, {**config, **over})
            try:
                e = rel_err(run(), ref)
                t = timed_ms(args, run)
            except Exception as exc:  # a config that does not compile (shared memory...) is a result
                sweep.append({"config": over, "error": f"{type(exc).__name__}: {exc}"[:300]})
                print(f"    sweep {over}: {type(exc).__name__}", flush=True)
                continue
            sweep.append({"config": over, "ms": t, "graph": args.graph, "tflops": flops / (t * 1e-3) / 1e12,
                          "rel_err": e})
            print(f"    sweep {over}: {t:.3f} ms{' (CUDA graph)' if args.graph else ''} "
                  f"({sweep[-1]['tflops']:.1f} TFLOP/s), rel err {e:.1e}", flush=True)
    kernels = kernel_times_ms(fns["fused"], args.iters) if args.profile and dev == "cuda" else {}
    if kernels:
        print("    kernels: " + ", ".join(f"{k} {v:.3f} ms" for k, v in list(kernels.items())[:6]), flush=True)
    control = measure_control(args, shape, n, da.resolve_config(da.DecodeAttentionInputs.from_op_args(**a)),
                              kernels, dtype) if args.control else {}
    graph = {}
    if args.graph:
        graph_tflops = flops / (ms["fused_graph"] * 1e-3) / 1e12
        graph = {"fused_graph_over_sdpa_graph": ms["fused_graph"] / ms["sdpa_graph"],
                 "fused_graph_tflops": graph_tflops,
                 "graph_fraction_of_h200_bf16_peak": graph_tflops / H200_BF16_DENSE_TFLOPS}
    return {"shape": name, "n": n, "ms": ms, **graph, "fused_over_sdpa": ms["fused"] / ms["sdpa"], "kernel_ms": kernels,
            "unfused_over_sdpa": ms["unfused"] / ms["sdpa"], "fused_speedup_over_unfused": ms["unfused"] / ms["fused"],
            "fused_tflops": tflops, "fraction_of_h200_bf16_peak": tflops / H200_BF16_DENSE_TFLOPS,
            "gflop": flops / 1e9, "max_rel_err_vs_unfused": err, "config": config, "sweep": sweep,
            "control": control}


def measure_control(args, shape: dict, n: int, default: dict, kernels: dict, dtype) -> dict:
    """The K rebuild's FLOPs (2·n·Ck·Hkv·D per batch row) as % of peak: in the scores kernel (its device
    time from --profile, which includes RoPE and the scores), in plain Triton bf16 matmuls of its tiles,
    and in torch.mm -- how far the dequantization keeps the tile from what the tile itself reaches."""
    dev, rows = args.device, args.batch * n
    rebuild_flops = 2 * rows * shape["Ck"] * shape["Hkv"] * shape["D"]

    times, tiles = {}, {}
    if "_scores_kernel" in kernels:
        times["scores kernel"] = kernels["_scores_kernel"]
    for name, tile in control_tiles(shape, default).items():
        kernel, grid, kernel_args, kwargs = control_matmul(shape, rows, tile, dtype, dev)
        kernel[grid](*kernel_args, **kwargs)
        x, wt, out = kernel_args[:3]  # what is timed computes X·Wkᵀ
        err = rel_err(out, x.float() @ wt.float())
        if err > 2e-2:
            raise AssertionError(f"control matmul {tile}: relative error {err:.1e}")
        times[f"triton, {name}"] = timed_ms(args, lambda: kernel[grid](*kernel_args, **kwargs))
        tiles[f"triton, {name}"] = f"{tile['BLOCK_M']}x{tile['BLOCK_N']}"
    g = torch.Generator(device=dev).manual_seed(2)
    x = torch.randn(rows, shape["Ck"], device=dev, generator=g, dtype=dtype)
    w = torch.randn(shape["Hkv"] * shape["D"], shape["Ck"], device=dev, generator=g, dtype=dtype)
    times["torch.mm"] = timed_ms(args, lambda: torch.mm(x, w.t()))
    out = {k: {"ms": t, "fraction_of_h200_bf16_peak": rebuild_flops / (t * 1e-3) / 1e12 / H200_BF16_DENSE_TFLOPS,
               **({"tile": tiles[k]} if k in tiles else {})} for k, t in times.items()}
    print("    K rebuild: " + ", ".join(f"{k}{' ' + v['tile'] if 'tile' in v else ''} {v['ms']:.3f} ms "
                                      f"({100 * v['fraction_of_h200_bf16_peak']:.1f}%)" for k, v in out.items()),
          flush=True)
    return out


def tables(rows: list[dict]) -> str:
    header = ["shape", "n", "fused ms", "unfused ms", "sdpa ms", "fused/sdpa", "unfused/fused", "TFLOP/s", "% peak",
              "rel err"]
    graphed = any("fused_graph" in r.get("ms", {}) for r in rows)
    if graphed:
        header[3:3] = ["graph ms", "graph % peak", "graph fused/sdpa"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['n']} | failed: {r['error'][:120]} |" + " |" * (len(header) - 3))
            continue
        graph_cells = (f"{r['ms']['fused_graph']:.3f} | {100 * r['graph_fraction_of_h200_bf16_peak']:.1f} | "
                       f"{r['fused_graph_over_sdpa_graph']:.2f} | ") if graphed else ""
        lines.append(f"| {r['shape']} | {r['n']} | {r['ms']['fused']:.3f} | {graph_cells}{r['ms']['unfused']:.3f} | "
                     f"{r['ms']['sdpa']:.3f} | {r['fused_over_sdpa']:.2f} | {r['fused_speedup_over_unfused']:.2f} | "
                     f"{r['fused_tflops']:.1f} | {100 * r['fraction_of_h200_bf16_peak']:.1f} | "
                     f"{r['max_rel_err_vs_unfused']:.1e} |")
    swept = [r for r in rows if any("ms" in c for c in r.get("sweep", []))]
    if swept:
        timing = "CUDA-graph" if graphed else "eager"
        lines += ["", f"| shape | n | default ms ({timing}) | best config | best ms | best TFLOP/s | best % peak |",
                  "|---|---|---|---|---|---|---|"]
        for r in swept:
            best = min((c for c in r["sweep"] if "ms" in c), key=lambda c: c["ms"])
            default_ms = next((c["ms"] for c in r["sweep"] if c["config"] == {} and "ms" in c), float("nan"))
            lines.append(f"| {r['shape']} | {r['n']} | {default_ms:.3f} | {best['config'] or 'default'} | "
                         f"{best['ms']:.3f} | {best['tflops']:.1f} | {100 * best['tflops'] / H200_BF16_DENSE_TFLOPS:.1f} |")
    controlled = [r for r in rows if r.get("control")]
    if controlled:
        names = list(dict.fromkeys(k for r in controlled for k in r["control"]))
        lines += ["", "K rebuild FLOPs as % of dense bf16 peak (ms):", "",
                  "| shape | n | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
        for r in controlled:
            cells = [f"{100 * c['fraction_of_h200_bf16_peak']:.1f}% ({c['ms']:.3f}"
                     + (f", {c['tile']})" if "tile" in c else ")") if (c := r["control"].get(k)) else ""
                     for k in names]
            lines.append(f"| {r['shape']} | {r['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    import xq_compile.kernels  # noqa: F401 - registers the ops

    dev, dtype = args.device, DTYPES[args.dtype]
    if dev == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda but no CUDA device")
    config = parse_config(args.config)
    if args.compile_only:
        return compile_only(args, config, dtype)
    L = max(args.lengths)
    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
           "dtype": str(dtype), "batch": args.batch, "queries": args.queries, "bits": args.bits, "capacity": L}
    print(env, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    t_start = time.perf_counter()

    def save() -> str:  # after every row too: a run cut short by a timeout keeps what it measured
        table = tables(rows)
        args.out.write_text(json.dumps({"environment": env, "args": {k: str(v) for k, v in vars(args).items()},
                                        "rows": rows, "table": table}, indent=2))
        return table

    for name in args.shape:
        a = make_inputs(SHAPES[name], args.batch, L, args.queries, args.bits, dtype, dev)
        for n in args.lengths:
            try:
                row = measure(args, name, a, n, config, dtype)
            except Exception as exc:  # noqa: BLE001 - one failing shape must not lose the others' results
                traceback.print_exc(limit=4)
                rows.append({"shape": name, "n": n, "error": f"{type(exc).__name__}: {exc}"[:500]})
                print(f"{name:8s} n={n:6d}: FAILED {rows[-1]['error']}", flush=True)
                save()
                continue
            rows.append(row)
            ms = row["ms"]
            graph = (f", CUDA graph {ms['fused_graph']:.3f} ms ({100 * row['graph_fraction_of_h200_bf16_peak']:.1f}% "
                     f"of peak; sdpa {ms['sdpa_graph']:.3f} ms)") if args.graph else ""
            print(f"{name:8s} n={n:6d}: fused {ms['fused']:.3f} ms ({row['fused_tflops']:.1f} TFLOP/s, "
                  f"{100 * row['fraction_of_h200_bf16_peak']:.1f}% of peak){graph}, unfused {ms['unfused']:.3f} ms, "
                  f"sdpa {ms['sdpa']:.3f} ms; fused/sdpa {row['fused_over_sdpa']:.2f}x, "
                  f"rel err {row['max_rel_err_vs_unfused']:.1e} [{time.perf_counter() - t_start:.0f}s]", flush=True)
            save()
    print("\n" + save())
    print(f"\nwrote {args.out} ({time.perf_counter() - t_start:.0f}s)")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
