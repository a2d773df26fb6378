"""Decode-step time of backend="xquant" + XQuantCache against a compiled StaticCache baseline.

    python benchmarks/decode_step.py --out docs/benchmarks/$(date +%F)-cpu            # CPU defaults
    python benchmarks/decode_step.py --device cuda --dtype bf16 --lengths 256 1024 4096 16384 32768 \
        --max-cache-len 32832 --out gpu_results/decode

Both models are compiled with fullgraph=True (the baseline with Inductor, xquant with the xquant
backend, whose inner compiler is Inductor), in the same ``--mode`` (``reduce-overhead``: CUDA graphs).
For every cached length L:
  1. each cache is reset and filled with L tokens by ONE prefill call (one dynamic-length prefill graph);
  2. decode steps are timed, alternating between the two (and the optional eager quanto cache) in
     ``--repeats`` rounds of ``--steps`` steps, so machine noise hits both alike; medians are reported.
     After every step the caches are cropped back by one token, so each step runs at exactly L cached
     tokens (the decode graph compiles once and serves every step and every length).
  3. the K/V rebuild FLOP model of docs/design.md §1 (4·n·d·d_kv per layer per step) is priced at the
     measured torch.mm time of the same shapes ([B·n, d] x [d, d_kv], twice per layer), timed in the
     same rounds: predicted = baseline step + layers · 2 · t_mm(n). Target: measured ≤ 1.25 × predicted.

Outputs under --out: decode_step.json, decode_step.md (tables) and decode_step.png (time vs length).
"""

from __future__ import annotations

import datetime
import argparse
import dataclasses
import gc
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DTYPES, build_model, environment, md_table, median, timed, write_json  # noqa: E402
from xq_compile._torch_private import mark_dynamic
from xq_compile.cache import cache_kwargs


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    p.add_argument("--max-cache-len", type=int, default=None,
                   help="capacity of both caches (fixed for all lengths); default max(lengths) + 64")
    p.add_argument("--layers", type=int, default=4, help="decoder layers of the random SmolLM2-shaped model")
    p.add_argument("--real", action="store_true", help="the real SmolLM2-135M (MHA form, 30 layers)")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--rotation", default="hadamard", choices=["hadamard", "none"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=3, help="decode steps per backend per round")
    p.add_argument("--repeats", type=int, default=5, help="rounds (alternating backends)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per backend per length")
    p.add_argument("--mode", default=None, choices=["reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune"],
                   help="torch.compile mode of both compiled models (the xquant backend hands it to its Inductor); "
                        "reduce-overhead: decode steps replay CUDA graphs, as a server would run them")
    p.add_argument("--attention-config", nargs="*", default=[], metavar="KEY=VALUE",
                   help="also time the xquant model with these decode_attention config overrides (e.g. gluon=auto: the "
                        "Gluon scores kernel wherever it can run) applied to its fused attention launches "
                        "(xq_compile.kernels.decode_attention.config_overrides): runner 'xquant[KEY=VALUE ...]'")
    p.add_argument("--quanto", action="store_true", help="also time transformers' QuantizedCache (quanto, eager)")
    p.add_argument("--rebuild-v", action="store_true",
                   help="also time xquant with absorb_values=False (V rebuilt for every cached row)")
    p.add_argument("--quanto-bits", type=int, nargs="+", default=[4, 2])
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (CPU); default: torch's. On a loaded shared machine use 1: "
                        "OpenMP spin barriers with >1 thread can make every kernel many times slower")
    p.add_argument("--profile-lengths", type=int, nargs="*", default=[],
                   help="after timing these lengths, profile a few steps of each compiled runner with "
                        "torch.profiler and write profile_<name>_L<length>.txt to --out")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks") / f"{datetime.date.today()}-cpu")
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------------
# Runners: one per cache kind. prefill(L) leaves exactly L cached tokens; step() decodes one token at
# position L and (for the static caches) crops back so the cache holds L tokens again.
# --------------------------------------------------------------------------------------------------


