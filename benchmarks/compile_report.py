"""What the Triton kernels compile to on a Hopper GPU (sm_90), on a machine without one.

    python benchmarks/compile_report.py                        # default configs, three model shapes
    python benchmarks/compile_report.py --shape llama7b --config block_h=1 num_warps=4
    python benchmarks/compile_report.py --check                # exit 1 unless every kernel is on the
                                                               # tensor cores, spill-free, in shared memory

Triton compiles ahead of time for any target: the launches of ``xq_compile::decode_attention`` (and of
``dequant_project``) are captured on CPU tensors -- nothing runs -- specialized exactly as Triton's
launcher would specialize them (16-byte alignment, strides of 1), compiled for sm_90 and inspected with
the ``cuobjdump`` that ships inside Triton's wheel:

  * ``HGMMA``: Hopper warpgroup MMA instructions in the SASS (the dense bf16 path; ``HMMA`` is the older,
    slower tensor-core path, neither means the dot fell back to FMAs); ``WGMMA SERIALIZED``: ptxas's
    warning C7515, every wgmma waited for before the next one issues (no overlap with the loop's other
    work: a register operand that the loop redefines, such as a tile dequantized as the first operand);
  * registers per thread; spills (``STL``/``LDL``), counted apart inside the loops that issue the MMAs,
    where they cost every iteration (a few around them -- saved addresses, the epilogue -- do not);
    shared memory per program (an H200 program can use at most 227 KB);
  * ``loop N instr``: the SASS instructions of one pass through the MMA loops -- what every step issues
    next to its MMAs (the dequantization's cost; e.g. no ``I2FP`` conversions: see ``tiles.py``).

This is not a timing: it rules configurations out (spills, no wgmma, too much shared memory) before a
GPU session spends device time on them. It reads Triton's launcher internals (the binder that computes
a launch's specialization), which have no public API; they are kept to :func:`compile_launch`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch


H200_SHARED_BYTES = 227 * 1024
H200_MULTIPROCESSORS = 132


@dataclass
class Launch:
    kernel: object  # the triton.JITFunction
    grid: tuple
    args: tuple
    kwargs: dict


@dataclass
class KernelReport:
    name: str
    grid: tuple
    constexprs: dict
    hgmma: int = 0
    hmma: int = 0
    registers: int = -1
    stack_bytes: int = -1
    spill_instructions: int = -1
    loop_spill_instructions: int = -1
    loop_instructions: int = -1  # SASS instructions of one pass through the MMA loops: the per-step issue cost
    wgmma_serialized: bool = False
    shared_bytes: int = -1
    problems: list = field(default_factory=list)

    def line(self) -> str:
        keys = ("BLOCK_H", "BLOCK_N", "BLOCK_C", "BLOCK_M", "BLOCK_CV", "BLOCK_K", "NUM_SPLITS", "BITS")
        cfg = " ".join(f"{k}={self.constexprs[k]}" for k in keys if k in self.constexprs)
        return (f"{self.name:24s} grid={self.grid} {cfg} | HGMMA {self.hgmma:4d} HMMA {self.hmma:3d} | "
                f"regs {self.registers:3d} spills {self.spill_instructions} ({self.loop_spill_instructions} in the "
                f"MMA loop) | loop {self.loop_instructions} instr{' | WGMMA SERIALIZED' if self.wgmma_serialized else ''} | "
                f"smem {self.shared_bytes / 1024:.1f} KB" + (f" | PROBLEMS: {'; '.join(self.problems)}" if self.problems else ""))


@contextlib.contextmanager
def captured_launches(*modules):
    """Replace every ``triton.JITFunction`` global of ``modules`` whose name ends in ``_kernel`` by a
    recorder: ``kernel[grid](*args)`` appends a :class:`Launch` instead of running."""
    import triton

    launches: list[Launch] = []
    saved = []

    class Recorder:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(Launch(self.fn, tuple(grid), args, kwargs))

    for module in modules:
        for name, obj in list(vars(module).items()):
            if name.endswith("_kernel") and isinstance(obj, triton.runtime.JITFunction):
                saved.append((module, name, obj))
                setattr(module, name, Recorder(obj))
    try:
        yield launches
    finally:
        for module, name, obj in saved:
            setattr(module, name, obj)


def _tool(name: str) -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"{path} (Triton's wheel ships it on x86-64 Linux)")
    return str(path)


SPILL_OPS = ("STL", "LDL")  # local-memory stores/loads: register spills
_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)([^;]*);")


def mma_loop_ops(sass: str) -> list[str]:
    """The opcodes inside loops that issue tensor-core MMAs (one pass of each such loop's body).

    A loop is a backward branch ``BRA target`` (target below the branch)."""
    ops = [(int(a, 16), op, rest) for a, _, op, rest in _SASS_LINE.findall(sass)]
    loops = []
    for addr, op, rest in ops:
        if op == "BRA":
            target = re.search(r"0x([0-9a-f]+)", rest)
            if target and int(target.group(1), 16) < addr:
                loops.append((int(target.group(1), 16), addr))
    hot = [(lo, hi) for lo, hi in loops if any(lo <= a <= hi and op in ("HGMMA", "HMMA") for a, op, _ in ops)]
    return [op for a, op, _ in ops if any(lo <= a <= hi for lo, hi in hot)]


def loop_spills(sass: str) -> int:
    """Local-memory accesses (STL/LDL: register spills) inside loops that issue tensor-core MMAs; a few
    spills around the loops (saving addresses, the epilogue) cost nothing per iteration."""
    return sum(1 for op in mma_loop_ops(sass) if op in SPILL_OPS)


def _ptxas_serializes_wgmma(ptx: str, arch: int) -> bool:
    """Whether ptxas (the one Triton uses for this arch) reports C7515: wgmma instructions serialized,
    each waited for before the next is issued, because non-wgmma instructions inside the pipeline
    redefine their register operands -- e.g. an operand dequantized in registers every iteration."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        proc = subprocess.run([get_ptxas(arch).path, f"-arch=sm_{arch}a", "-v", str(src), "-o", str(src) + ".o"],
                              capture_output=True, text=True)
    return "C7515" in proc.stdout + proc.stderr


