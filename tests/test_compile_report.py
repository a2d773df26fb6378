"""The Triton kernels compiled for a Hopper GPU (sm_90) on this machine, without one
(``benchmarks/compile_report.py``): every scores / K-rebuild dot is on the warpgroup MMA path (HGMMA in
the SASS), every kernel that issues wgmma keeps one in flight (``wgmma.wait_group 1`` in its PTX and no
serialization by ptxas), no kernel spills registers inside its MMA loop, shared memory fits an H200
program -- for the default configuration of each benchmark shape at 2/3/4/8 bits. The interpreter tests
prove the kernels compute the right values; these prove they compile to the fast path at all (the
interpreter accepts programs that the compiler would put on FMAs, serialize or spill).

On Ada (sm_89: mma.sync, 99 KB of shared memory a program, as sm_86 and sm_120) the default
configuration fits and does not spill in its MMA loops either.

The in-flight check is itself tested on two controls compiled the same way: a plain bf16 matmul (must
pass) and a matmul whose second operand is dequantized in the loop and stored to shared memory, the
pattern Triton cannot pipeline (must fail, naming the kernel)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

HAS_TRITON = importlib.util.find_spec("triton") is not None

if HAS_TRITON and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    import triton
    import triton.language as tl

    @triton.jit
    def _smem_dequant_matmul_kernel(a_ptr, codes_ptr, c_ptr, K, s_am, s_ak, s_ck, s_cn, s_om, s_on,
                                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """The negative control: B is dequantized from uint8 codes in the loop and is the operand that
        wgmma reads from shared memory, so each step must store it there and wait for the MMA first."""
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            a = tl.load(a_ptr + rm[:, None] * s_am + (k0 + rk)[None, :] * s_ak)
            codes = tl.load(codes_ptr + (k0 + rk)[:, None] * s_ck + rn[None, :] * s_cn)
            b = (codes.to(tl.float32) * 0.5 - 1.0).to(tl.bfloat16)
            acc = tl.dot(a, b, acc)
        tl.store(c_ptr + rm[:, None] * s_om + rn[None, :] * s_on, acc.to(tl.bfloat16))


def _cuobjdump_present() -> bool:
    if not HAS_TRITON:
        return False
    import triton

    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists()


def _benchmark_module(name: str = "compile_report"):
    """benchmarks/<name>.py as a module, without putting benchmarks/ on sys.path for every test."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is being made
    spec.loader.exec_module(module)
    return module