class StaticRunner:
    """A compiled forward plus a fixed-capacity cache (StaticCache or XQuantCache)."""

    def __init__(self, name, model, cache, backend, args):
        self.name, self.model, self.cache, self.args = name, model, cache, args
        self.device = args.device
        self.forward = torch.compile(model.forward, backend=backend, mode=args.mode, fullgraph=True)
        self.length = 0
        gen = torch.Generator().manual_seed(1)
        self.tokens = torch.randint(0, model.config.vocab_size, (args.batch, max(args.lengths) + 8), generator=gen)

    def _call(self, ids, positions):
        with torch.no_grad():
            return self.forward(input_ids=ids, position_ids=positions, **cache_kwargs(self.forward, self.cache), use_cache=True).logits

    def prefill(self, length: int) -> float:
        self.cache.reset()
        ids = self.tokens[:, :length].to(self.device)
        positions = torch.arange(length, device=self.device).expand(self.args.batch, -1).contiguous()
        # One prefill graph for every length (instead of a static graph, then a dynamic recompile).
        mark_dynamic(ids, 1)
        mark_dynamic(positions, 1)
        t = timed(lambda: self._call(ids, positions), self.device)
        self.length = length
        return t

    def step(self) -> float:
        ids = self.tokens[:, self.length:self.length + 1].to(self.device)
        positions = torch.full((self.args.batch, 1), self.length, device=self.device, dtype=torch.long)
        t = timed(lambda: self._call(ids, positions), self.device)
        for layer in self.cache.layers:  # back to exactly `length` cached tokens (outside the timing)
            # StaticLayer.crop(-1) is this, but transformers 5.17's StaticLayer has no crop
            layer.cumulative_length.sub_(1)
            if hasattr(layer, "host_length"):  # an XQuantLayer's host mirror of the counter
                layer.host_length -= 1
        return t


class ConfiguredRunner(StaticRunner):
    """A StaticRunner whose calls launch the fused attention op with decode_attention config overrides
    (``config_overrides``: the compiled graph passes the op no configuration)."""

    def __init__(self, name, model, cache, backend, args, attention_config: dict):
        super().__init__(name, model, cache, backend, args)
        self.attention_config = attention_config

    def _call(self, ids, positions):
        from xq_compile.kernels.decode_attention import config_overrides

        with config_overrides(**self.attention_config):
            return super()._call(ids, positions)


class QuantoRunner:
    """transformers' QuantizedCache with the quanto backend, eager (it is a dynamic cache: no crop)."""

    def __init__(self, name, model, nbits, args):
        self.name, self.model, self.nbits, self.args = name, model, nbits, args
        self.device = args.device
        gen = torch.Generator().manual_seed(1)
        self.tokens = torch.randint(0, model.config.vocab_size, (args.batch, max(args.lengths) + 64), generator=gen)
        self.length = 0

    def prefill(self, length: int) -> float:
        from transformers import QuantizedCache

        self.cache = QuantizedCache(backend="quanto", config=self.model.config, nbits=self.nbits)
        ids = self.tokens[:, :length].to(self.device)
        with torch.no_grad():
            t = timed(lambda: self.model(input_ids=ids, **cache_kwargs(self.model, self.cache), use_cache=True), self.device)
        self.length = length
        return t

    def step(self) -> float:
        ids = self.tokens[:, self.length:self.length + 1].to(self.device)
        positions = torch.full((self.args.batch, 1), self.length, device=self.device, dtype=torch.long)
        with torch.no_grad():
            t = timed(lambda: self.model(input_ids=ids, position_ids=positions, **cache_kwargs(self.model, self.cache), use_cache=True),
                      self.device)
        self.length += 1  # grows: a few tokens over L at most
        return t


def static_kv_bytes(config, batch: int, length: int, dtype: torch.dtype) -> int:
    """Bytes of a transformers StaticCache's K and V (what it allocates for ``length`` tokens)."""
    heads = config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * batch * heads * length * head_dim * elem


def rss() -> int | None:
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except Exception:  # noqa: BLE001
        return None


