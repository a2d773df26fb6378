"""Custom ops and kernels of xq-compile.

Importing this package registers ``torch.ops.xq_compile.dequant_project`` (CPU reference kernel and,
when triton is installed, the CUDA Triton kernel). Triton itself is optional.

The op is reached as ``torch.ops.xq_compile.dequant_project`` (or
``xq_compile.kernels.dequant_project.dequant_project``); this package deliberately does not re-export it
under the name ``dequant_project``, which would shadow the submodule of the same name.
"""

from xq_compile.kernels import dequant_project
from xq_compile.kernels.dequant_project import HAS_TRITON, dequant_project_triton

__all__ = ["HAS_TRITON", "dequant_project", "dequant_project_triton"]
