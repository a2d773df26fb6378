"""Which rows of a fused q/k/v projection compute the keys, and which the values.

Some models project q, k and v with one Linear. Its K (V) rows are one block (Phi-3's ``qkv_proj``,
gpt-fast's ``wqkv``: rows [q | k | v]) or one block in every head (GPT-NeoX's ``query_key_value``: rows
[q_0; k_0; v_0; q_1; k_1; v_1; ...]). The rewrite rebuilds K and V from those rows only, the latent
form factors them, and the torch reference (:mod:`xq_compile.simulate`) feeds them X̂.

GPT-2's ``c_attn`` (transformers' ``Conv1D``) stores its weight transposed, [in, out]: its "rows" are
the stored weight's columns, and :meth:`FusedRows.of_weight` reads them as [out, in] rows like a Linear's.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class FusedRows:
    """Rows [start, stop) of a fused projection, or with ``period``, rows [start, stop) of every block of
    ``period`` rows (GPT-NeoX: period 3·head_dim, the keys at [head_dim, 2·head_dim))."""

    start: int
    stop: int
    period: int | None = None
    weight_transposed: bool = False  # the weight is stored [in, out] (Conv1D), its bias [out] as usual

    def of_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """These rows of the projection's weight as it is stored, in order, as [rows, in]."""
        return self.of(weight.t() if self.weight_transposed else weight)

    def of(self, t: torch.Tensor) -> torch.Tensor:
        """These rows of ``t`` [rows, ...] (a bias, a Linear's weight), in order."""
        if self.period is None:
            return t.narrow(0, self.start, self.stop - self.start)
        return t.unflatten(0, (-1, self.period)).narrow(1, self.start, self.stop - self.start).flatten(0, 1)

    def put(self, out: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """``out`` [..., rows] (the fused projection's output) with these rows' channels replaced by ``values``."""
        return out.index_copy(-1, self.of(torch.arange(out.shape[-1], device=out.device)), values)

    def count(self, total: int) -> int:
        return (self.stop - self.start) * (total // self.period if self.period else 1)

    def __str__(self) -> str:
        return (f"{self.start}_{self.stop}" + (f"_of_{self.period}" if self.period else "")
                + ("_t" if self.weight_transposed else ""))