def _compile_report(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """benchmarks/compile_report.py with ``args``, compiling (not interpreting), xq_compile from this checkout."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compile_report.py"), *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def cr_rebuild_kernels() -> tuple:
    return _benchmark_module().REBUILD_KERNELS


def test_loop_spills_counts_only_spills_inside_mma_loops():
    cr = _benchmark_module()

    sass = """
        /*0000*/                   STL [R1], R2 ;
        /*0010*/                   MOV R3, R4 ;
        /*0020*/                   HGMMA.64x128x16.F32.BF16 R24, R164, gdesc[UR4], R24 ;
        /*0030*/                   LDL R5, [R1] ;
        /*0040*/              @!P3 BRA 0x20 ;
        /*0050*/                   STL [R1+0x4], R6 ;
        /*0060*/                   FFMA R7, R8, R9, R10 ;
        /*0070*/                   STL [R1+0x8], R7 ;
        /*0080*/               @P0 BRA 0x60 ;
        /*0090*/                   BRA 0xa0 ;
        /*00a0*/                   EXIT ;
    """
    # the LDL at 0x30 is inside the loop 0x20..0x40 that issues HGMMA; the STL at 0x70 is inside a loop
    # without MMAs, the others outside any loop
    assert cr.loop_spills(sass) == 1
    assert cr.loop_spills(sass.replace("HGMMA.64x128x16.F32.BF16", "FMUL")) == 0


def test_programs_per_sm_counts_registers_threads_and_shared_memory():
    cr = _benchmark_module()
    assert cr.programs_per_sm(90, 176, 8, 56 * 1024) == 1  # registers: 176 x 32 per warp, 11 warps of 8
    assert cr.programs_per_sm(90, 114, 8, 32 * 1024) == 2  # 3648 -> 3840 per warp, 17 warps
    assert cr.programs_per_sm(90, 40, 4, 0) == 12  # 51 warps by registers (16 by threads)
    assert cr.programs_per_sm(90, 32, 4, 120 * 1024) == 1  # shared memory: 228 KB per SM, 121 KB each
    assert cr.programs_per_sm(89, 32, 4, 0) == 12  # threads: 1536 on Ada, 128 per program
    assert cr.programs_per_sm(90, 16, 1, 0) == 32  # the cap on resident programs


def test_wgmma_waits_and_in_flight():
    cr = _benchmark_module()
    pipelined = """
        wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%r1}, %rd1, %rd2, %p1, 1, 1, 0, 1;
        wgmma.commit_group.sync.aligned;
        wgmma.wait_group.sync.aligned 1;
        @%p9 bra $L__BB0_3;
        wgmma.wait_group.sync.aligned 0;
    """
    assert cr.wgmma_waits(pipelined) == [0, 1]
    assert cr.wgmma_waits(pipelined.replace("aligned 1;", "aligned 0;")) == [0]
    report = cr.KernelReport(name="_k", grid=(1,), constexprs={}, wgmma=1, wgmma_waits=[0, 1])
    assert report.wgmma_in_flight
    report.wgmma_serialized = True  # ptxas waits anyway (C7515)
    assert not report.wgmma_in_flight
    report = cr.KernelReport(name="_k", grid=(1,), constexprs={}, wgmma=1, wgmma_waits=[0])
    assert not report.wgmma_in_flight and "WGMMA NEVER IN FLIGHT" in report.line()


@pytest.mark.skipif(not _cuobjdump_present(), reason="needs triton with its bundled cuobjdump (x86-64 Linux)")
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"), reason="compiles, not interprets")
def test_in_flight_check_tells_pipelined_from_serialized(tmp_path):
    import torch

    cr = _benchmark_module()
    (control,) = cr.control_launches()
    report = cr.compile_launch(control, asm_dir=tmp_path, title=cr.CONTROL)
    assert report.wgmma > 0 and report.wgmma_waits == [0, 1] and report.wgmma_in_flight, report.line()
    assert report.problems == [], report.line()
    assert sorted(Path(f).suffix for f in report.asm_files) == [".ptx", ".sass", ".ttgir"]
    assert all(Path(f).parent == tmp_path and Path(f).stat().st_size > 1000 for f in report.asm_files)

    a = torch.empty(1024, 1024, dtype=torch.bfloat16)
    codes = torch.empty(1024, 1024, dtype=torch.uint8)
    serialized = cr.Launch(_smem_dequant_matmul_kernel, (8, 8),
                           (a, codes, a, 1024, *a.stride(), *codes.stride(), *a.stride()),
                           dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3))
    report = cr.compile_launch(serialized)
    assert report.wgmma > 0 and report.wgmma_waits == [0] and not report.wgmma_in_flight, report.line()
    assert report.problems == ["never keeps a wgmma in flight: its PTX waits with wgmma.wait_group 0 only, "
                               "each MMA finished before it goes on"], report.line()


def test_warp_specialized_loops_are_found_apart():
    """A warp-specialized kernel's SASS: the MMA warps' loop waits on an mbarrier whose retry ptxas moved out
    of line (after EXIT, branching back), which must not count as a loop spanning both partitions; the
    dequantizing warps' loop (it arrives on an mbarrier, no MMA) is a feeding loop, its spills count."""
    cr = _benchmark_module()

    sass = """
        /*0000*/                   MOV R1, R2 ;
        /*0010*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR4], R2 ;
        /*0020*/              @!P0 BRA 0xc0 ;
        /*0030*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0040*/              @!P1 SYNCS.ARRIVE.TRANS64.A1T0 RZ, [UR8], RZ ;
        /*0050*/               @P0 BRA 0x10 ;
        /*0060*/                   LDS R4, [R5] ;
        /*0070*/                   STL [R1], R4 ;
        /*0080*/                   SYNCS.ARRIVE.TRANS64.A1T0 RZ, [UR9], RZ ;
        /*0090*/               @P2 BRA 0x60 ;
        /*00a0*/                   EXIT ;
        /*00b0*/                   NOP ;
        /*00c0*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR4], R2 ;
        /*00d0*/              @!P0 BRA 0xc0 ;
        /*00e0*/                   BRA 0x30 ;
    """
    assert [len(loop) for loop in cr.mma_loops(sass)] == [5]  # 0x10..0x50, not 0x10..0xe0
    assert cr.feeding_loops(sass) == [["LDS", "STL", "SYNCS", "BRA"]]
    assert cr.loop_spills(sass) == 1
    # the stub's branch back counts as a loop where nothing jumped out to it
    no_jump_out = sass.replace("@!P0 BRA 0xc0 ;\n        /*0030*/", "NOP ;\n        /*0030*/")
    assert [len(loop) for loop in cr.mma_loops(no_jump_out)] == [14]  # 0x10..0xe0
    # without its mbarrier arrival the loop feeds nothing: its spill is outside the loops that matter
    unfed = sass.replace("SYNCS.ARRIVE.TRANS64.A1T0 RZ, [UR9], RZ", "NOP")
    assert cr.feeding_loops(unfed) == [] and cr.loop_spills(unfed) == 0


