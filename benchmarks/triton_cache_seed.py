"""Triton's disk cache for the GPU check, built on a machine without a GPU.

    PYTHONPATH=.venv/triton/3.6.0:. .venv/bin/python benchmarks/triton_cache_seed.py build .gpu_triton_cache
    python benchmarks/triton_cache_seed.py install .gpu_triton_cache "$TRITON_CACHE_DIR"   # on the GPU machine
    python benchmarks/triton_cache_seed.py check .gpu_triton_cache                        # every entry found

A GPU session has minutes of device time, and compiling the kernels it times costs more of them than
timing does. Triton compiles ahead of time for any target, and a launch looks its kernel up in the disk
cache under a key made of the kernel's source, its specialization (dtypes, 16-byte alignment, integers
equal to 1 or divisible by 16 -- not their values), the compile options, the target and Triton's own
hash. So the launches of the timed steps of ``scripts/gpu_check.sh`` -- the decode-attention benchmark
(three shapes, every sweep configuration, S = 1 and S = 4, the plain matmuls of ``--control``), the
rebuild op and its Gluon variants, the paged decode step -- and those of its CUDA tests (each test's
cases and configurations: the Triton and Gluon decode-attention kernels, dense and paged, and the
rebuild ops) are captured here on CPU tensors shaped as those steps and tests make them
(``benchmarks/compile_report.py``), compiled for sm_90 through the launcher's own path, and written out:

* ``build DIR``: compiles into a fresh cache and keeps, per kernel, what a launch loads (the cubin and
  the metadata), with the group files' absolute paths replaced by a placeholder (Triton stores absolute
  paths); ``DIR/TRITON_VERSION`` names the Triton it was built with (the GPU machine must have the same:
  the key contains Triton's hash; build with the GPU machine's release, 3.6.0 today);
* ``install DIR CACHE``: copies the entries into ``CACHE`` with the paths filled in, if this Triton is
  the one that built them (else says so and installs nothing);
* ``check DIR``: installs into a temporary cache, compiles every launch again and fails unless each one
  was found there (no file added).

Whether a launch on the GPU hits the same key is decided by the same code (Triton's binder and
``triton.compile``, :func:`compile_report.compile_for_target`); a miss only means that kernel compiles
there as it did before.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch


def _compile_report():
    """benchmarks/compile_report.py beside this file, loaded by path (importing this module must not put
    benchmarks/ on sys.path: tests import it), once."""
    if "compile_report" not in sys.modules:
        spec = importlib.util.spec_from_file_location("compile_report", Path(__file__).with_name("compile_report.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up while being made
        spec.loader.exec_module(module)
    return sys.modules["compile_report"]


cr = _compile_report()

PLACEHOLDER = "@TRITON_CACHE@"
VERSION_FILE = "TRITON_VERSION"
KEPT_SUFFIXES = (".cubin", ".json")  # what a launch loads: the binary and the metadata (plus the group file)

# The timed steps of scripts/gpu_check.sh (keep in step with its ATTN, ATTN_S4, REBUILD and PAGED settings)
ATTENTION_SHAPES = ("smollm2", "llama7b", "gqa")
ATTENTION_CAPACITY = 32768  # max of its --lengths: the capacity every timed length runs in
REBUILD_CAPACITY, REBUILD_BITS = 32768, (2, 3, 4, 8)
PAGED_REQUESTS, PAGED_LENGTH = 8, 8192


def gpu_check_launches(dtype=torch.bfloat16) -> list[tuple[str, cr.Launch]]:
    """(title, launch) of every Triton kernel the timed steps of ``scripts/gpu_check.sh`` launch."""
    from xq_compile.kernels import decode_attention as da

    bench = cr._attention_benchmark()
    out = []
    for shape in ATTENTION_SHAPES:
        a = bench.make_inputs(bench.SHAPES[shape], 1, ATTENTION_CAPACITY, 1, 4, dtype, "cpu")
        default = da.resolve_config(da.DecodeAttentionInputs.from_op_args(**a), target=cr.gpu(90)[1])
        sweep = bench.sweep_configs(default)  # gpu_check's attn step, then attn_gluon's Gluon set
        for override in sweep + [c for c in bench.sweep_configs(default, gluon=True) if c not in sweep]:
            out += [(f"{shape} S=1 {override}", launch) for launch in cr.op_launches(a, override)]
        for name, tile in bench.control_tiles(bench.SHAPES[shape], default).items():  # decode_attention --control
            kernel, grid, args, kwargs = bench.control_matmul(bench.SHAPES[shape], ATTENTION_CAPACITY, tile, dtype,
                                                              "cpu")
            out.append((f"{shape} control, {name}", cr.Launch(kernel, grid, args, kwargs)))
        out += [(f"{shape} S=4", launch)
                for launch in cr.decode_attention_launches(shape, ATTENTION_CAPACITY, dtype, {}, queries=4)]
        out += [(f"{shape} paged", launch)
                for launch in cr.paged_decode_attention_launches(shape, PAGED_LENGTH, dtype, {},
                                                                 batch=PAGED_REQUESTS)]
        out += [(f"{shape} paged gluon=auto", launch)  # gpu_check's paged_gluon step (the other kernels: above)
                for launch in cr.paged_decode_attention_launches(shape, PAGED_LENGTH, dtype, {"gluon": "auto"},
                                                                 batch=PAGED_REQUESTS)
                if launch.kernel.__name__ == "_gluon_scores_kernel"]
    for bits in REBUILD_BITS:
        out += [(f"dequant_project {bits}-bit", launch)
                for launch in cr.dequant_project_launches(REBUILD_CAPACITY, dtype, bits)]
    from xq_compile.kernels.gluon_rebuild import HAS_GLUON

    if HAS_GLUON:
        out += [("gluon_rebuild", launch) for launch in cr.gluon_rebuild_launches(REBUILD_CAPACITY, dtype)]
    return out


def _test_module(name: str):
    """tests/NAME.py, imported with tests/ on sys.path as pytest has it (the test modules import each other
    and conftest by name)."""
    tests = str(Path(__file__).resolve().parents[1] / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    return importlib.import_module(name)


def cuda_test_launches() -> list[tuple[str, cr.Launch]]:
    """(title, launch) of the Triton and Gluon kernels the CUDA tests of ``scripts/gpu_check.sh``'s phase 1
    launch (``-k cuda`` in the five test files it names), each call built from the tests' own cases and
    configurations as their parametrizations make them (keep in step with those; a call left out only
    compiles on the GPU, as before). Not here: the tests that go through Inductor or the backend (their
    kernels are generated on the GPU machine)."""
    from xq_compile.kernels import dequant_project as dp
    from xq_compile.kernels import gluon_rebuild as gr

    attn, paged, gluon = (_test_module(m) for m in ("test_decode_attention", "test_paged_decode_attention",
                                                     "test_gluon_scores"))
    rebuild, gluon_rebuild = _test_module("test_kernels_cuda"), _test_module("test_gluon_rebuild")
    out = []

    def moved(a: dict) -> dict:
        # what the tests' .to("cuda") makes of each tensor: a fresh allocation (strides kept where dense), as
        # clone() makes it -- a view's offset would change the pointers' 16-byte alignment, part of the key
        return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in a.items()}

    def op(title, a, config=None):
        out.extend((title, launch) for launch in cr.op_launches(moved(a), config or {}))

    def dequant_project(title, shape, bits, dtype, bias=True, **config):
        B, L, d, N, group, n = shape
        packed, scale, zero, w, b = (t if t is None else t.clone() for t in
                                     rebuild.make_inputs(B, L, d, N, bits, group, dtype=dtype, bias=bias))
        with cr.captured_launches(dp) as launches:
            dp.dequant_project_triton(packed, scale, zero, w, b, torch.tensor(n), bits, group,
                                      target=cr.gpu(90)[1], **config)
        out.extend((title, launch) for launch in launches)

    # test_decode_attention: every case at the default configuration, both K forms, the graph replay's
    for case in attn.CUDA_CASES:
        op(f"decode_attention {case}", attn.make_inputs(case))
    for case in attn.CUDA_CASES[len(attn.CASES):len(attn.CASES) + 4]:
        for x_as_b in (0, 1):
            op(f"decode_attention {case} x_as_b={x_as_b}", attn.make_inputs(case), {"x_as_b": x_as_b})
    for dtype in (torch.bfloat16, torch.float32):
        op(f"decode_attention graph replay {dtype}", attn.make_inputs(replace(attn.GRAPH_REPLAY_CASE, dtype=dtype)))
    # test_paged_decode_attention: paged and dense launches of each case, the graph replay's
    for pc in paged.CUDA_CASES:
        for form, a in zip(("dense", "paged"), paged.make_paged(pc)):
            op(f"paged {pc} {form}", a)
    op("paged graph replay", paged.make_paged(paged.PagedCase(paged.GRAPH_REPLAY_CASE, (5, 512, 100), 16))[1])
    # test_gluon_scores: the Gluon kernel's forms where the launcher takes them (declined ones raise there),
    # and the Triton scores kernel each case is compared with
    forms = [{"gluon": g, "gluon_ws": ws, **({} if block_n is None else {"block_n": block_n})}
             for g in (1, 2) for block_n, ws in ((None, 0), (64, 0), (None, 1))]
    for case in gluon.CUDA_CASES:
        a = attn.make_inputs(case)
        op(f"gluon {case} triton", a)
        for config in forms:
            if gluon._why(case, **config) is None:
                op(f"gluon {case} {config}", a, config)
        op(f"gluon {case} auto", a, {"gluon": "auto"})
    for pc in gluon.PAGED_CUDA_CASES:
        dense, pages = paged.make_paged(pc)
        for config in forms:
            if "block_n" not in config and gluon._why(pages, **config) is None:
                op(f"gluon {pc} paged {config}", pages, config)
                op(f"gluon {pc} dense {config}", dense, config)
    for config in forms:
        if "block_n" not in config and gluon._why(gluon.GRAPH_REPLAY_CASE, **config) is None:
            op(f"gluon graph replay {config}", attn.make_inputs(gluon.GRAPH_REPLAY_CASE), config)
    # test_kernels_cuda: dequant_project at every shape, width and dtype; both operand forms; selection; replay
    for shape in rebuild.SHAPES:
        for bits in rebuild.BITS:
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                dequant_project(f"dequant_project {shape} {bits}-bit {dtype}", shape, bits, dtype)
    for bits in rebuild.BITS:
        for dtype in (torch.float32, torch.bfloat16):
            for x_as_b in (False, True):
                dequant_project(f"dequant_project {bits}-bit {dtype} x_as_b={x_as_b}", rebuild.SHAPES[4], bits,
                                dtype, x_as_b=x_as_b)
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            dequant_project(f"dequant_project selection {bits}-bit {dtype}", rebuild.SELECTION_SHAPE, bits, dtype,
                            bias=False)
    B, L, d, N, bits, group = rebuild.GRAPH_REPLAY_SHAPE
    dequant_project("dequant_project graph replay", (B, L, d, N, group, L), bits, torch.float32)
    # test_gluon_rebuild: both forms, both 16-bit dtypes
    if gr.HAS_GLUON:
        *shape, bits, group = gluon_rebuild.CUDA_SHAPE
        for dtype in (torch.bfloat16, torch.float16):
            packed, scale, zero, w, bias = (t.clone() for t in gluon_rebuild._inputs(*shape, bits, group, dtype))
            for warp_specialize in (False, True):
                kernel, grid, args, kwargs, _ = gr.dequant_project_gluon_launch(
                    packed, scale, zero, w, bias, torch.tensor(shape[1]), bits, group, warp_specialize=warp_specialize)
                out.append((f"gluon_rebuild {dtype} ws={warp_specialize}", cr.Launch(kernel, grid, args, kwargs)))
    return out


def seeded_launches() -> list[tuple[str, cr.Launch]]:
    """What the seed holds: the timed steps' launches and the CUDA tests'."""
    return gpu_check_launches() + cuda_test_launches()


@contextlib.contextmanager
def triton_cache_dir(path: Path):
    """Triton's disk cache at ``path`` for the duration (Triton reads TRITON_CACHE_DIR at each compile)."""
    saved = os.environ.get("TRITON_CACHE_DIR")
    os.environ["TRITON_CACHE_DIR"] = str(path)
    try:
        yield path
    finally:
        if saved is None:
            del os.environ["TRITON_CACHE_DIR"]
        else:
            os.environ["TRITON_CACHE_DIR"] = saved