def main(argv=None) -> int:
    args = parse_args(argv)
    import xq_compile as xq
    from transformers import StaticCache

    if args.threads:
        torch.set_num_threads(args.threads)  # before compiling: Inductor's C++ kernels take it at codegen
    dtype = DTYPES[args.dtype]
    args.max_cache_len = args.max_cache_len or max(args.lengths) + 64
    if max(args.lengths) + 1 > args.max_cache_len:
        raise SystemExit(f"--max-cache-len {args.max_cache_len} must exceed the largest length {max(args.lengths)}")
    args.out.mkdir(parents=True, exist_ok=True)
    env = environment(args.device)
    print(f"environment: {env}", flush=True)

    model = build_model(args.layers, dtype, args.device, real=args.real)
    config = model.config
    d = config.hidden_size
    heads = config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    d_kv = heads * head_dim
    layers = config.num_hidden_layers
    xq_config = xq.XQuantConfig(bits=args.bits, group_size=args.group_size, rotation=args.rotation)

    # Caches are created (and the StaticCache allocated) before the first compiled call: a lazily
    # allocated StaticCache would be allocated inside the prefill graph (docs/design.md §3).
    rss0 = rss()
    base_cache = StaticCache(config=config, max_cache_len=args.max_cache_len)
    base_cache.early_initialization(args.batch, heads, head_dim, dtype, torch.device(args.device))
    rss1 = rss()
    xq_cache = xq.XQuantCache(config, max_batch_size=args.batch, max_cache_len=args.max_cache_len,
                              xquant=xq_config, dtype=dtype, device=args.device)
    rss2 = rss()
    runners = [StaticRunner("baseline", model, base_cache, "inductor", args),
               StaticRunner("xquant", model, xq_cache, "xquant", args)]
    if args.rebuild_v:
        rebuild_config = dataclasses.replace(xq_config, absorb_values=False)
        rebuild_cache = xq.XQuantCache(config, max_batch_size=args.batch, max_cache_len=args.max_cache_len,
                                       xquant=rebuild_config, dtype=dtype, device=args.device)
        runners.append(StaticRunner("xquant-rebuild-v", model, rebuild_cache, "xquant", args))
    if args.attention_config:
        from decode_attention import parse_config

        attention_config = parse_config(args.attention_config, "--attention-config")
        configured_cache = xq.XQuantCache(config, max_batch_size=args.batch, max_cache_len=args.max_cache_len,
                                          xquant=xq_config, dtype=dtype, device=args.device)
        runners.append(ConfiguredRunner(f"xquant[{' '.join(args.attention_config)}]", model, configured_cache,
                                        "xquant", args, attention_config))
    if args.quanto:
        runners += [QuantoRunner(f"quanto{b}", model, b, args) for b in args.quanto_bits]

    # Weight and activations for the mm floor: x̂ [B·n, d] x Wᵀ [d, d_kv], the shape of one rebuild.
    w = torch.randn(d_kv, d, device=args.device, dtype=dtype)
    x_all = torch.randn(args.batch * (max(args.lengths) + 1), d, device=args.device, dtype=dtype)

    results = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "environment": env, "model": {"layers": layers, "hidden": d, "kv_heads": heads, "head_dim": head_dim,
                                             "vocab": config.vocab_size, "real": args.real, "dtype": args.dtype},
               "memory_alloc": {"static_rss_delta": None if rss0 is None else rss1 - rss0,
                                "xquant_rss_delta": None if rss0 is None else rss2 - rss1,
                                "static_nbytes": sum(l.keys.nbytes + l.values.nbytes for l in base_cache.layers),
                                "xquant_nbytes": xq_cache.nbytes(), "max_cache_len": args.max_cache_len},
               "lengths": [], "failures": {}}
    active = list(runners)
    for length in args.lengths:
        row = {"length": length, "prefill_s": {}, "steps_s": {}, "compile_s": {}}
        print(f"\n== length {length} ==", flush=True)
        for r in list(active):
            try:
                t0 = time.perf_counter()
                row["prefill_s"][r.name] = r.prefill(length)
                for _ in range(args.warmup):  # the first step of the first length also compiles the decode graph
                    r.step()
                row["compile_s"][r.name] = time.perf_counter() - t0
                row["steps_s"][r.name] = []
            except Exception as e:  # noqa: BLE001 - record and keep going with the others
                msg = f"{type(e).__name__}: {e}".splitlines()[0][:500]
                print(f"  {r.name} failed at length {length}: {msg}", flush=True)
                traceback.print_exc(limit=3)
                results["failures"].setdefault(r.name, []).append({"length": length, "error": msg})
                if isinstance(r, StaticRunner):
                    active.remove(r)
        mm_times = []
        rounds = []  # per round: median step of each runner and of the mm pair (for paired ratios)
        x = x_all[: args.batch * (length + 1)]
        for rep in range(args.repeats):
            mark = {name: len(ts) for name, ts in row["steps_s"].items()}
            mm_mark = len(mm_times)
            order = [r for r in active if r.name in row["steps_s"]]
            if rep % 2:
                order.reverse()
            for r in order:
                for _ in range(args.steps):
                    row["steps_s"][r.name].append(r.step())
            for _ in range(args.steps):
                mm_times.append(timed(lambda: (torch.mm(x, w.t()), torch.mm(x, w.t())), args.device))
            rounds.append({**{name: median(ts[mark[name]:]) for name, ts in row["steps_s"].items()},
                           "mm_pair": median(mm_times[mm_mark:])})
        med = {name: median(ts) for name, ts in row["steps_s"].items()}
        row["median_step_s"] = med
        row["tokens_per_s"] = {name: args.batch / t for name, t in med.items() if t == t and t > 0}
        row["mm_pair_s"] = median(mm_times)  # K and V rebuild mm of one layer
        n = length + 1
        flops = 4 * args.batch * n * d * d_kv * layers
        row["rebuild_flops"] = flops
        row["mm_gflops"] = 4 * args.batch * n * d * d_kv / row["mm_pair_s"] / 1e9
        if "baseline" in med and "xquant" in med:
            row["predicted_xquant_s"] = med["baseline"] + layers * row["mm_pair_s"]
            # Paired within each round (timings taken next to each other), median over rounds.
            row["xquant_over_predicted"] = median(
                [r["xquant"] / (r["baseline"] + layers * r["mm_pair"]) for r in rounds])
            row["xquant_over_predicted_of_medians"] = med["xquant"] / row["predicted_xquant_s"]
            row["xquant_over_baseline"] = med["xquant"] / med["baseline"]
        for name, t in med.items():
            if name != "baseline" and "baseline" in med:
                row.setdefault("ratio_to_baseline", {})[name] = t / med["baseline"]
        row["memory"] = {
            "static_kv_bytes": static_kv_bytes(config, args.batch, length, dtype),
            "fp16_kv_bytes": static_kv_bytes(config, args.batch, length, torch.float16),
            "xquant_bytes": _xquant_bytes(xq, config, args, length, xq_config, dtype),
        }
        results["lengths"].append(row)
        if length in args.profile_lengths:
            for r in active:
                if isinstance(r, StaticRunner):
                    profile(r, args.out / f"profile_{r.name}_L{length}.txt", args.device)
        print("  median step ms: " + ", ".join(f"{k} {v * 1e3:.2f}" for k, v in med.items())
              + f" | mm pair {row['mm_pair_s'] * 1e3:.3f} ms ({row['mm_gflops']:.1f} GFLOP/s)"
              + (f" | xquant/pred {row['xquant_over_predicted']:.2f}" if "xquant_over_predicted" in row else ""),
              flush=True)
        write_json(args.out / "decode_step.json", results)  # partial results survive a later failure
        gc.collect()

    summarize(results, args)
    write_json(args.out / "decode_step.json", results)
    if not args.no_plot:
        try:
            plot(results, args.out / "decode_step.png")
        except Exception as e:  # noqa: BLE001
            print(f"plot failed: {e}")
    return 0