@pytest.mark.skipif(not _cuobjdump_present(), reason="needs triton with its bundled cuobjdump (x86-64 Linux)")
def test_default_configs_compile_to_wgmma_in_flight_without_loop_spills(tmp_path):
    proc = _compile_report("--check", "--bits", "2", "3", "4", "8", "--json", str(tmp_path / "report.json"),
                           "--asm-dir", str(tmp_path / "asm"))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "check: ok" in proc.stdout, out[-6000:]
    reports = json.loads((tmp_path / "report.json").read_text())
    # every job reported its kernels: the control, 3 shapes x 4 widths of decode attention (3 kernels
    # each), 4 widths of dequant_project
    names = [r["name"] for r in reports]
    assert names.count("_control_matmul_kernel") == 1 and names.count("_dequant_project_kernel") == 4, names
    assert all(names.count(k) == 12 for k in ("_scores_kernel", "_softmax_kernel", "_values_kernel",
                                              "_combine_kernel", "_project_kernel"))
    # the values stage (accᵀ += x̂vᵀ·pᵀ, p read from memory) is on wgmma with an MMA in flight even at S = 1
    for r in reports:
        if r["name"] == "_values_kernel":
            assert r["hgmma"] > 0 and r["wgmma_in_flight"] and r["loop_spill_instructions"] == 0, r
    # the K rebuild (scores, dequant_project) runs on wgmma with an MMA in flight: a wait that leaves at
    # least one pending and no serialization by ptxas
    rebuild = [r for r in reports if r["name"] in (*cr_rebuild_kernels(), "_control_matmul_kernel")]
    from xq_compile.kernels.gluon_rebuild import HAS_GLUON

    if HAS_GLUON:  # the Gluon K rebuild (not dispatched; 4-bit), both forms: on wgmma, one MMA group left pending
        assert names.count("_gluon_rebuild_kernel") == names.count("_gluon_rebuild_ws_kernel") == 1, names
        # the opt-in Gluon scores kernel, 3 shapes x the 2, 4 and 8 bits it decodes with W streamed
        # (gluon=1), and SmolLM2's (the one shape whose head-tile W slice fits) with W resident (gluon=2);
        # then the same warp-specialized (gluon_ws=1) but for 8-bit keys in 128-row tiles (7B, GQA), which
        # it declines: in ``rebuild`` below (on wgmma, in flight, no spills in its loops)
        assert names.count("_gluon_scores_kernel") == 9 + 3 + 7 + 3, names
    for r in rebuild:
        assert r["wgmma"] > 0 and max(r["wgmma_waits"]) >= 1 and not r["wgmma_serialized"], r
        assert r["wgmma_in_flight"] and r["loop_spill_instructions"] == 0, r
    # the scores kernel's K rebuild is one dot per step (both RoPE halves of every head in one accumulator):
    # BLOCK_C = 64 channels are 4 wgmma of k = 16 per step, not 8 (one chain per half, as before), and the
    # halves part after the loop in registers: no warp shuffles anywhere in the kernel
    cr = _benchmark_module()
    scores_sass = sorted((tmp_path / "asm").glob("*.scores_kernel.*BLOCK_C64*.sass"))
    assert len(scores_sass) == 12, scores_sass
    for path in scores_sass:
        sass = path.read_text()
        loops = cr.mma_loops(sass)  # per channel (GQA): a loop for whole row blocks, one for the last
        assert len(loops) in (1, 2) and all(loop.count("HGMMA") == 4 for loop in loops), path.name
        assert "SHFL" not in sass, path.name
    # codes of 2-4 bits with one scale per row (per token: every values tile, the MHA shapes' keys) are
    # dequantized by one AND and one FMA per element (tiles.fma_code), without the FADD of the 2^23 form
    per_token = [path for path in (tmp_path / "asm").glob("*_kernel.*.sass") if ".values_kernel." in path.name
                 or (".scores_kernel." in path.name and not path.name.startswith("gqa"))]
    folded = [path for path in per_token if "BITS8" not in path.name]
    assert len(folded) == 9 + 6, folded
    for path in folded:
        assert all("FADD" not in loop for loop in cr.mma_loops(path.read_text())), path.name


