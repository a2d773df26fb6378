"""Which CUDA devices the Triton kernels serve: compute capability 8.0 (Ampere) and newer.

Triton supports NVIDIA GPUs from compute capability 8.0 on (its README). Compiled for an older one (T4,
sm_75) the K rebuild's dots do not reach the tensor cores (no ``HMMA`` in the SASS, thousands of
register spills: ``benchmarks/compile_report.py`` can show it), and bf16 has no hardware support there.
So on such a device the rewrite's ``rebuild="auto"`` takes the plain-torch strategy it takes on CPU
(``passes/strategies.py``), and the ops refuse to launch their kernels with an error saying so.
"""

from __future__ import annotations

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
