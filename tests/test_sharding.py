"""``--shard I/N`` (tests/conftest.py): the parallel shards scripts/gpu_check.sh runs cover every test once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
FILES = [str(TESTS / "test_quant.py")]


def collect(*extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           *FILES, *extra], capture_output=True, text=True, cwd=TESTS.parent)


def collected(*extra: str) -> list[str]:
    proc = collect(*extra)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return [line for line in proc.stdout.splitlines() if "::" in line]


@pytest.mark.parametrize("shards, select", [
    (3, []),
    # a selection scattered over the file: sharding before -k would give one shard 1 test, the other 3
    (2, ["-k", "round_trip or shrinks or hadamard or options"]),
])
def test_shards_partition_the_selection(shards, select):
    everything = collected(*select)
    assert len(everything) >= 4
    parts = [collected(*select, "--shard", f"{i}/{shards}") for i in range(shards)]
    assert sorted(sum(parts, [])) == sorted(everything)                 # every test in some shard, none twice
    assert all(abs(len(p) - len(everything) / shards) < 1 for p in parts)  # balanced counts


def test_bad_shard_is_a_usage_error():
    proc = collect("--shard", "3/3")
    assert proc.returncode == 4  # pytest's ExitCode.USAGE_ERROR
    assert "expected I/N with 0 <= I < N" in proc.stderr