@pytest.mark.skipif(not _cuobjdump_present(), reason="needs triton with its bundled cuobjdump (x86-64 Linux)")
def test_sixteen_query_tokens_keep_every_wgmma_in_flight(tmp_path):
    """S = 16 (speculative decoding, short chunks), 4 bits, the three shapes: the values kernel has blocks
    of 128 query rows and the GQA projection 64 query rows per KV head, so the scores, values and (GQA)
    projection kernels issue wgmma -- and each keeps one in flight (before the probabilities and the
    combined rows went through memory, the values and projection dots took an operand computed in the
    loop from shared memory and waited for every MMA)."""
    proc = _compile_report("--queries", "16", "--bits", "4", "--check", "--no-dequant-project", "--no-gluon",
                           "--json", str(tmp_path / "report.json"), timeout=600)
    assert proc.returncode == 0 and "check: ok" in proc.stdout, (proc.stdout + proc.stderr)[-6000:]
    reports = [r for r in json.loads((tmp_path / "report.json").read_text()) if r["job"] != "control"]
    by_kernel = {}
    for r in reports:
        by_kernel.setdefault(r["name"], []).append(r)
    assert {k: len(v) for k, v in by_kernel.items()} == {
        "_scores_kernel": 3, "_softmax_kernel": 3, "_values_kernel": 3, "_combine_kernel": 3, "_project_kernel": 3}
    for r in by_kernel["_scores_kernel"] + by_kernel["_values_kernel"]:
        assert r["hgmma"] > 0 and r["wgmma_in_flight"] and r["loop_spill_instructions"] == 0, r
    (gqa_project,) = [r for r in by_kernel["_project_kernel"] if r["job"].startswith("gqa")]
    assert gqa_project["hgmma"] > 0 and gqa_project["wgmma_in_flight"], gqa_project


@pytest.mark.skipif(not _cuobjdump_present(), reason="needs triton with its bundled cuobjdump (x86-64 Linux)")
def test_ada_gets_tiles_that_fit_its_shared_memory_without_loop_spills(tmp_path):
    """sm_89 (L4, L40S, RTX 40; sm_86 and sm_120 allow a program the same 99 KB of shared memory) has no
    wgmma: the dots are mma.sync, whose accumulators and operands all sit in registers. The default
    configuration there (128-feature K tiles, rebuilt as Kᵀ = Wk·X̂ᵀ) puts every decode-attention kernel of
    the three shapes on the tensor cores (HMMA) without spills in the MMA loops, within 99 KB. Hopper's 256-feature tile
    would not launch there: the 7B scores kernel needs 128 KB, which --check reports. The unfused K rebuild
    (``dequant_project``) is transposed there too, on the tensor cores, without spills in its loop."""
    proc = _compile_report("--arch", "89", "--check", "--bits", "4", "--json", str(tmp_path / "report.json"),
                           timeout=600)
    assert proc.returncode == 0 and "check: ok" in proc.stdout, (proc.stdout + proc.stderr)[-6000:]
    assert "target sm_89 (L4)" in proc.stdout
    reports = json.loads((tmp_path / "report.json").read_text())
    assert sorted(r["name"] for r in reports) == sorted(["_scores_kernel", "_softmax_kernel", "_values_kernel",
                                                         "_combine_kernel", "_project_kernel"] * 3
                                                        + ["_dequant_project_kernel"])
    for r in reports:  # (no control and no Gluon kernels: those are sm_90's)
        assert r["shared_bytes"] <= 99 * 1024 and r["loop_spill_instructions"] == 0 and r["hgmma"] == 0, r
        if r["name"] in ("_scores_kernel", "_values_kernel", "_dequant_project_kernel"):
            assert r["hmma"] > 0 and r["constexprs"].get("BLOCK_H", "1") in ("1", "2"), r
        if r["name"] in ("_scores_kernel", "_dequant_project_kernel"):  # X̂ the B operand: fewer warps dequantize it
            assert r["constexprs"]["X_AS_B"] == "True", r
    hopper_tile = _compile_report("--arch", "89", "--check", "--bits", "4", "--no-dequant-project", "--shape",
                                  "llama7b", "--config", "block_h=2", timeout=600)
    assert hopper_tile.returncode == 1, hopper_tile.stdout[-3000:]
    assert re.search(r"_scores_kernel .*needs 131\d\d\d B of shared memory \(> 101376", hopper_tile.stdout), \
        hopper_tile.stdout[-3000:]


