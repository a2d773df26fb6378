"""The K/V rebuild (dequantize + project) as xquant emits it, against torch.mm of the same shape.

    python benchmarks/rebuild_op.py --out docs/benchmarks/$(date +%F)-cpu

For each bit width and fill n (capacity L = max(n) tokens, d = 576, N = d_kv = 576, SmolLM2's MHA shape):
  * ``mm``        torch.mm(x[B·n, d], Wᵀ) in the model dtype: the compute floor of the rebuild;
  * ``compiled``  what the CPU rewrite emits, compiled by torch.compile (Inductor):
                  n = length.item(); F.linear(quant.dequantize(codes[:, :n], scale[:, :n], zero[:, :n]), W)
                  with n data-dependent (one graph for every n, like the decode graph);
  * ``dequant``   the compiled dequantize alone (where the overhead over mm goes);
  * ``op``        torch.ops.xq_compile.dequant_project (eager; on CUDA its Triton kernel) over capacity L.
All are timed in the same rounds, in rotating order; medians. Target on CPU: compiled / mm <= 1.3.
"""

from __future__ import annotations

import datetime
import argparse
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DTYPES, environment, md_table, median, timed, write_json  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 8])
    p.add_argument("--n", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--out-features", type=int, default=576)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=25)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU); see decode_step.py")
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks") / f"{datetime.date.today()}-cpu")
    return p.parse_args(argv)


