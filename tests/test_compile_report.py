"""The Triton kernels compiled for a Hopper GPU (sm_90) on this machine, without one
(``benchmarks/compile_report.py``): every scores / K-rebuild dot is on the warpgroup MMA path (HGMMA in
the SASS), no kernel spills registers inside its MMA loop, shared memory fits an H200 program -- for
the default configuration of each benchmark shape at 2/3/4/8 bits. The interpreter tests prove the
kernels compute the right values; these prove they compile to the fast path at all (the interpreter
accepts programs that the compiler would put on FMAs or spill)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

HAS_TRITON = importlib.util.find_spec("triton") is not None


def _cuobjdump_present() -> bool:
    if not HAS_TRITON:
        return False
    import triton

    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists()


def _compile_report_module():
    """benchmarks/compile_report.py as a module, without putting benchmarks/ on sys.path for every test."""
    spec = importlib.util.spec_from_file_location("compile_report", ROOT / "benchmarks" / "compile_report.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is being made
    spec.loader.exec_module(module)
    return module


def test_loop_spills_counts_only_spills_inside_mma_loops():
    cr = _compile_report_module()

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


@pytest.mark.skipif(not _cuobjdump_present(), reason="needs triton with its bundled cuobjdump (x86-64 Linux)")
def test_default_configs_compile_to_wgmma_without_loop_spills():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "compile_report.py"), "--check", "--bits", "2", "3", "4", "8"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "check: ok" in proc.stdout, out[-6000:]
    # every job reported its kernels: 3 shapes x 4 widths of decode attention, 4 widths of dequant_project
    assert out.count("_scores_kernel") == 12 and out.count("_dequant_project_kernel") == 4, out[-6000:]