@pytest.mark.skipif(not _cuobjdump_present(), reason="needs triton with its bundled cuobjdump (x86-64 Linux)")
def test_paged_decode_step_compiles_to_wgmma_in_flight_without_loop_spills(tmp_path):
    """The vLLM plugin's decode step (``--paged``: the sources strided views of page bytes, rows through a
    block table, a fill per request): for the three shapes at 3 and 4 bits its K rebuild is on wgmma with
    an MMA in flight and no kernel spills inside its MMA loop, as for the dense cache -- the opt-in Gluon
    scores kernel too (4 bits: W streamed for the three shapes, W resident for SmolLM2's, each also
    warp-specialized; it does not take 3-bit keys)."""
    proc = _compile_report("--paged", "--check", "--bits", "3", "4", "--json", str(tmp_path / "report.json"))
    assert proc.returncode == 0 and "check: ok" in proc.stdout, (proc.stdout + proc.stderr)[-6000:]
    reports = [r for r in json.loads((tmp_path / "report.json").read_text()) if r["job"] != "control"]
    assert all("paged" in r["job"] for r in reports), {r["job"] for r in reports}
    names = [r["name"] for r in reports]
    kernels = ("_scores_kernel", "_softmax_kernel", "_values_kernel", "_combine_kernel", "_project_kernel")
    assert all(names.count(k) == 6 for k in kernels), names
    from xq_compile.kernels.gluon_rebuild import HAS_GLUON

    assert names.count("_gluon_scores_kernel") == (2 * (3 + 1) if HAS_GLUON else 0), names  # gluon_ws 0 and 1
    for r in reports:
        assert r["loop_spill_instructions"] == 0, r
        if r["name"] in ("_scores_kernel", "_gluon_scores_kernel"):
            assert r["hgmma"] > 0 and r["wgmma_in_flight"], r


@pytest.mark.skipif(not _cuobjdump_present(), reason="needs triton with its bundled cuobjdump (x86-64 Linux)")
def test_gemma_decode_step_compiles_to_wgmma_in_flight_without_loop_spills(tmp_path):
    """The decode step of a Gemma 2/3 layer (``--paged --gemma``: a sliding window, a soft cap, a per-head key
    norm -- the scores kernel's epilogue branches, the window start in the softmax and values kernels)
    compiles for sm_90 with its K rebuild on wgmma, an MMA in flight, and no spill inside an MMA loop."""
    proc = _compile_report("--paged", "--gemma", "--check", "--bits", "4", "--shape", "smollm2", "gqa", "--json",
                           str(tmp_path / "report.json"))
    assert proc.returncode == 0 and "check: ok" in proc.stdout, (proc.stdout + proc.stderr)[-6000:]
    reports = [r for r in json.loads((tmp_path / "report.json").read_text()) if r["job"] != "control"]
    assert all("gemma" in r["job"] for r in reports) and len(reports) == 10, [r["job"] for r in reports]
    for r in reports:
        assert r["loop_spill_instructions"] == 0, r
        if r["name"] == "_scores_kernel":
            assert r["constexprs"]["WINDOWED"] == r["constexprs"]["SOFT_CAP"] == r["constexprs"]["KEY_NORM"] == "True"
            assert r["hgmma"] > 0 and r["wgmma_in_flight"], r


