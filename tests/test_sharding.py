"""``--shard I/N`` (tests/conftest.py): the parallel shards that scripts/test.sh and scripts/gpu_check.sh run
cover every test once.

Each selection is collected by a nested ``pytest.main`` in this process (as a subprocess would, through the
same conftest and hooks, without importing torch again for each of the nine collections)."""

from __future__ import annotations

from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
FILES = [str(TESTS / "test_quant.py")]


class _Collected:
    """A plugin that keeps the node ids a run selected (after -k and the conftest's sharding)."""

    def __init__(self):
        self.ids: list[str] = []

    def pytest_collection_finish(self, session):
        self.ids = [item.nodeid for item in session.items]


def collect(*extra: str) -> tuple[int, list[str]]:
    """(exit code, selected node ids) of ``pytest --collect-only`` on FILES with ``extra`` arguments."""
    plugin = _Collected()
    code = pytest.main(["--collect-only", "-q", "-s", "-p", "no:cacheprovider", "--rootdir", str(TESTS.parent),
                        *FILES, *extra], plugins=[plugin])
    return int(code), plugin.ids


def collected(*extra: str) -> list[str]:
    code, ids = collect(*extra)
    assert code == 0, (extra, code)
    return ids


@pytest.mark.parametrize("shards, select", [
    (3, []),
    # a selection scattered over the file: sharding before -k would give one shard 1 test, the other 3
    (2, ["-k", "round_trip or shrinks or hadamard or options"]),
])
def test_shards_partition_the_selection(shards, select):
    everything = collected(*select)
    assert len(everything) >= 4
    if select:
        assert len(everything) < len(collected())  # -k did deselect
    parts = [collected(*select, "--shard", f"{i}/{shards}") for i in range(shards)]
    assert sorted(sum(parts, [])) == sorted(everything)                 # every test in some shard, none twice
    assert all(abs(len(p) - len(everything) / shards) < 1 for p in parts)  # balanced counts


def test_bad_shard_is_a_usage_error(capsys):
    code, _ = collect("--shard", "3/3")
    assert code == pytest.ExitCode.USAGE_ERROR
    assert "expected I/N with 0 <= I < N" in capsys.readouterr().err
