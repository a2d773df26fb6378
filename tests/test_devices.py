"""Which GPUs the Triton kernels serve (compute capability 8.0 on), decided without one: the device
queries are replaced by a T4 (7.5), an A100 (8.0) and an H100 (9.0)."""

from __future__ import annotations

import pytest
import torch

from xq_compile.kernels import devices
from xq_compile.kernels.decode_attention import gpu_target
from xq_compile.passes.strategies import STRATEGIES, strategy_for

CUDA = torch.device("cuda", 0)
GPUS = {(7, 5): "Tesla T4", (8, 0): "NVIDIA A100-SXM4-80GB", (9, 0): "NVIDIA H100 80GB HBM3"}


@pytest.fixture
def gpu(monkeypatch):
    """gpu(capability): torch.cuda answers as that GPU would (nothing here launches anything)."""

    def use(capability):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: GPUS[capability])

    return use


def test_auto_rebuilds_in_plain_torch_where_the_triton_kernels_do_not_serve(gpu):
    gpu((7, 5))
    assert strategy_for("auto", CUDA) is STRATEGIES["inline"]
    assert strategy_for("inline", CUDA) is STRATEGIES["inline"]
    for capability in ((8, 0), (9, 0)):
        gpu(capability)
        assert strategy_for("auto", CUDA) is STRATEGIES["fused"]
    assert strategy_for("auto", torch.device("cpu")) is STRATEGIES["inline"]


@pytest.mark.parametrize("rebuild", ["op", "fused"])
def test_forcing_the_kernels_on_an_older_gpu_is_refused_at_compile_time(gpu, rebuild):
    gpu((7, 5))
    with pytest.raises(ValueError, match=rf"rebuild='{rebuild}'.*8\.0 or newer; Tesla T4 is 7\.5: use rebuild='auto'"):
        strategy_for(rebuild, CUDA)
    gpu((8, 0))
    assert strategy_for(rebuild, CUDA) is STRATEGIES[rebuild]
    assert strategy_for(rebuild, torch.device("cpu")) is STRATEGIES[rebuild]  # the ops' torch references


def test_the_ops_refuse_to_launch_their_kernels_on_an_older_gpu(gpu):
    gpu((7, 5))
    with pytest.raises(RuntimeError, match=r"decode_attention on CUDA.*8\.0 or newer.*Tesla T4 is 7\.5.*'auto'"):
        devices.check_kernel_device(CUDA, "decode_attention")
    gpu((8, 0))
    devices.check_kernel_device(CUDA, "decode_attention")


def test_the_launch_target_of_cpu_tensors_is_a_small_hopper():
    """The interpreter runs the launches configured as for sm_90 (what the compile report checks)."""
    target = gpu_target(torch.device("cpu"))
    assert target.capability == 90 and target.wgmma and target.multiprocessors == 8


def test_dequant_project_rebuilds_transposed_where_the_dots_are_mma_sync():
    """Ampere, Ada and RTX 50 (mma.sync) compute outᵀ = W·X̂ᵀ, except at 3 bits from Triton 3.8 on; Hopper
    keeps X̂ as wgmma's register operand (its MMAs stay in flight only so), and B200 (tcgen05) the form that
    compiled shorter."""
    from xq_compile.kernels.dequant_project import rebuild_transposed
    from xq_compile.kernels.devices import GpuTarget

    def target(capability):
        return GpuTarget(capability=capability, multiprocessors=100, shared_memory=99 * 1024)

    for capability in (80, 86, 89, 120):
        assert target(capability).mma_sync
        for release in ((3, 8), (3, 9), (4, 0)):  # these lay a 3-bit tile out through shared memory anyway
            assert [rebuild_transposed(target(capability), bits, release) for bits in (2, 3, 4, 8)] == \
                [True, False, True, True]
        for release in ((3, 6), (3, 7)):
            assert all(rebuild_transposed(target(capability), bits, release) for bits in (2, 3, 4, 8))
    for capability in (90, 100):
        assert not target(capability).mma_sync
        assert not any(rebuild_transposed(target(capability), bits, (3, 6)) for bits in (2, 3, 4, 8))