@pytest.mark.skipif(not _cuobjdump_present(), reason="needs triton with its bundled cuobjdump (x86-64 Linux)")
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"), reason="compiles, not interprets")
def test_triton_cache_seed_is_found_by_the_launch_it_was_built_for(tmp_path):
    """benchmarks/triton_cache_seed.py: a seed built for one launch (compiled for sm_90 here, only the cubin
    and metadata kept, the group file's absolute paths replaced by a placeholder) installs into another
    cache folder where compiling that launch again finds it and adds no file; a launch specialized
    differently (other bits) is not found; a seed of another Triton installs nothing."""
    import torch

    seed_module = _benchmark_module("triton_cache_seed")
    cr = sys.modules["compile_report"]
    four = [("4-bit", launch) for launch in cr.dequant_project_launches(256, torch.bfloat16, 4)]
    three = [("3-bit", launch) for launch in cr.dequant_project_launches(256, torch.bfloat16, 3)]
    seed = tmp_path / "seed"
    assert seed_module.build(seed, four) == 0
    (group,) = seed.glob("*/__grp__*.json")
    assert sorted(p.suffix for p in group.parent.iterdir()) == [".cubin", ".json", ".json"]
    assert str(tmp_path) not in group.read_text() and seed_module.PLACEHOLDER in group.read_text()
    assert seed_module.check(seed, four) == 0
    assert seed_module.check(seed, four + three) == 1  # the 3-bit kernel compiled anew

    cache = tmp_path / "elsewhere" / "triton"
    assert seed_module.install(seed, cache) == 1
    assert str(cache.resolve()) in next(cache.glob("*/__grp__*.json")).read_text()
    (seed / seed_module.VERSION_FILE).write_text("0.0.0\n")
    assert seed_module.install(seed, tmp_path / "other") == 0


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="captures Triton launches")
def test_triton_cache_seed_holds_the_cuda_tests_launches():
    """The seed's share for gpu_check's CUDA tests is built from the tests' own cases and configurations (a
    change to those that breaks it fails here, not in a GPU session): every kernel they launch outside
    Inductor, both K forms of the Triton scores kernel, and the Gluon scores kernel in every form the tests
    run -- W streamed and resident, one role and warp-specialized, one and two warpgroups, dense and paged."""
    from xq_compile.kernels.gluon_rebuild import HAS_GLUON

    seed_module = _benchmark_module("triton_cache_seed")
    launches = [launch for _, launch in seed_module.cuda_test_launches()]
    names = {launch.kernel.__name__ for launch in launches}
    expected = {"_scores_kernel", "_softmax_kernel", "_values_kernel", "_combine_kernel", "_project_kernel",
                "_dequant_project_kernel"}
    if HAS_GLUON:
        expected |= {"_gluon_scores_kernel", "_gluon_rebuild_kernel", "_gluon_rebuild_ws_kernel"}
    assert names == expected
    assert {launch.kwargs["X_AS_B"] for launch in launches if launch.kernel.__name__ == "_scores_kernel"} == {0, 1}
    gluon = [launch.kwargs for launch in launches if launch.kernel.__name__ == "_gluon_scores_kernel"]
    forms = {(k["W_RESIDENT"], k["WARP_SPECIALIZE"], k["num_warps"], k["PAGED"]) for k in gluon}
    assert forms == ({(resident, ws, warps, paged) for resident in (False, True) for ws in (False, True)
                      for warps in (4, 8) for paged in (False, True) if not (resident and warps == 8)}
                     if HAS_GLUON else set())


def test_benchmark_config_arguments_parse_to_checked_overrides():
    """``--config KEY=VALUE`` (decode_attention.py, compile_report.py; decode_step.py's --attention-config):
    integers, and ``gluon=auto``; unknown keys stop the benchmark, saying which keys exist."""
    parse = _benchmark_module("decode_attention").parse_config
    assert parse(["gluon=auto", "num_splits=3"]) == {"gluon": "auto", "num_splits": 3}
    assert parse(["gluon=2"]) == {"gluon": 2}
    with pytest.raises(SystemExit, match="'block_q=16'.*KEY in"):
        parse(["block_q=16"])
    with pytest.raises(ValueError):
        parse(["block_n=auto"])