def compile_launch(launch: Launch, arch: int = 90) -> KernelReport:
    """Compile one captured launch for ``sm_{arch}`` and read its SASS and resource usage."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature  # private: Triton's own launch binder

    fn = launch.kernel
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(launch.kwargs)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    names = fn.arg_names
    report = KernelReport(
        name=fn.__name__, grid=launch.grid,
        constexprs={names[k[0]]: v for k, v in constexprs.items() if len(k) == 1},
        shared_bytes=int(compiled.metadata.shared),
    )
    report.wgmma_serialized = _ptxas_serializes_wgmma(compiled.asm["ptx"], arch)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True, check=True).stdout
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    report.hgmma = len(re.findall(r"\bHGMMA\b", sass))
    report.hmma = len(re.findall(r"\bHMMA\b", sass))
    report.spill_instructions = len(re.findall(r"\b(?:STL|LDL)\b", sass))
    loop_ops = mma_loop_ops(sass)
    report.loop_instructions = len(loop_ops)
    report.loop_spill_instructions = sum(1 for op in loop_ops if op in SPILL_OPS)
    if m := re.search(r"REG:(\d+)", res):
        report.registers = int(m.group(1))
    if m := re.search(r"STACK:(\d+)", res):
        report.stack_bytes = int(m.group(1))
    if report.loop_spill_instructions:
        report.problems.append(f"{report.loop_spill_instructions} local-memory (spill) accesses inside its "
                               "tensor-core loop")
    if report.shared_bytes > H200_SHARED_BYTES:
        report.problems.append(f"needs {report.shared_bytes} B of shared memory (> {H200_SHARED_BYTES})")
    return report


def _attention_benchmark():
    """benchmarks/decode_attention.py (its shapes and inputs), loaded by path: importing this module
    must not put benchmarks/ on sys.path (tests import it)."""
    import importlib.util

    name = "xq_benchmarks_decode_attention"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent / "decode_attention.py")
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def decode_attention_launches(shape: str, length: int, dtype, config: dict, bits: int = 4) -> list[Launch]:
    """The launches of one decode-attention call for a benchmark shape (CPU tensors, nothing runs)."""
    from xq_compile.kernels import decode_attention as da

    bench = _attention_benchmark()

    a = bench.make_inputs(bench.SHAPES[shape], 1, length, 1, bits, dtype, "cpu")
    with captured_launches(da) as launches:  # the grid sized for the GPU compiled for
        da.decode_attention_triton(*a.values(), sms=H200_MULTIPROCESSORS, **config)
    return launches


def dequant_project_launches(length: int, dtype, bits: int = 4, rope: bool = True) -> list[Launch]:
    """The launch of the K rebuild op (``dequant_project_rope``) for SmolLM2's K projection."""
    from xq_compile import quant
    from xq_compile.kernels import dequant_project as dp

    x = torch.randn(1, length, 576)
    codes, scale, zero = quant.quantize(x, bits, 64)
    packed = quant.pack(codes, bits)
    w = torch.randn(576, 576, dtype=dtype)
    cos = sin = torch.ones(1, length, 64, dtype=dtype)
    with captured_launches(dp) as launches:
        if rope:
            dp.dequant_project_rope_triton(packed, scale, zero, w, None, torch.tensor(length), bits, 64, cos, sin, 64)
        else:
            dp.dequant_project_triton(packed, scale, zero, w, None, torch.tensor(length), bits, 64)
    return launches


