"""Which CUDA devices the Triton kernels serve (compute capability 8.0, Ampere, and newer), and what their
launch configurations need to know of each (:class:`GpuTarget`).

Triton supports NVIDIA GPUs from compute capability 8.0 on (its README). Compiled for an older one (T4,
sm_75) the K rebuild's dots do not reach the tensor cores (no ``HMMA`` in the SASS, thousands of
register spills: ``benchmarks/compile_report.py`` can show it), and bf16 has no hardware support there.
So on such a device the rewrite's ``rebuild="auto"`` takes the plain-torch strategy it takes on CPU
(``passes/strategies.py``), and the ops refuse to launch their kernels with an error saying so.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MIN_CUDA_CAPABILITY = (8, 0)


def triton_kernels_serve(device: torch.device) -> bool:
    """Whether ``device`` is a CUDA device the Triton kernels run on (compute capability >= 8.0)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= MIN_CUDA_CAPABILITY


def unserved(device: torch.device) -> str:
    """Why the Triton kernels do not serve the CUDA ``device``, for an error message."""
    major, minor = torch.cuda.get_device_capability(device)
    need = ".".join(map(str, MIN_CUDA_CAPABILITY))
    return f"compute capability {need} or newer; {torch.cuda.get_device_name(device)} is {major}.{minor}"


def check_kernel_device(device: torch.device, op: str) -> None:
    """Raise, saying what to do, if ``op``'s Triton kernel cannot serve the CUDA ``device``."""
    if triton_kernels_serve(device):
        return
    raise RuntimeError(
        f"xq_compile::{op} on CUDA runs Triton kernels, which need {unserved(device)}. Compile with "
        f"rebuild='auto' or 'inline' (plain torch: the X cache still holds the quantized rows), or call the op "
        f"on CPU tensors."
    )


@dataclass(frozen=True)
class GpuTarget:
    """What the launch configuration needs to know of the GPU it launches on.

    ``capability``: major·10 + minor (80 A100, 86 A10/RTX 30, 89 L4/L40S/RTX 40, 90 H100/H200, 100 B200,
    120 RTX 50); ``multiprocessors``: SMs; ``shared_memory``: bytes one program may use (opt-in limit).
    """

    capability: int
    multiprocessors: int
    shared_memory: int

    @property
    def wgmma(self) -> bool:
        """Whether Triton's dots here are Hopper's warpgroup MMAs (sm_90), which take the dequantized tile
        from registers (and keep the MMAs in flight only so) and hold a 256-feature K tile without spilling
        inside the MMA loop. Elsewhere they are :attr:`mma_sync` or sm_100's tcgen05, which reads both
        operands from shared memory (``benchmarks/compile_report.py --arch``, docs/kernels.md "Other GPUs")."""
        return self.capability // 10 == 9

    @property
    def mma_sync(self) -> bool:
        """Whether Triton's dots here are ``mma.sync`` (Ampere, Ada: sm_80-89; RTX 50: sm_120-121): each
        warp's MMAs read both operands from its own registers, so a warp dequantizes the part of a tile
        its MMAs read, and parts read by several warps are dequantized by each of them."""
        return self.capability // 10 in (8, 12)


# The interpreter (CPU tensors): configured as for a Hopper GPU of 8 multiprocessors, so the interpreted
# tests run the launches the H200 runs, scaled down.
INTERPRETER = GpuTarget(capability=90, multiprocessors=8, shared_memory=227 * 1024)


def gpu_target(device: torch.device) -> GpuTarget:
    """The :class:`GpuTarget` of a CUDA device; :data:`INTERPRETER` for CPU tensors."""
    if device.type != "cuda":
        return INTERPRETER
    props = torch.cuda.get_device_properties(device)
    return GpuTarget(capability=props.major * 10 + props.minor, multiprocessors=props.multi_processor_count,
                     shared_memory=getattr(props, "shared_memory_per_block_optin", props.shared_memory_per_block))
