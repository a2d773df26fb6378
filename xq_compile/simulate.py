"""Simulated XQuant: the unmodified eager model, with K and V computed from fake-quantized X.

It quantizes exactly what the compiled path caches, so it is both the torch reference the compiled
decode path is tested against and a fast one-pass mode for sweeps. Every token's K/V (the current
token's included) comes from X̂ = dequantize(quantize(X·R))·Rᵀ; queries use the exact X, as in the
compiled path.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from . import quant
from .config import XQuantConfig
from .rotation import hadamard, rotate


def simulated_x(x: torch.Tensor, config: XQuantConfig) -> torch.Tensor:
    """X̂ as the compiled path reconstructs it (rotation undone, so it feeds the original weights)."""
    if config.rotation == "hadamard":
        h = hadamard(config.group_size, device=x.device)
        # blockdiag(H) is symmetric and orthogonal: R⁻¹ = R.
        return rotate(quant.fake_quantize(rotate(x, h), config.bits, config.group_size), h)
    return quant.fake_quantize(x, config.bits, config.group_size)


def _kv_projections(model: torch.nn.Module) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
    pairs = []
    for module in model.modules():
        k, v = getattr(module, "k_proj", None), getattr(module, "v_proj", None)
        if isinstance(k, torch.nn.Linear) and isinstance(v, torch.nn.Linear):
            pairs.append((k, v))
    if not pairs:
        raise ValueError("no attention module with k_proj/v_proj Linear layers found to simulate XQuant on")
    return pairs


@contextlib.contextmanager
def simulate_xquant(model: torch.nn.Module, config: XQuantConfig) -> Iterator[None]:
    """Within the block, every k_proj/v_proj of ``model`` sees X̂ instead of X."""
    hook = lambda module, args: (simulated_x(args[0], config), *args[1:])  # noqa: E731
    handles = [proj.register_forward_pre_hook(hook) for pair in _kv_projections(model) for proj in pair]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
