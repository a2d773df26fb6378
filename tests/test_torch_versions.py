"""Workarounds for Inductor bugs of the older supported torch releases, decided by the running torch's
version: each applies where the bug is and nowhere else. scripts/check_versions.sh runs the tests that
need them on those releases; here the version is replaced."""

from __future__ import annotations

import pytest
import torch
from torch.torch_version import TorchVersion


@pytest.fixture
def torch_version(monkeypatch):
    def use(version):
        monkeypatch.setattr(torch, "__version__", TorchVersion(version))

    return use


def _failing_compile(output: str, calls: list):
    """A stand-in for Inductor's compile_fx whose C++ compile fails with ``output`` while index bounds are
    checked, as 2.11's and 2.12's does on a sliding-window mask (pytorch/pytorch#178244)."""
    from torch._inductor.exc import CppCompileError, InductorError

    def compile_fx(gm, example_inputs, config_patches):
        calls.append(dict(config_patches))
        if config_patches.get("assert_indirect_indexing", True):
            raise InductorError(CppCompileError(["g++", "kernel.cpp"], output), None)
        return "compiled"

    return compile_fx


BOUNDS_CHECK_BUG = ("kernel.cpp:49:138: error: 'tmp2' was not declared in this scope\n"
                    '   49 |  TORCH_CHECK((...(tmp2 < ks1)).all_masked(), "index out of bounds: tmp2 < ks1");')


@pytest.mark.parametrize("version", ["2.11.0+cu130", "2.12.0"])
def test_a_graph_failing_on_its_bounds_check_compiles_again_without_checks_before_2_13(torch_version, monkeypatch,
                                                                                      version):
    from torch._inductor import compile_fx as compile_fx_module

    from xq_compile import _torch_private as private

    calls = []
    monkeypatch.setattr(compile_fx_module, "compile_fx", _failing_compile(BOUNDS_CHECK_BUG, calls))
    torch_version(version)
    assert private.inductor_compile(None, [], None) == "compiled"
    assert [c.get("assert_indirect_indexing", True) for c in calls] == [True, False]
    # another compile error is the user's to see, and 2.13 has the fix: no retry
    for version, output in ((version, "kernel.cpp:3:1: error: 'tmp2' was not declared in this scope"),
                            ("2.13.0+cpu", BOUNDS_CHECK_BUG)):
        calls.clear()
        torch_version(version)
        monkeypatch.setattr(compile_fx_module, "compile_fx", _failing_compile(output, calls))
        with pytest.raises(Exception, match="C\\+\\+ compile error"):
            private.inductor_compile(None, [], None)
        assert len(calls) == 1