def compile_all(launches, cache: Path) -> list[str]:
    """Compile each launch for sm_90 into ``cache``; the titles of those that do not compile (a Gluon
    kernel against another Triton's Gluon API, as compile_report reports it)."""
    failed = []
    with triton_cache_dir(cache):
        for title, launch in launches:
            try:
                cr.compile_for_target(launch)
            except Exception as exc:
                if not getattr(launch.kernel, "is_gluon", lambda: False)():
                    raise
                failed.append(f"{title}: {launch.kernel.__name__}: {type(exc).__name__}")
    return failed


def _cache_files(cache: Path) -> set[str]:
    return {str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file()}


def export(cache: Path, out: Path) -> int:
    """Copy ``cache``'s kernels into ``out``, only the files a launch loads, the group files' absolute
    paths made relative to PLACEHOLDER; returns the number of kernels."""
    kernels = 0
    for group in sorted(cache.glob("*/__grp__*.json")):
        children = json.loads(group.read_text())["child_paths"]
        kept = {name: path for name, path in children.items() if name.endswith(KEPT_SUFFIXES)}
        target = out / group.parent.name
        target.mkdir(parents=True, exist_ok=True)
        for name, path in kept.items():
            shutil.copy2(path, target / name)
        relative = {name: f"{PLACEHOLDER}/{group.parent.name}/{name}" for name in kept}
        (target / group.name).write_text(json.dumps({"child_paths": relative}))
        kernels += 1
    return kernels


