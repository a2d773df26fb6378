"""Block-Hadamard rotation of X, folded into the K/V weights.

Caching Q(X·R) and rebuilding K = (X̂R)(W·R)ᵀ equals X̂·Wᵀ for an orthogonal R, so the rotation is
free at rebuild time; it only spreads X's outlier channels across each quantization group.
R = blockdiag(H, ..., H) with H the normalized Sylvester Hadamard matrix of size group_size.
"""

from __future__ import annotations

import math

import torch

from ._torch_private import version_counter, weak_tensor_map
from .fused_rows import FusedRows


def hadamard(n: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """Orthonormal, symmetric n×n Hadamard matrix (n a power of two)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(n)).to(dtype=dtype, device=device)


def rotate(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """x·blockdiag(h, ..., h) over the last dimension (traceable: used inside the rewritten graph)."""
    return (x.unflatten(-1, (-1, h.shape[0])) @ h.to(x.dtype)).flatten(-2)


def fold_into_weight(weight: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """W·R for a Linear weight W [out, in]: the weight that maps rotated inputs to the same outputs."""
    folded = weight.detach().float().unflatten(1, (-1, h.shape[0])) @ h.to(weight.device, torch.float32)
    return folded.flatten(1).to(weight.dtype)


class FoldedWeights:
    """W·R computed once per weight tensor (and rows) and recomputed only if the weight is modified in place.

    Keyed weakly on the weight tensor itself, so the copy dies with the model; the tensor's
    ``_version`` counter (bumped by every in-place write) tells when it went stale.
    """

    def __init__(self) -> None:
        self._folded = weak_tensor_map()

    def get(self, weight: torch.Tensor, h: torch.Tensor, rows: FusedRows | None = None) -> torch.Tensor:
        """W·R of ``rows.of_weight(weight)`` (all of ``weight`` if None: a Linear's [out, in])."""
        per_weight = self._folded.setdefault(weight, {})
        entry = per_weight.get(rows)
        if entry is None or entry[0] != version_counter(weight) or entry[1] != h.shape[0]:
            entry = (version_counter(weight), h.shape[0],
                     fold_into_weight(weight if rows is None else rows.of_weight(weight), h))
            per_weight[rows] = entry
        return entry[2]


FOLDED_WEIGHTS = FoldedWeights()


def rotation_of(xquant, device: torch.device | str | None = None) -> torch.Tensor | None:
    """The block-Hadamard matrix an ``XQuantConfig`` rotates X by (fp32, on ``device``), or None."""
    return hadamard(xquant.group_size, device=device) if xquant.rotation == "hadamard" else None
