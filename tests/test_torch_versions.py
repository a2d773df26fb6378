"""Workarounds for Inductor bugs of the older supported torch releases, decided by the running torch's
version: each applies where the bug is and nowhere else. scripts/check_versions.sh runs the tests that
need them on those releases; here the version is replaced."""

from __future__ import annotations

import pytest
import torch
from torch.torch_version import TorchVersion

from xq_compile.forms.split_latent import SplitLatentForm
from xq_compile.forms.x import XForm
from xq_compile.passes.strategies import STRATEGIES, strategy_for

CPU = torch.device("cpu")


@pytest.fixture
def torch_version(monkeypatch):
    def use(version):
        monkeypatch.setattr(torch, "__version__", TorchVersion(version))

    return use


def test_the_latent_store_leaves_the_inline_form_only_on_torch_2_11(torch_version):
    torch_version("2.11.0+cu130")
    assert strategy_for("auto", CPU, SplitLatentForm) is STRATEGIES["op"]
    assert strategy_for("auto", CPU, XForm) is STRATEGIES["inline"]  # nothing rewrites cached rows
    assert strategy_for("inline", CPU, SplitLatentForm) is STRATEGIES["inline"]  # asked for: kept
    for version in ("2.12.0", "2.13.0+cpu"):
        torch_version(version)
        assert strategy_for("auto", CPU, SplitLatentForm) is STRATEGIES["inline"]