def other_triton(seed: Path) -> str | None:
    """Why the seed cannot serve this Triton (built by another release: the keys differ), or None."""
    import triton

    built_with = (seed / VERSION_FILE).read_text().strip()
    if built_with != triton.__version__:
        return f"the seed {seed} was built with triton {built_with}, this is {triton.__version__}"
    return None


def install(seed: Path, cache: Path) -> int:
    """Copy the seed's kernels into ``cache`` with the paths filled in; the number installed (0 when the
    seed was built by another Triton)."""
    if other_triton(seed):
        return 0
    cache = cache.resolve()
    kernels = 0
    for group in sorted(seed.glob("*/__grp__*.json")):
        target = cache / group.parent.name
        target.mkdir(parents=True, exist_ok=True)
        for path in group.parent.iterdir():
            if path != group:
                shutil.copy2(path, target / path.name)
        # the group file last: Triton treats a kernel as cached once its group file exists
        (target / group.name).write_text(group.read_text().replace(PLACEHOLDER, str(cache)))
        kernels += 1
    return kernels


def build(out: Path, launches=None) -> int:
    """Compile ``launches`` (default: :func:`seeded_launches`) into a seed at ``out`` (replaced)."""
    import triton

    launches = seeded_launches() if launches is None else launches
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        failed = compile_all(launches, Path(tmp))
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        kernels = export(Path(tmp), out)
    (out / VERSION_FILE).write_text(triton.__version__ + "\n")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"triton {triton.__version__}: {len(launches)} launches, {kernels} kernels for sm_90 in {out} "
          f"({size / 2**20:.1f} MiB, {time.perf_counter() - start:.0f} s)")
    for line in failed:
        print(f"  not compiled: {line}")
    return 0