def make_rebuild(bits: int, group_size: int, max_len: int, dtype: torch.dtype, project: bool):
    """The rebuild compiled by Inductor; call it inside ``capture_scalar_outputs()`` (n = length.item()
    stays in the graph, as in the rewrite's decode graph)."""
    from xq_compile import quant
    from xq_compile._torch_private import check

    def rebuild(codes, scale, zero, w, length):
        n = length.item()
        check(n >= 1)
        check(n <= max_len)
        x_hat = quant.dequantize(codes.narrow(1, 0, n), scale.narrow(1, 0, n), zero.narrow(1, 0, n),
                                 bits, group_size, dtype)
        return F.linear(x_hat, w) if project else x_hat

    return torch.compile(rebuild, backend="inductor", fullgraph=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from xq_compile._torch_private import capture_scalar_outputs

    with capture_scalar_outputs():  # for this run only: importing or calling main() leaves Dynamo's config as it was
        return measure(args)


def measure(args) -> int:
    from xq_compile import quant
    from xq_compile.kernels import dequant_project  # noqa: F401 - registers the op
    from xq_compile.kernels import gluon_rebuild

    op = torch.ops.xq_compile.dequant_project.default
    dtype, dev = DTYPES[args.dtype], args.device
    d, N, g, B = args.hidden, args.out_features, args.group_size, args.batch
    L = max(args.n)
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(N, d, generator=gen).to(dev, dtype)
    x_full = torch.randn(B * L, d, generator=gen).to(dev, dtype)
    results = {"environment": environment(dev), "args": {k: str(v) for k, v in vars(args).items()}, "rows": []}
    print(results["environment"], flush=True)
    for bits in args.bits:
        x = torch.randn(B, L, d, generator=gen)
        codes, scale, zero = quant.quantize(x, bits, g)
        packed = quant.pack(codes, bits).to(dev)
        scale, zero = scale.to(dev), zero.to(dev)
        compiled = make_rebuild(bits, g, L, dtype, project=True)
        deq = make_rebuild(bits, g, L, dtype, project=False)
        # the Gluon K rebuild (not dispatched by the op) where it applies: Hopper, 4-bit, 16-bit weights
        gluon = (dev.startswith("cuda") and torch.cuda.get_device_capability(dev)[0] == 9
                 and gluon_rebuild.supports(w, bits, g))
        for n in args.n:
            length = torch.tensor(n, device=dev)
            xs = x_full[: B * n]
            # correctness of what is timed, and compile/warm-up
            ref = F.linear(quant.dequantize(packed[:, :n], scale[:, :n], zero[:, :n], bits, g, dtype), w)
            got = compiled(packed, scale, zero, w, length)
            got_op = op(packed, scale, zero, w, None, length, bits, g)[:, :n]
            tol = 1e-3 if dtype == torch.float32 else 5e-2
            outs = [got, got_op]
            if gluon:
                outs += [gluon_rebuild.dequant_project_gluon(packed, scale, zero, w, None, length, bits, g,
                                                             warp_specialize=ws)[:, :n] for ws in (False, True)]
            err = max((o.float() - ref.float()).abs().max().item() for o in outs)
            scale_ref = ref.float().abs().max().item()
            deq(packed, scale, zero, w, length)
            cands = {
                "mm": lambda: torch.mm(xs, w.t()),
                "compiled": lambda: compiled(packed, scale, zero, w, length),
                "dequant": lambda: deq(packed, scale, zero, w, length),
                "op": lambda: op(packed, scale, zero, w, None, length, bits, g),
            }
            if gluon:
                for name, ws in (("gluon", False), ("gluon_ws", True)):
                    cands[name] = partial(gluon_rebuild.dequant_project_gluon, packed, scale, zero, w, None, length,
                                          bits, g, warp_specialize=ws)
            for f in cands.values():
                f()
            times = {k: [] for k in cands}
            names = list(cands)
            for rep in range(args.repeats):
                for k in names[rep % len(names):] + names[: rep % len(names)]:
                    times[k].append(timed(cands[k], dev))
            med = {k: median(v) for k, v in times.items()}
            # Paired: each round's ratio of two timings taken next to each other, then the median over
            # rounds (cancels the slow load drift of a shared machine better than a ratio of medians).
            paired = {k: median([a / m for a, m in zip(times[k], times["mm"])]) for k in cands if k != "mm"}
            row = {"bits": bits, "n": n, "capacity": L, "median_s": med,
                   "compiled_over_mm": paired["compiled"], "op_over_mm": paired["op"],
                   "dequant_over_mm": paired["dequant"], "gluon_over_mm": paired.get("gluon"),
                   "gluon_ws_over_mm": paired.get("gluon_ws"),
                   "ratio_of_medians": {k: med[k] / med["mm"] for k in ("compiled", "dequant", "op")},
                   "mm_gflops": 2 * B * n * d * N / med["mm"] / 1e9, "max_abs_err": err,
                   "rel_err": err / max(scale_ref, 1e-12), "ok": err <= tol * max(scale_ref, 1.0)}
            results["rows"].append(row)
            print(f"bits {bits} n {n}: mm {med['mm'] * 1e3:.3f} ms ({row['mm_gflops']:.1f} GFLOP/s), "
                  f"compiled {row['compiled_over_mm']:.2f}x, dequant alone {row['dequant_over_mm']:.2f}x, "
                  f"op {row['op_over_mm']:.2f}x"
                  + (f", gluon {row['gluon_over_mm']:.2f}x, warp-specialized {row['gluon_ws_over_mm']:.2f}x"
                     if gluon else "") + f", rel err {row['rel_err']:.1e}",
                  flush=True)
            write_json(args.out / "rebuild_op.json", results)
    rows = results["rows"]
    worst = max(r["compiled_over_mm"] for r in rows)
    results["summary"] = {"compiled_over_mm_max": worst, "target": 1.3, "met": worst <= 1.3}
    write_json(args.out / "rebuild_op.json", results)
    table = md_table(
        ["bits", "n", "mm ms", "mm GFLOP/s", "compiled (dequant+linear) / mm", "dequant alone / mm",
         f"dequant_project op (capacity {L}) / mm", "max rel err"],
        [[r["bits"], r["n"], r["median_s"]["mm"] * 1e3, r["mm_gflops"], r["compiled_over_mm"], r["dequant_over_mm"],
          r["op_over_mm"], r["rel_err"]] for r in rows])
    text = (f"# Rebuild op benchmark\n\nd={d}, N={N}, group {g}, batch {B}, {args.dtype}, device {dev}, "
            f"threads {torch.get_num_threads()}; ratios are medians over {args.repeats} rounds of the ratio within a round "
            f"(rotating order); mm ms is the median time.\n\n{table}\n\n"
            f"worst compiled / mm: {worst:.2f} (target <= 1.3)\n")
    (args.out / "rebuild_op.md").write_text(text)
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
