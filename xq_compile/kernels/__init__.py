"""Custom ops and kernels of xq-compile.

Importing this package registers ``torch.ops.xq_compile.dequant_project`` and
``torch.ops.xq_compile.decode_attention`` (CPU reference kernels and, when triton is installed, the CUDA
Triton kernels), and the log8 scale format's ``log8_encode`` / ``log8_decode`` (plain torch on every
device). Triton itself is optional.

The ops are reached as ``torch.ops.xq_compile.<name>`` (or ``xq_compile.kernels.<module>.<name>``); this
package deliberately does not re-export them under the names ``dequant_project`` / ``decode_attention``,
which would shadow the module / subpackage of the same names. ``tiles`` holds the Triton tile loader
both use; ``docs/kernels.md`` the design notes.
"""

from xq_compile.kernels import decode_attention, dequant_project, log8
from xq_compile.kernels.decode_attention import decode_attention_triton
from xq_compile.kernels.dequant_project import HAS_TRITON, dequant_project_triton

__all__ = ["HAS_TRITON", "decode_attention", "decode_attention_triton", "dequant_project", "dequant_project_triton"]
