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


def check_kernel_device(device: torch.device, op: str) -> None:
    """Raise, saying what to do, if ``op``'s Triton kernel cannot serve the CUDA ``device``."""
    if triton_kernels_serve(device):
        return
    major, minor = torch.cuda.get_device_capability(device)
    raise RuntimeError(
        f"xq_compile::{op} on CUDA runs Triton kernels, which need compute capability "
        f"{'.'.join(map(str, MIN_CUDA_CAPABILITY))} or newer (Ampere on); {torch.cuda.get_device_name(device)} "
        f"is {major}.{minor}. Compile with rebuild='auto' or 'inline' (plain torch: the X cache still holds "
        f"the quantized rows), or call the op on CPU tensors."
    )
