"""The Gluon K-rebuild prototype (``xq_compile.kernels.gluon_rebuild``).

Gluon kernels do not run under the Triton interpreter, so on CPU the prototype is checked by what it
compiles to for sm_90 (``tests/test_compile_report.py`` runs ``benchmarks/compile_report.py --check``,
which includes it: wgmma with ``wait_group 1`` in its loop, not serialized, no spills). Its values are
checked here on a GPU only (skipped without one):

    pytest tests/test_gluon_rebuild.py      (scripts/gpu_check.sh runs it with the other -k cuda tests)
"""

from __future__ import annotations

import pytest
import torch

from xq_compile import quant
from xq_compile.kernels import gluon_rebuild as gr

needs_hopper = pytest.mark.skipif(
    not (gr.HAS_GLUON and torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9),
    reason="needs triton with Gluon and a Hopper GPU (sm_90)",
)


def test_launch_args_reject_tiles_across_scale_groups():
    if not gr.HAS_GLUON:
        pytest.skip("triton without Gluon")
    packed = torch.zeros(4, 48, dtype=torch.uint8)
    scale = torch.zeros(4, 3, dtype=torch.float16)
    w = torch.zeros(64, 96, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="multiples of block_c=64"):
        gr.gluon_rebuild_launch_args(packed, scale, scale, w, torch.empty(4, 64), torch.tensor(4), 32)


@needs_hopper
@pytest.mark.parametrize("n", [1, 100, 1000])
def test_cuda_gluon_rebuild_matches_dequantize_then_matmul(n):
    """K = X̂·Wᵀ for the first n of L = 1000 rows (SmolLM2's 576 channels, 4-bit, groups of 64); rows past
    n keep their poison (the kernel must not write them)."""
    g = torch.Generator().manual_seed(n)
    L, C, N = 1000, 576, 576
    x = torch.randn(L, C, generator=g)
    codes, scale, zero = quant.quantize(x, 4, 64)
    packed = quant.pack(codes, 4)
    w = (torch.randn(N, C, generator=g) / C ** 0.5).to(torch.bfloat16)
    x_hat = quant.dequantize(packed[:n], scale[:n], zero[:n], 4, 64, dtype=torch.bfloat16)
    expected = x_hat.float() @ w.float().T
    dev = [t.cuda() for t in (packed, scale, zero, w)]
    out = torch.full((L, N), float("nan"), device="cuda")
    kernel, grid, args, kwargs = gr.gluon_rebuild_launch_args(*dev, out, torch.tensor(n, device="cuda"), 64)
    kernel[grid](*args, **kwargs)
    torch.cuda.synchronize()
    torch.testing.assert_close(out[:n].cpu(), expected, rtol=1e-3, atol=1e-3)
    assert out[n:].isnan().all(), "rows past n were written"