def profile(runner, path: Path, device: str, steps: int = 3) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(steps):
            runner.step()
    sort = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=90)
    path.write_text(f"{runner.name}: {steps} decode steps at {runner.length} cached tokens\n{table}\n")
    print(f"  profile of {runner.name} written to {path}", flush=True)


def _xquant_bytes(xq, config, args, length, xq_config, dtype) -> int:
    cache = xq.XQuantCache(config, max_batch_size=args.batch, max_cache_len=length, xquant=xq_config,
                           dtype=dtype, device="cpu")
    return cache.nbytes()


def summarize(results, args) -> None:
    rows = results["lengths"]
    names = sorted({n for r in rows for n in r["median_step_s"]}, key=lambda n: (n != "baseline", n != "xquant", n))
    by_len = {r["length"]: r for r in rows}
    first, last = min(by_len), max(by_len)
    summary = {}
    if "xquant" in by_len[first]["median_step_s"] and "xquant" in by_len[last]["median_step_s"]:
        summary["xquant_step_first_over_last"] = (by_len[first]["median_step_s"]["xquant"]
                                                   / by_len[last]["median_step_s"]["xquant"])
        summary["first_length"], summary["last_length"] = first, last
    preds = [r["xquant_over_predicted"] for r in rows if "xquant_over_predicted" in r]
    if preds:
        summary["xquant_over_predicted_max"] = max(preds)
    results["summary"] = summary

    m = results["model"]
    head = (f"Model: {'SmolLM2-135M (real, MHA form)' if m['real'] else 'SmolLM2-135M-shaped random MHA'}, "
            f"{m['layers']} layers, d={m['hidden']}, {m['kv_heads']} KV heads x {m['head_dim']}, {m['dtype']}; "
            f"batch {args.batch}; xquant {args.bits}-bit g{args.group_size} rotation={args.rotation}; "
            f"max_cache_len {args.max_cache_len} for every length; device {args.device}; "
            f"torch.compile mode {args.mode or 'default'}; "
            f"median of {args.repeats}x{args.steps} steps, backends alternated.")
    t1 = md_table(
        ["cached L"] + [f"{n} step ms" for n in names] + [f"{n} tok/s" for n in names]
        + [f"{n} / baseline" for n in names if n != "baseline"],
        [[r["length"]] + [r["median_step_s"].get(n, float("nan")) * 1e3 for n in names]
         + [r["tokens_per_s"].get(n, float("nan")) for n in names]
         + [r.get("ratio_to_baseline", {}).get(n, float("nan")) for n in names if n != "baseline"] for r in rows])
    t2 = md_table(
        ["cached L", "rebuild GFLOP/step", "mm GFLOP/s", "baseline ms", "predicted ms (baseline + rebuild at mm speed)",
         "xquant ms", "xquant / predicted (paired per round)"],
        [[r["length"], r["rebuild_flops"] / 1e9, r["mm_gflops"], r["median_step_s"].get("baseline", float("nan")) * 1e3,
          r.get("predicted_xquant_s", float("nan")) * 1e3, r["median_step_s"].get("xquant", float("nan")) * 1e3,
          r.get("xquant_over_predicted", float("nan"))] for r in rows])
    t3 = md_table(
        ["cached L", "StaticCache K/V bytes", "fp16 K/V bytes", "XQuantCache bytes", "XQuant / StaticCache",
         "XQuant / fp16 K/V"],
        [[r["length"], r["memory"]["static_kv_bytes"], r["memory"]["fp16_kv_bytes"], r["memory"]["xquant_bytes"],
          r["memory"]["xquant_bytes"] / r["memory"]["static_kv_bytes"],
          r["memory"]["xquant_bytes"] / r["memory"]["fp16_kv_bytes"]] for r in rows])
    lines = ["# Decode step benchmark", "", head, "", "## Step time", "", t1, "",
             "## xquant vs. the rebuild FLOP model (target: xquant / predicted <= 1.25)", "", t2, "",
             "## Cache memory (capacity = L tokens)", "", t3, ""]
    ma = results["memory_alloc"]
    lines += [f"Allocated at max_cache_len={ma['max_cache_len']}: StaticCache K/V {ma['static_nbytes']} bytes "
              f"(RSS delta {ma['static_rss_delta']}), XQuantCache {ma['xquant_nbytes']} bytes "
              f"(RSS delta {ma['xquant_rss_delta']}).", ""]
    if summary.get("xquant_step_first_over_last") is not None:
        lines.append(f"xquant step at L={first} / step at L={last}: {summary['xquant_step_first_over_last']:.3f} "
                     "(target <= 0.2)")
    if preds:
        lines.append(f"max xquant / predicted: {summary['xquant_over_predicted_max']:.2f} (target <= 1.25)")
    if results["failures"]:
        lines += ["", "## Failures", ""] + [f"- {name} at L={f['length']}: {f['error']}"
                                           for name, fs in results["failures"].items() for f in fs]
    text = "\n".join(lines) + "\n"
    (args.out / "decode_step.md").write_text(text)
    print("\n" + text)


def plot(results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["lengths"]
    names = sorted({n for r in rows for n in r["median_step_s"]})
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name in names:
        pts = [(r["length"], r["median_step_s"][name] * 1e3) for r in rows if name in r["median_step_s"]]
        ax.plot(*zip(*pts), marker="o", label=name)
    pred = [(r["length"], r["predicted_xquant_s"] * 1e3) for r in rows if "predicted_xquant_s" in r]
    if pred:
        ax.plot(*zip(*pred), linestyle="--", color="gray", label="baseline + rebuild at mm speed")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("cached tokens L")
    ax.set_ylabel("decode step (ms, median)")
    m = results["model"]
    ax.set_title(f"{m['layers']}-layer SmolLM2-shaped MHA, {m['dtype']}, {results['environment']['device']}, "
                 f"max_cache_len {results['args']['max_cache_len']}, mode {results['args']['mode'] or 'default'}",
                 fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
