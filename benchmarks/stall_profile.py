"""Where the fused decode-attention kernels stall on an NVIDIA GPU: the warps' PC samples per kernel and per
source line, with the reasons the sampled warps were not issuing.

    python benchmarks/stall_profile.py                       # the three shapes at n = 8192: default, gluon=auto
    python benchmarks/stall_profile.py --shape llama7b --configs default gluon=1 block_n=64,gluon=1 --lines 20

Timings say how far a kernel is from the tensor cores' peak, not why. The GPU's warp sampler (CUPTI PC
sampling, driven by Triton's profiler proton) records every few thousand cycles what each sampled warp is
doing: issuing ("selected"), or stalled and why -- waiting for a global load (long scoreboard), for shared
memory or a conversion (short scoreboard), at a barrier, for the MMA unit (math pipe throttle, wait), for
the memory pipes (lg / mio throttle), and so on. Summed per kernel and per source line, that tells apart
what ``docs/kernels.md`` ("What limits the scores kernel") could only list as candidates for the 7B scores
kernel's 2,600 clocks per step: the dequantization's latency, the wgmma waits, W from L2.

Per shape (``decode_attention.py``'s shapes, the capacity ``--capacity``, ``--n`` rows cached) and
configuration (``default``, or ``KEY=VALUE[,KEY=VALUE...]`` decode_attention config overrides, e.g.
``gluon=auto``: the Gluon scores kernel where it runs), the op runs ``--calls`` times eagerly under the
sampler (each launch is serialized by it; CUDA graphs are not sampled). Printed: per kernel its samples and
the share of each stall reason; for the scores kernels (``--kernels``) the ``--lines`` source lines with
most samples, each with its main reasons and its text. ``--out`` gets all of it as JSON, and proton's own
``.hatchet`` tree next to it.

CUDA 13 drivers: the CUPTI that triton 3.6 bundles (12.x) crashes in PC sampling there; the script points
proton at a CUDA 13 CUPTI from the ``nvidia-*`` wheels torch installs (``TRITON_CUPTI_LIB_PATH``, a folder
with ``libcupti.so``), unless that variable is already set.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import linecache
import os
import re
import site
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from decode_attention import DTYPES, SHAPES, make_inputs, parse_config  # noqa: E402

# "dir/file.py:123@kernel_name": one source line of one kernel (proton's name for a PC-sampled line)
_LINE = re.compile(r"^(?P<file>.+):(?P<line>\d+)@(?P<function>.+)$")
_SAMPLES, _STALLED = "num_samples", "num_stalled_samples"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", nargs="+", default=["llama7b", "gqa", "smollm2"], choices=list(SHAPES))
    p.add_argument("--configs", nargs="+", default=["default", "gluon=auto", "gluon=auto,gluon_ws=1"],
                   metavar="CONFIG", help="'default', or KEY=VALUE[,KEY=VALUE...] decode_attention config overrides "
                   "per configuration (by default: the Triton scores kernel, the Gluon one, the Gluon one "
                   "warp-specialized: whether its MMA warps wait for tiles or its dequantizing warps for slots)")
    p.add_argument("--n", type=int, default=8192, help="rows cached (the length the kernels read)")
    p.add_argument("--capacity", type=int, default=32768,
                   help="the cache's capacity L (decode_attention.py's timed runs use 32768: their kernels, "
                        "compiled or seeded, are found)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--bits", type=int, default=4, choices=[2, 3, 4, 8])
    p.add_argument("--calls", type=int, default=5, help="op calls sampled per shape and configuration")
    p.add_argument("--kernels", default="scores", help="kernels whose source lines are listed (a regex)")
    p.add_argument("--lines", type=int, default=12, help="source lines listed per kernel")
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks/stall_profile.json"))
    args = p.parse_args(argv)
    args.configs = {label: parse_config(label.split(","), "--configs") if label != "default" else {}
                    for label in args.configs}
    return args


def driver_cuda_major() -> int | None:
    """The CUDA major version the driver supports (cuDriverGetVersion), None without a driver."""
    try:
        version = ctypes.c_int()
        if ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version)) != 0:
            return None
        return version.value // 1000
    except OSError:
        return None


def cupti_dir(major: int | None, search_roots: list[str] | None = None) -> str | None:
    """A folder whose ``libcupti.so`` is a CUPTI of the driver's CUDA major release (13 and later; the
    CUPTI triton bundles suits 12.x drivers: None then), made of a symbolic link to the ``libcupti.so.<major>``
    of an ``nvidia-*`` wheel under ``search_roots`` (default: the site-packages folders). None if there is none."""
    if major is None or major < 13:
        return None
    roots = search_roots if search_roots is not None else site.getsitepackages() + [site.getusersitepackages()]
    found = sorted({path for root in roots if Path(root).is_dir()
                    for path in Path(root).glob(f"nvidia/**/libcupti.so.{major}*") if path.is_file()})
    if not found:
        return None
    folder = Path(tempfile.mkdtemp(prefix="xq_cupti_"))
    (folder / "libcupti.so").symlink_to(found[0].resolve())
    return str(folder)


def _reasons(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k.startswith("stalled_") and v}


def stalls_by_kernel(tree: list, scopes: list[str]) -> dict:
    """Sum proton's PC-sampling tree (its ``.hatchet`` JSON: ``[root, device info]``, nodes with ``frame``,
    ``metrics`` and ``children``) per (scope, kernel) and per source line. A line node is named
    ``file:line@kernel``; its scope is the nearest ancestor named in ``scopes``. Returns
    ``{scope: {kernel: {"samples", "stalled", "reasons": {reason: samples}, "lines": {"file:line": {"samples",
    "stalled", "reasons"}}}}}``."""
    out: dict = defaultdict(dict)

    def visit(node: dict, scope: str | None) -> None:
        name = node.get("frame", {}).get("name", "")
        scope = name if name in scopes else scope
        match = _LINE.match(name)
        metrics = node.get("metrics", {})
        if match and scope is not None and metrics.get(_SAMPLES):
            kernel = out[scope].setdefault(match["function"], {"samples": 0, "stalled": 0, "reasons": {}, "lines": {}})
            where = f"{match['file']}:{match['line']}"
            line = kernel["lines"].setdefault(where, {"samples": 0, "stalled": 0, "reasons": {}})
            for entry in (kernel, line):
                entry["samples"] += metrics[_SAMPLES]
                entry["stalled"] += metrics.get(_STALLED, 0)
                for reason, samples in _reasons(metrics).items():
                    entry["reasons"][reason] = entry["reasons"].get(reason, 0) + samples
        for child in node.get("children", []):
            visit(child, scope)

    for root in tree[:1]:  # the second entry is the device information
        visit(root, None)
    return {scope: dict(kernels) for scope, kernels in out.items()}


def _shares(reasons: dict, samples: int, top: int) -> str:
    ranked = sorted(reasons.items(), key=lambda kv: -kv[1])[:top]
    return ", ".join(f"{reason.removeprefix('stalled_')} {100 * n / max(samples, 1):.0f}%" for reason, n in ranked)


def report(stalls: dict, kernels: str, lines: int) -> str:
    """The text summary: per scope and kernel its samples and stall reasons; for kernels matching the regex
    ``kernels`` the ``lines`` busiest source lines with their reasons and text."""
    text = []
    for scope, by_kernel in stalls.items():
        text.append(f"== {scope}")
        for kernel, k in sorted(by_kernel.items(), key=lambda kv: -kv[1]["samples"]):
            text.append(f"  {kernel}: {k['samples']} samples, {100 * k['stalled'] / max(k['samples'], 1):.0f}% "
                        f"stalled -- {_shares(k['reasons'], k['samples'], 8)}")
            if not re.search(kernels, kernel):
                continue
            for where, line in sorted(k["lines"].items(), key=lambda kv: -kv[1]["samples"])[:lines]:
                file, _, number = where.rpartition(":")
                source = linecache.getline(file, int(number)).strip()[:90]
                text.append(f"    {100 * line['samples'] / k['samples']:5.1f}%  {Path(file).name}:{number:<5s} "
                            f"{_shares(line['reasons'], line['samples'], 3):<58s} | {source}")
    return "\n".join(text)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("stall_profile.py samples a GPU's warps: it needs CUDA (CUPTI PC sampling)")
    driver = driver_cuda_major()
    if "TRITON_CUPTI_LIB_PATH" not in os.environ:
        folder = cupti_dir(driver)
        if folder is not None:
            os.environ["TRITON_CUPTI_LIB_PATH"] = folder
    print(f"CUPTI from {os.environ.get('TRITON_CUPTI_LIB_PATH', 'triton (bundled)')}; driver CUDA {driver}",
          flush=True)
    import triton.profiler as proton

    import xq_compile.kernels  # noqa: F401 - registers the ops
    from xq_compile.kernels import decode_attention as da

    dtype, dev = DTYPES[args.dtype], "cuda"
    # every input made before sampling starts: PC sampling has crashed on non-Triton kernels in its window
    calls = {}
    for name in args.shape:
        a = make_inputs(SHAPES[name], 1, args.capacity, 1, args.bits, dtype, dev)
        a["length"].fill_(args.n)
        for label, config in args.configs.items():
            inputs = da.DecodeAttentionInputs.from_op_args(**a)
            calls[f"{name} n={args.n} {label}"] = (lambda inputs=inputs, config=config:
                                                     da.decode_attention_triton(inputs, **config))
    torch.cuda.synchronize()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    hatchet = args.out.with_suffix("")
    t0 = time.perf_counter()
    # before the first launch: the sampler maps PCs to lines from the modules loaded while it runs
    try:
        proton.start(str(hatchet), backend="cupti", mode="pcsampling")
    except Exception as exc:  # noqa: BLE001 - say why in one line (gpu_check's summary shows the last one)
        sys.exit(f"PC sampling could not start: {type(exc).__name__}: {exc} (CUPTI from "
                 f"{os.environ.get('TRITON_CUPTI_LIB_PATH', 'triton')}; set TRITON_CUPTI_LIB_PATH to a folder "
                 "with a libcupti.so of the driver's CUDA release)")
    failed = {}
    for scope, call in calls.items():
        with proton.scope(scope):
            try:
                for _ in range(args.calls):
                    call()
                torch.cuda.synchronize()
            except Exception as exc:  # noqa: BLE001 - one configuration must not lose the others' samples
                failed[scope] = f"{type(exc).__name__}: {exc}"[:300]
                print(f"{scope}: FAILED {failed[scope]}", flush=True)
        print(f"{scope}: sampled [{time.perf_counter() - t0:.0f}s]", flush=True)
    proton.finalize()
    tree = json.loads(Path(f"{hatchet}.hatchet").read_text())
    stalls = stalls_by_kernel(tree, list(calls))
    text = report(stalls, args.kernels, args.lines)
    print(text)
    args.out.write_text(json.dumps({"environment": {"torch": torch.__version__, "device": torch.cuda.get_device_name(),
                                                    "cupti": os.environ.get("TRITON_CUPTI_LIB_PATH", "bundled")},
                                    "args": {k: str(v) for k, v in vars(args).items()},
                                    "failed": failed, "stalls": stalls, "report": text}, indent=1))
    print(f"\nwrote {args.out} and {hatchet}.hatchet ({time.perf_counter() - t0:.0f}s)")
    return 1 if failed or not stalls else 0


if __name__ == "__main__":
    sys.exit(main())
