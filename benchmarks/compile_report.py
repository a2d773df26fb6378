"""What the Triton kernels compile to on a Hopper GPU (sm_90), or another (``--arch``), on a machine without one.

    python benchmarks/compile_report.py                        # default configs, three model shapes
    python benchmarks/compile_report.py --shape llama7b --config block_h=1 num_warps=4
    python benchmarks/compile_report.py --check                # exit 1 unless every kernel is on the
                                                               # tensor cores, keeps its wgmma in flight,
                                                               # is spill-free and fits shared memory
    python benchmarks/compile_report.py --asm-dir asm          # also write each launch's TTGIR, PTX and SASS
    python benchmarks/compile_report.py --paged                # the vLLM plugin's decode step: the same
                                                               # kernels reading page bytes (block table)
    python benchmarks/compile_report.py --arch 89 --check     # configured and compiled for an L4 / RTX 40:
                                                               # mma.sync, 99 KB of shared memory a program

Triton compiles ahead of time for any target: the launches of ``xq_compile::decode_attention`` (and of
``dequant_project``) are captured on CPU tensors -- nothing runs -- specialized exactly as Triton's
launcher would specialize them (16-byte alignment, strides of 1), compiled for sm_90 and inspected with
the ``cuobjdump`` that ships inside Triton's wheel:

  * ``HGMMA``: Hopper warpgroup MMA instructions in the SASS (the dense bf16 path; ``HMMA`` is the older,
    slower tensor-core path, neither means the dot fell back to FMAs);
  * whether a kernel that issues wgmma keeps one *in flight* while it prepares the next step's operands:
    ``wait N``, the pending counts of its ``wgmma.wait_group.sync.aligned N`` in the PTX. Triton makes a
    dot asynchronous only when it can (an operand tile pipelined from global memory, see
    ``docs/kernels.md``); otherwise every MMA is followed by ``wait_group 0`` (``WGMMA NEVER IN
    FLIGHT``). Even with ``wait_group 1`` in the PTX, ptxas may serialize the MMAs (its warning C7515,
    ``WGMMA SERIALIZED``: a register of an MMA redefined between its issue and its wait). A plain bf16
    matmul compiled the same way is the positive control of this check (``control``);
  * registers per thread; spills (``STL``/``LDL``), counted apart inside the loops that issue the MMAs,
    where they cost every iteration (a few around them -- saved addresses, the epilogue -- do not);
    shared memory per program (an H200 program can use at most 227 KB);
  * ``loop N instr``: the SASS instructions of one pass through the MMA loops -- what every step issues
    next to its MMAs (the dequantization's cost; e.g. no ``I2FP`` conversions: see ``tiles.py``);
  * ``N/SM``: programs resident on one multiprocessor at once, from the registers, warps and shared
    memory (:func:`programs_per_sm`); at 1 nothing overlaps a program's prologue and epilogue.

Other targets (``--arch``: 80, 86, 89, 100, 120) get the launch configuration ``default_config`` gives
their GPU and the same checks, with that GPU's shared memory per program and tensor-core instruction
(``HMMA``: ``mma.sync``, which has no asynchronous form to check; ``UTCHMMA``: sm_100's tcgen05).

This is not a timing: it rules configurations out (spills, no wgmma, too much shared memory) before a
GPU session spends device time on them. It reads Triton's launcher internals (the binder that computes
a launch's specialization), which have no public API; they are kept to :func:`compile_for_target`.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch


ARCHS = (80, 86, 89, 90, 100, 120)
MMA_SASS = {"HGMMA": "wgmma", "HMMA": "mma.sync", "UTCHMMA": "tcgen05"}  # the tensor-core MMA instructions


def tensor_core_mma(arch: int) -> str:
    """The SASS instruction (a key of :data:`MMA_SASS`) the K rebuild's dots must compile to on ``sm_{arch}``."""
    return {90: "HGMMA", 100: "UTCHMMA"}.get(arch, "HMMA")