def check(seed: Path, launches=None) -> int:
    """0 if every launch finds its kernel in a cache made of ``seed`` (compiling adds no file)."""
    launches = seeded_launches() if launches is None else launches
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "triton"
        installed = install(seed, cache)
        before = _cache_files(cache)
        compile_all(launches, cache)
        added = sorted(_cache_files(cache) - before)
    compiled = len({name.split("/")[0] for name in added})
    if why := other_triton(seed):
        print(f"{why}: nothing to check")
        return 1
    print(f"{installed} kernels installed, {len(launches)} launches: "
          + ("every one found in the cache" if not added else f"{compiled} compiled anew"))
    return int(bool(added) or not installed)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("build").add_argument("seed", type=Path)
    inst = sub.add_parser("install")
    inst.add_argument("seed", type=Path)
    inst.add_argument("cache", type=Path)
    sub.add_parser("check").add_argument("seed", type=Path)
    args = p.parse_args(argv)
    if args.command == "build":
        return build(args.seed)
    if args.command == "install":
        if why := other_triton(args.seed):
            print(f"{why}: nothing installed (every kernel compiles here)")
            return 1
        print(f"{install(args.seed, args.cache)} kernels installed from {args.seed} into {args.cache}")
        return 0
    return check(args.seed)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # xq_compile from the checkout, if not installed
    sys.exit(main())