def _parse_config(items: list[str]) -> dict:
    cfg = {}
    for item in items:
        key, _, value = item.partition("=")
        cfg[key] = int(value)
    return cfg


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", nargs="+", default=["smollm2", "llama7b", "gqa"])
    p.add_argument("--bits", type=int, nargs="+", default=[4])
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--config", nargs="*", default=[], help="decode_attention config overrides, key=value")
    p.add_argument("--no-dequant-project", action="store_true", help="skip the dequant_project kernel")
    p.add_argument("--check", action="store_true", help="exit 1 if a kernel spills inside its MMA loop, exceeds "
                   "shared memory, or a dot of the scores / dequant_project kernels is not on wgmma or serialized")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    import triton

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    config = _parse_config(args.config)
    print(f"triton {triton.__version__}, target sm_90, {args.dtype}, n = {args.length}", flush=True)
    reports, failed = [], False
    jobs = [(f"{shape} {bits}-bit", lambda s=shape, b=bits: decode_attention_launches(s, args.length, dtype, config, b))
            for shape in args.shape for bits in args.bits]
    if not args.no_dequant_project:
        jobs += [(f"dequant_project{'_rope' if rope else ''} {bits}-bit",
                  lambda b=bits, r=rope: dequant_project_launches(args.length, dtype, b, rope=r))
                 for bits in args.bits for rope in (True, False)]
    for title, make in jobs:
        print(f"== {title}", flush=True)
        for launch in make():
            r = compile_launch(launch)
            if args.check and r.name in ("_scores_kernel", "_dequant_project_kernel"):
                if r.hgmma == 0:
                    r.problems.append("its dots are not on wgmma (no HGMMA in the SASS)")
                if r.wgmma_serialized:
                    r.problems.append("ptxas serializes its wgmma (C7515)")
            failed |= bool(r.problems)
            reports.append({"job": title, **{k: v for k, v in vars(r).items() if k != "constexprs"},
                            "constexprs": {k: str(v) for k, v in r.constexprs.items()}})
            print("  " + r.line(), flush=True)
    if args.json:
        args.json.write_text(json.dumps(reports, indent=2))
    if args.check:
        print("check:", "FAILED" if failed else "ok")
        return int(failed)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # xq_compile from the checkout, if not installed
    sys.exit(main())