@functools.cache
def gpu(arch: int) -> tuple[str, object]:
    """(a product, its ``GpuTarget``) for one of the sm numbers ``--arch`` compiles for (:data:`ARCHS`):
    the product's multiprocessor count (the split count follows it) and the shared memory one program
    may use there (what a launch must fit)."""
    from xq_compile.kernels.devices import GpuTarget

    return {
        80: ("A100", GpuTarget(capability=80, multiprocessors=108, shared_memory=163 * 1024)),
        86: ("A10", GpuTarget(capability=86, multiprocessors=72, shared_memory=99 * 1024)),
        89: ("L4", GpuTarget(capability=89, multiprocessors=58, shared_memory=99 * 1024)),
        90: ("H200", GpuTarget(capability=90, multiprocessors=132, shared_memory=227 * 1024)),
        100: ("B200", GpuTarget(capability=100, multiprocessors=148, shared_memory=227 * 1024)),
        120: ("RTX 5090", GpuTarget(capability=120, multiprocessors=170, shared_memory=99 * 1024)),
    }[arch]


# Per-multiprocessor limits of each --arch (CUDA C++ Programming Guide, "Technical Specifications per
# Compute Capability"): resident threads, resident programs (thread blocks); 64K 32-bit registers on all.
SM_THREADS = {80: 2048, 86: 1536, 89: 1536, 90: 2048, 100: 2048, 120: 1536}
SM_PROGRAMS = {80: 32, 86: 16, 89: 24, 90: 32, 100: 32, 120: 32}


def programs_per_sm(arch: int, registers: int, num_warps: int, shared_bytes: int) -> int:
    """How many programs of a kernel fit on one multiprocessor at once: registers (allocated per warp in
    units of 256, 8 per thread), threads, and shared memory (the opt-in per-program limit + 1 KB the
    system reserves per program, which is the multiprocessor's total). With one, nothing hides a
    program's prologue and epilogue (the pipeline filling, RoPE and the score stores after the K loop)."""
    per_warp = -(-registers * 32 // 256) * 256
    by_registers = (65536 // per_warp) // num_warps if per_warp else SM_PROGRAMS[arch]
    by_threads = SM_THREADS[arch] // (32 * num_warps)
    sm_shared = gpu(arch)[1].shared_memory + 1024
    by_shared = sm_shared // (shared_bytes + 1024)
    return max(0, min(by_registers, by_threads, by_shared, SM_PROGRAMS[arch]))


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
    utchmma: int = 0
    registers: int = -1
    stack_bytes: int = -1
    spill_instructions: int = -1
    loop_spill_instructions: int = -1
    # SASS instructions of one pass through each MMA loop (mma_loops): the per-step issue cost
    loop_instructions: list = field(default_factory=list)
    # the same for each loop feeding MMAs from other warps (feeding_loops: warp-specialized kernels)
    feeding_loop_instructions: list = field(default_factory=list)
    wgmma: int = 0  # wgmma.mma_async instructions in the PTX
    wgmma_waits: list = field(default_factory=list)  # distinct N of its wgmma.wait_group N
    wgmma_serialized: bool = False
    asm_files: list = field(default_factory=list)
    shared_bytes: int = -1
    num_warps: int = -1
    programs_per_sm: int = -1  # resident at once (programs_per_sm())
    problems: list = field(default_factory=list)

    @property
    def wgmma_in_flight(self) -> bool:
        """Whether the kernel lets an issued wgmma run while it goes on (a wait that leaves N >= 1
        pending, and ptxas did not serialize the MMAs anyway)."""
        return self.wgmma > 0 and max(self.wgmma_waits, default=0) >= 1 and not self.wgmma_serialized

    def config(self) -> str:
        keys = ("BLOCK_H", "BLOCK_N", "BLOCK_C", "BLOCK_M", "BLOCK_CV", "BLOCK_D", "BLOCK_C1", "SPLIT_STEP",
                "BLOCK_K", "NUM_SPLITS", "BITS")
        shown = [f"{k}={self.constexprs[k]}" for k in keys if k in self.constexprs]
        if self.constexprs.get("X_AS_B"):  # K rebuilt as Kᵀ = Wk·X̂ᵀ (GPUs without wgmma)
            shown.append("X_AS_B=1")
        return " ".join(shown)

    def line(self) -> str:
        if not self.wgmma:
            flight = ""
        elif self.wgmma_serialized:
            flight = " | WGMMA SERIALIZED"
        else:
            flight = f" | wait {','.join(map(str, self.wgmma_waits))}" + ("" if self.wgmma_in_flight else " WGMMA NEVER IN FLIGHT")
        mma = f"HGMMA {self.hgmma:4d} HMMA {self.hmma:3d}" + (f" UTCHMMA {self.utchmma}" if self.utchmma else "")
        return (f"{self.name:24s} grid={self.grid} {self.config()} | {mma}{flight} | "
                f"regs {self.registers:3d} spills {self.spill_instructions} ({self.loop_spill_instructions} in the "
                f"MMA loop) | loop {' | '.join(map(str, self.loop_instructions)) or 0} instr"
                + (f", feeding it {' | '.join(map(str, self.feeding_loop_instructions))}"
                   if self.feeding_loop_instructions else "") + " | "
                f"smem {self.shared_bytes / 1024:.1f} KB | {self.programs_per_sm}/SM"
                + (f" | PROBLEMS: {'; '.join(self.problems)}" if self.problems else ""))


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


def _sass_ops(sass: str) -> list[tuple[int, str, str]]:
    """(address, opcode, the rest of the instruction) of each SASS instruction."""
    return [(int(a, 16), op, rest) for a, _, op, rest in _SASS_LINE.findall(sass)]


def _sass_loops(sass: str) -> list[tuple[int, int]]:
    """(first, last address) of each loop: a backward branch ``BRA target`` (target below the branch).

    Not an out-of-line return: ptxas moves an mbarrier wait's retry loop out of line, to the end of the
    code (``@!P0 BRA stub`` after the try-wait; the stub retries, then ``BRA`` back to the instruction after
    that jump): the unconditional branch back spans everything in between but runs once per wait."""
    branches = {int(a, 16): (pred, re.search(r"0x([0-9a-f]+)", rest))
                for a, pred, op, rest in _SASS_LINE.findall(sass) if op == "BRA"}
    loops = []
    for addr, (pred, target) in branches.items():
        if target is None or int(target.group(1), 16) >= addr:
            continue
        lo = int(target.group(1), 16)
        jump_out = branches.get(lo - 16)  # the instruction before the target (SASS instructions are 16 bytes)
        if not pred and jump_out and jump_out[0] and jump_out[1] and lo < int(jump_out[1].group(1), 16) <= addr:
            continue
        loops.append((lo, addr))
    return loops


def mma_loops(sass: str) -> list[list[str]]:
    """The opcodes of each loop that issues tensor-core MMAs (one pass of its body), in code order.

    A loop is a backward branch (:func:`_sass_loops`); overlapping loops (one nested in or branching back
    across another) count as one. A kernel may hold alternative loops of which a program runs one (the
    scores kernel's whole and partial row blocks): each is listed on its own."""
    ops = _sass_ops(sass)
    loops = _sass_loops(sass)
    hot = sorted((lo, hi) for lo, hi in loops if any(lo <= a <= hi and op in MMA_SASS for a, op, _ in ops))
    regions: list[list[int]] = []
    for lo, hi in hot:
        if regions and lo <= regions[-1][1]:
            regions[-1][1] = max(regions[-1][1], hi)
        else:
            regions.append([lo, hi])
    return [[op for a, op, _ in ops if lo <= a <= hi] for lo, hi in regions]


def feeding_loops(sass: str) -> list[list[str]]:
    """The opcodes of each innermost loop that arrives on an mbarrier and issues no MMA: in a
    warp-specialized kernel, the loop of the warps that fill the buffers the MMA warps consume (the
    dequantizing partition), one pass of its body."""
    ops = _sass_ops(sass)
    arrives = [a for a, op, rest in ops if op == "SYNCS" and rest.startswith(".ARRIVE")]
    feeding = [(lo, hi) for lo, hi in _sass_loops(sass)
               if any(lo <= a <= hi for a in arrives) and not any(lo <= a <= hi and op in MMA_SASS for a, op, _ in ops)]
    innermost = sorted(loop for loop in feeding
                       if not any(other != loop and loop[0] <= other[0] and other[1] <= loop[1] for other in feeding))
    return [[op for a, op, _ in ops if lo <= a <= hi] for lo, hi in innermost]


def loop_spills(sass: str, loops: list[list[str]] | None = None) -> int:
    """Local-memory accesses (STL/LDL: register spills) inside loops that issue tensor-core MMAs or feed
    them (:func:`feeding_loops`); a few spills around the loops (saving addresses, the epilogue) cost
    nothing per iteration. ``loops``: those loops, where the caller has them already."""
    loops = mma_loops(sass) + feeding_loops(sass) if loops is None else loops
    return sum(1 for loop in loops for op in loop if op in SPILL_OPS)


_WAIT_GROUP = re.compile(r"\bwgmma\.wait_group\.sync\.aligned\s+(\d+)\s*;")


def wgmma_waits(ptx: str) -> list[int]:
    """The distinct N of the PTX's ``wgmma.wait_group.sync.aligned N`` (wait until at most N wgmma
    groups are pending), sorted: ``[0]`` alone means every MMA is waited for before the kernel goes on."""
    return sorted({int(n) for n in _WAIT_GROUP.findall(ptx)})


def _ptxas_serializes_wgmma(ptx: str, arch: int) -> bool:
    """Whether ptxas (the one Triton uses for this arch) reports C7515: wgmma instructions serialized,
    each waited for before the next is issued, because non-wgmma instructions inside the pipeline
    redefine their registers (e.g. the accumulator copied on the path that skips a loop with a runtime
    bound: docs/kernels.md)."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        proc = subprocess.run([get_ptxas(arch).path, f"-arch=sm_{arch}a", "-v", str(src), "-o", str(src) + ".o"],
                              capture_output=True, text=True)
    return "C7515" in proc.stdout + proc.stderr


def compile_for_target(launch: Launch, arch: int = 90):
    """(Triton's compiled kernel, the constexprs) of one captured launch for ``sm_{arch}``: the binder,
    specialization and ``triton.compile`` call of Triton's own launcher, so the kernel lands in Triton's
    disk cache (``TRITON_CACHE_DIR``) under the key a launch on such a GPU looks up
    (``benchmarks/triton_cache_seed.py`` relies on that)."""
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
    source = ASTSource
    if getattr(fn, "is_gluon", lambda: False)():  # a Gluon kernel: its own front end (layouts, warps)
        from triton.experimental.gluon._runtime import GluonASTSource as source
    return triton.compile(source(fn, signature, constexprs, attrs), target=target, options=options.__dict__), constexprs


def compile_launch(launch: Launch, arch: int = 90, asm_dir: Path | None = None, title: str = "") -> KernelReport:
    """Compile one captured launch for ``sm_{arch}`` and read its PTX, SASS and resource usage; with
    ``asm_dir``, write the TTGIR (Triton's GPU IR: the layouts, where a ``convert_layout`` moves data), the
    PTX and the SASS there as ``<title>.<kernel>.<config>.{ttgir,ptx,sass}``."""
    fn = launch.kernel
    compiled, constexprs = compile_for_target(launch, arch)
    names = fn.arg_names
    report = KernelReport(
        name=fn.__name__, grid=launch.grid,
        constexprs={names[k[0]]: v for k, v in constexprs.items() if len(k) == 1},
        shared_bytes=int(compiled.metadata.shared), num_warps=int(compiled.metadata.num_warps),
    )
    ptx = compiled.asm["ptx"]
    report.wgmma = len(re.findall(r"\bwgmma\.mma_async\b", ptx))
    report.wgmma_waits = wgmma_waits(ptx)
    report.wgmma_serialized = report.wgmma > 0 and _ptxas_serializes_wgmma(ptx, arch)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True, check=True).stdout
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    if asm_dir is not None:
        stem = asm_dir / asm_stem(title, report)
        for suffix, text in ((".ttgir", compiled.asm["ttgir"]), (".ptx", ptx), (".sass", sass)):
            path = stem.with_name(stem.name + suffix)
            path.write_text(text)
            report.asm_files.append(str(path))
    report.hgmma = len(re.findall(r"\bHGMMA\b", sass))
    report.hmma = len(re.findall(r"\bHMMA\b", sass))
    report.utchmma = len(re.findall(r"\bUTCHMMA\b", sass))
    report.spill_instructions = len(re.findall(r"\b(?:STL|LDL)\b", sass))
    loops, feeding = mma_loops(sass), feeding_loops(sass)
    report.loop_instructions = [len(loop) for loop in loops]
    report.feeding_loop_instructions = [len(loop) for loop in feeding]
    report.loop_spill_instructions = loop_spills(sass, loops + feeding)
    if m := re.search(r"REG:(\d+)", res):
        report.registers = int(m.group(1))
    if m := re.search(r"STACK:(\d+)", res):
        report.stack_bytes = int(m.group(1))
    if report.loop_spill_instructions:
        report.problems.append(f"{report.loop_spill_instructions} local-memory (spill) accesses inside its "
                               "tensor-core loop or the loop feeding it")
    report.programs_per_sm = programs_per_sm(arch, report.registers, report.num_warps, report.shared_bytes)
    product, target = gpu(arch)
    if report.shared_bytes > target.shared_memory:
        report.problems.append(f"needs {report.shared_bytes} B of shared memory (> {target.shared_memory}, what "
                               f"a program may use on sm_{arch}, e.g. {product}: the launch would fail)")
    if report.wgmma_serialized:
        report.problems.append("ptxas serializes its wgmma (C7515)")
    elif report.wgmma and not report.wgmma_in_flight:
        report.problems.append(f"never keeps a wgmma in flight: its PTX waits with wgmma.wait_group "
                               f"{'/'.join(map(str, report.wgmma_waits))} only, each MMA finished before it goes on")
    return report


def asm_stem(title: str, report: KernelReport) -> str:
    """A file name for one launch's assembly: the job, the kernel and its configuration."""
    cfg = "-".join(f"{k}{v}" for k, v in (item.split("=") for item in report.config().split()))
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{title}.{report.name.strip('_')}.{cfg}").strip("-.")


CONTROL = "control"
REBUILD_KERNELS = ("_scores_kernel", "_dequant_project_kernel", "_gluon_rebuild_kernel",  # must be on wgmma
                   "_gluon_rebuild_ws_kernel", "_gluon_scores_kernel")


def control_launches(size: int = 1024) -> list[Launch]:
    """The positive control of the in-flight check: a plain bf16 matmul (128 x 128 tiles, 8 warps, 3
    stages), which must show ``wait_group 1``. If it does not, the check cannot tell anything apart
    (another Triton version, another target) and fails saying so."""
    a, b, c = (torch.empty(size, size, dtype=torch.bfloat16) for _ in range(3))
    grid = (size // 128, size // 128)
    kernel = _attention_benchmark()._control_matmul_kernel
    return [Launch(kernel, grid, (a, b, c, size, *a.stride(), *b.stride(), *c.stride()),
                   dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3))]


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


def decode_attention_launches(shape: str, length: int, dtype, config: dict, bits: int = 4,
                              queries: int = 1, rope: str = "tables", arch: int = 90) -> list[Launch]:
    """The launches of one decode-attention call for a benchmark shape with ``queries`` query tokens
    and RoPE from ``rope`` (``tables``: cos/sin read; ``positions``: computed in the kernel), configured
    for ``sm_{arch}`` (CPU tensors, nothing runs)."""
    bench = _attention_benchmark()
    a = bench.make_inputs(bench.SHAPES[shape], 1, length, queries, bits, dtype, "cpu")
    if rope == "positions":
        head_dim = a["query"].shape[-1]
        a.update(cos=None, sin=None, positions=torch.arange(length)[None], rope_scale=1.0,
                 rope_inv_freq=1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)))
    return op_launches(a, config, arch)


def op_launches(a: dict, config: dict, arch: int = 90) -> list[Launch]:
    """The launches of ``xq_compile::decode_attention`` on the op arguments ``a`` with ``config``
    overrides, configured (tiles, grid, split count) for ``sm_{arch}``'s product in :func:`gpu` (CPU
    tensors, nothing runs)."""
    from xq_compile.kernels import decode_attention as da
    from xq_compile.kernels.decode_attention import gluon_scores

    with captured_launches(da.triton_kernels, gluon_scores) as launches:
        da.decode_attention_triton(da.DecodeAttentionInputs.from_op_args(**a), target=gpu(arch)[1], **config)
    return launches


def paged_decode_attention_launches(shape: str, length: int, dtype, config: dict, bits: int = 4,
                                    page_size: int = 16, batch: int = 4, arch: int = 90,
                                    gemma: bool = False) -> list[Launch]:
    """The launches of the vLLM plugin's decode step (``xq_compile.vllm.paged.decode_arguments``) for a
    benchmark shape: ``batch`` requests of ``length`` rows in shuffled pages of ``page_size`` tokens, the
    sources strided views of the page bytes exactly as the plugin makes them (each block's code rows,
    then its scale rows, then its zero rows: the page stride differs from the dense cache's), RoPE from the positions,
    one query token per request. The GQA shape is the plugin's latent form: per-token key and value
    latents in one row (CPU tensors, nothing runs). ``gemma``: a Gemma 2/3 layer's step -- a sliding window
    of half the rows, a soft cap on the scores and a per-head key norm (the kernels' other branches)."""
    from xq_compile import XQuantConfig
    from xq_compile.vllm import paged
    from xq_compile.vllm.layout import bytes_per_token, token_state_layout

    s = _attention_benchmark().SHAPES[shape]
    heads, kv_heads, head_dim, width = s["Hq"], s["Hkv"], s["D"], s["Ck"]
    latent = s["Cv"] is not None
    weight = lambda c: torch.zeros(kv_heads * head_dim, c, dtype=dtype)  # noqa: E731
    proj = paged.Projection(k_weight=weight(width), v_weight=weight(s["Cv"] or width), k_bias=None, v_bias=None,
                            num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, scale=head_dim ** -0.5,
                            down=torch.zeros(width + s["Cv"], 1) if latent else None,
                            key_width=width if latent else None)
    xquant = XQuantConfig(bits=bits, group_size=s["k_group"])
    layout = token_state_layout(xquant, width + (s["Cv"] or 0), dtype)
    blocks = -(-length // page_size)
    num_blocks = batch * blocks + 1
    pages = torch.zeros(num_blocks, 1, page_size, bytes_per_token(layout), dtype=torch.uint8)
    table = 1 + torch.randperm(num_blocks - 1, generator=torch.Generator().manual_seed(0)).view(batch, blocks)
    step = paged.PagedBatch(query_start_loc=torch.arange(batch + 1, dtype=torch.int32),
                            seq_lens=torch.full((batch,), length, dtype=torch.int32), block_table=table.int(),
                            slot_mapping=torch.zeros(batch, dtype=torch.long), max_query_len=1, max_seq_len=length)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    extras = {}
    if gemma:
        extras = dict(window=length // 2, soft_cap=50.0, key_norm=paged.KeyNorm(torch.ones(head_dim), 1e-6))
    args = paged.decode_arguments(torch.zeros(batch, heads * head_dim, dtype=dtype), pages, step, layout, xquant,
                                  proj, inv_freq, **extras)
    return op_launches(args, config, arch)


def dequant_project_launches(length: int, dtype, bits: int = 4, arch: int = 90, config: dict | None = None
                             ) -> list[Launch]:
    """The launch of the unfused K rebuild op (``dequant_project``) for SmolLM2's K projection, configured
    for ``sm_{arch}``'s product in :func:`gpu` (``config``: keyword overrides of ``dequant_project_triton``)."""
    from xq_compile import quant
    from xq_compile.kernels import dequant_project as dp

    x = torch.randn(1, length, 576)
    codes, scale, zero = quant.quantize(x, bits, 64)
    packed = quant.pack(codes, bits)
    w = torch.randn(576, 576, dtype=dtype)
    with captured_launches(dp) as launches:
        dp.dequant_project_triton(packed, scale, zero, w, None, torch.tensor(length), bits, 64, target=gpu(arch)[1],
                                  **(config or {}))
    return launches


def gluon_rebuild_launches(length: int, dtype, bits: int = 4) -> list[Launch]:
    """The Gluon K rebuild (``xq_compile.kernels.gluon_rebuild``, not dispatched) for SmolLM2's K
    projection, as ``dequant_project_launches`` (4-bit only: the kernel decodes 4-bit codes): one
    warpgroup dequantizing and issuing the MMAs, and the warp-specialized form."""
    from xq_compile import quant
    from xq_compile.kernels import gluon_rebuild as gr

    x = torch.randn(1, length, 576)
    codes, scale, zero = quant.quantize(x, bits, 64)
    w = torch.randn(576, 576, dtype=dtype)
    launches = []
    for warp_specialize in (False, True):
        kernel, grid, args, kwargs, _ = gr.dequant_project_gluon_launch(
            quant.pack(codes, bits), scale, zero, w, None, torch.tensor(length), bits, 64,
            warp_specialize=warp_specialize)
        launches.append(Launch(kernel, grid, args, kwargs))
    return launches


def gluon_scores_launches(shape: str, length: int, dtype, config: dict, bits: int = 4, queries: int = 1,
                          rope: str = "tables", gluon: int = 1, paged: bool = False, ws: int = 0) -> list[Launch]:
    """The scores launch of ``decode_attention_launches`` with the opt-in Gluon scores kernel (config
    ``gluon``: 1 streams W, 2 keeps the head tile's W resident; ``ws``: warp-specialized, ``gluon_ws``;
    ``xq_compile.kernels.decode_attention.gluon_scores``), the other stages left out: they are the default
    launches' (sm_90 only); ``paged``: of the vLLM plugin's decode step (``paged_decode_attention_launches``)
    instead. No launch (an empty list) where the launcher declines the configuration for the shape: W
    resident where the W slice does not fit in shared memory, warp-specialized 8-bit keys in 128-row tiles."""
    config = {**config, "gluon": gluon, "gluon_ws": ws}
    try:
        if paged:
            launches = paged_decode_attention_launches(shape, length, dtype, config, bits)
        else:
            launches = decode_attention_launches(shape, length, dtype, config, bits, queries, rope, 90)
    except ValueError as exc:
        if any(why in str(exc) for why in ("whole W slice resident", "8-bit keys in 128-row tiles")):
            return []
        raise
    return [launch for launch in launches if launch.kernel.__name__ == "_gluon_scores_kernel"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", nargs="+", default=["smollm2", "llama7b", "gqa"])
    p.add_argument("--bits", type=int, nargs="+", default=[4])
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--queries", type=int, default=1, help="query tokens per call (S: 1 decode, up to 16 for "
                   "speculative decoding / short chunks)")
    p.add_argument("--rope", default="tables", choices=["tables", "positions"],
                   help="RoPE read from cos/sin tables, or computed in the kernel from the positions")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--config", nargs="*", default=[], help="decode_attention config overrides, key=value")
    p.add_argument("--paged", action="store_true", help="the vLLM plugin's decode step instead (4 requests of "
                   "--length rows in pages of 16 tokens, the sources views of the page bytes; S = 1, RoPE from "
                   "the positions, the Triton values kernel); implies --no-dequant-project, and of the Gluon "
                   "kernels only the opt-in scores kernel")
    p.add_argument("--gemma", action="store_true", help="with --paged: a Gemma 2/3 layer's step (a sliding window "
                   "of half the rows, a soft cap, a per-head key norm); the Gluon scores kernel applies none of "
                   "them, so it is skipped")
    p.add_argument("--no-dequant-project", action="store_true", help="skip the dequant_project kernel")
    p.add_argument("--no-gluon", action="store_true", help="skip the Gluon kernels (the K-rebuild prototype, "
                   "the opt-in scores kernel)")
    p.add_argument("--arch", type=int, default=90, choices=ARCHS, help="the GPU to compile and configure for: "
                   "80 A100, 86 A10 / RTX 30, 89 L4 / L40S / RTX 40, 90 H100 / H200, 100 B200, 120 RTX 50 (their "
                   "shared memory per program and SM count); the wgmma in-flight check and the Gluon kernels "
                   "are sm_90's only")
    p.add_argument("--check", action="store_true", help="exit 1 if a kernel spills inside its MMA loop, exceeds "
                   "the target's shared memory, issues wgmma but never keeps one in flight (or ptxas serializes "
                   "them), or a dot of the scores / dequant_project kernels is not on the target's tensor-core "
                   "MMA (wgmma on sm_90, tcgen05 on sm_100, mma.sync elsewhere)")
    p.add_argument("--asm-dir", type=Path, help="write each launch's TTGIR, PTX and SASS into this folder")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    import triton

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    config = _attention_benchmark().parse_config(args.config)
    arch = args.arch
    print(f"triton {triton.__version__}, target sm_{arch} ({gpu(arch)[0]}), {args.dtype}, n = {args.length}, "
          f"S = {args.queries}", flush=True)
    if args.asm_dir:
        args.asm_dir.mkdir(parents=True, exist_ok=True)
    reports, failures = [], []
    jobs = [(CONTROL, control_launches)] if arch == 90 else []
    variant = "" if args.rope == "tables" else " rope=positions"
    if args.paged:
        gemma = " gemma (window, soft cap, key norm)" if args.gemma else ""
        jobs += [(f"{shape} {bits}-bit paged (vLLM pages of 16, 4 requests){gemma}",
                  lambda s=shape, b=bits: paged_decode_attention_launches(s, args.length, dtype, config, b,
                                                                          arch=arch, gemma=args.gemma))
                 for shape in args.shape for bits in args.bits]
        args.no_dequant_project = True
        args.no_gluon |= args.gemma
    else:
        jobs += [(f"{shape} {bits}-bit S={args.queries}" + variant,
                  lambda s=shape, b=bits: decode_attention_launches(s, args.length, dtype, config, b, args.queries,
                                                                    args.rope, arch))
                 for shape in args.shape for bits in args.bits]
    if not args.no_dequant_project:
        jobs += [(f"dequant_project {bits}-bit", lambda b=bits: dequant_project_launches(args.length, dtype, b, arch))
                 for bits in args.bits]
    from xq_compile.kernels.gluon_rebuild import HAS_GLUON

    if HAS_GLUON and not args.no_gluon and not args.paged and 4 in args.bits and arch == 90:
        jobs.append(("gluon_rebuild 4-bit (not dispatched)", lambda: gluon_rebuild_launches(args.length, dtype)))
    if HAS_GLUON and not args.no_gluon and arch == 90 and not config.get("gluon"):
        from xq_compile.kernels.decode_attention.gluon_scores import BITS_SUPPORTED

        step = "paged" if args.paged else f"S={args.queries}{variant}"
        jobs += [(f"{shape} {bits}-bit {step} gluon={gluon}{' gluon_ws=1' if ws else ''} (opt-in)",
                  lambda s=shape, b=bits, g=gluon, w=ws: gluon_scores_launches(s, args.length, dtype, config, b,
                                                                               args.queries, args.rope, g, args.paged,
                                                                               w))
                 for ws in (0, 1) for gluon in (1, 2) for shape in args.shape for bits in args.bits
                 if bits in BITS_SUPPORTED]
    for title, make in jobs:
        print(f"== {title}", flush=True)
        launches = make()
        if not launches:  # (gluon=2 where the head tile's W slice does not fit: the launcher declines it)
            print("  no launch: the launcher declines this configuration for this shape", flush=True)
        for launch in launches:
            try:
                r = compile_launch(launch, arch, asm_dir=args.asm_dir, title=title)
            except Exception as exc:  # a Gluon kernel against another Triton's Gluon API: say so, go on
                if not getattr(launch.kernel, "is_gluon", lambda: False)():
                    raise
                message = f"does not compile with triton {triton.__version__}: {type(exc).__name__}: " + \
                    str(exc).strip().splitlines()[-1][:200]
                print(f"  {launch.kernel.__name__}: {message}", flush=True)
                failures.append(f"{title}: {launch.kernel.__name__}: {message}")
                continue
            mma = tensor_core_mma(arch)
            if args.check and r.name in REBUILD_KERNELS and not getattr(r, mma.lower()):
                r.problems.append(f"its dots are not on {MMA_SASS[mma]} (no {mma} in the SASS)")
            if title == CONTROL and r.problems:
                r.problems.append("the positive control fails: this check cannot tell pipelined kernels "
                                  "from serialized ones with this Triton / target")
            failures += [f"{title}: {r.name} grid={r.grid} {r.config()}: {problem}" for problem in r.problems]
            reports.append({"job": title, **{k: v for k, v in vars(r).items() if k != "constexprs"},
                            "wgmma_in_flight": r.wgmma_in_flight,
                            "constexprs": {k: str(v) for k, v in r.constexprs.items()}})
            print("  " + r.line(), flush=True)
    if args.json:
        args.json.write_text(json.dumps(reports, indent=2))
    if args.check:
        print("check:", f"FAILED, {len(failures)} problems" if failures else "ok")
        for failure in failures:
            print("  " + failure)
        return int(bool(failures))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # xq_compile from the checkout, if not installed
    sys.exit(main())
