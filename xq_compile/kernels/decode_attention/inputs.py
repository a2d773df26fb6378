"""The op's inputs on the Python side: :class:`QuantizedSource` (one quantized row source) and
:class:`DecodeAttentionInputs` (everything one call takes), with their checks.

The custom op's schema is flat (torch.library ops take tensors and scalars, not objects); every Python
function behind it -- the reference, the launch configuration, the Triton launcher -- takes these types,
built once from the op's arguments by :meth:`DecodeAttentionInputs.from_op_args`.

The checks read shapes, dtypes and devices only, never tensor data: no host sync.

Paged sources (``block_table`` given, vLLM's layout): the per-token sources are ``[pages, page_size, ...]``
instead of ``[B, L, ...]`` and row ``j`` of batch row ``b`` is row ``j % page_size`` of page
``block_table[b, j // page_size]``; the capacity is ``L = max_blocks · page_size``. Everything indexed
by position (cos/sin, positions, mask) stays ``[B, L, ...]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from xq_compile import quant

LAYOUTS = ("per_token", "per_channel")


@dataclass(frozen=True)
class QuantizedSource:
    """Rows of one quantized cache operand (the key source, or a separate value source).

    * ``per_token``: ``packed`` uint8 [B, L, packed_width(C, bits)], ``scale``/``zero`` fp16
      [B, L, C // group] -- exactly the format of :mod:`xq_compile.quant`; ``tail`` is None.
    * ``per_channel`` (KIVI-style, GQA key latents): codes packed the same way per row, ``scale``/``zero``
      fp16 [B, ceil(L / group), C] per channel for groups of ``group`` *tokens*. Only rows
      j < n_full = (n // group)·group come from the codes; rows n_full <= j < n are read in the model
      dtype from ``tail`` [B, group, C] at tail[b, j % group] (the not yet quantized residual group).
    """

    packed: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    tail: Optional[torch.Tensor]
    bits: int
    group: int
    layout: str

    def check(self, name: str, batch: int, max_len: int, width: int, dtype: torch.dtype,
              device: torch.device, paged: bool = False) -> None:
        """Raise ValueError unless this is a ``width``-channel source of ``max_len`` rows (``name``: the
        op's argument prefix, ``k`` or ``v``, so the message names the argument to fix). ``paged``:
        ``batch`` pages of ``max_len`` rows each, per token only."""
        packed, scale, zero, tail, group, layout = self.packed, self.scale, self.zero, self.tail, self.group, self.layout
        if layout not in LAYOUTS:
            raise ValueError(f"{name}_layout={layout!r}; supported: {LAYOUTS}")
        if paged and layout != "per_token":
            raise ValueError(f"{name}_layout={layout!r} with a block_table: paged sources hold whole rows, one per "
                             "token (per_token); a per_channel source needs its dense [B, L, ...] form")
        if packed.dim() != 3 or packed.dtype != torch.uint8:
            raise ValueError(f"{name}_packed must be uint8 [B, L, P], got {packed.dtype} {tuple(packed.shape)}")
        expected = quant.packed_width(width, self.bits)  # also rejects unsupported bit widths
        if tuple(packed.shape) != (batch, max_len, expected):
            lead = f"pages={batch}, page_size={max_len}" if paged else f"B={batch}, L={max_len}"
            raise ValueError(
                f"{name}_packed must be [{lead}, {expected}] ({self.bits}-bit codes of C={width}), "
                f"got {tuple(packed.shape)}"
            )
        if group < 1:
            raise ValueError(f"{name}_group={group} must be >= 1")
        if layout == "per_token":
            if width % group:
                raise ValueError(f"{name}_group={group} does not divide the width {width} of the {name} source")
            sz_shape = (batch, max_len, width // group)
            if tail is not None:
                raise ValueError(f"{name}_tail is only for the per_channel layout")
        else:
            sz_shape = (batch, -(-max_len // group), width)
            if tail is None:
                raise ValueError(f"the per_channel {name} source needs {name}_tail [B, group, C]")
            if tuple(tail.shape) != (batch, group, width) or tail.dtype != dtype:
                raise ValueError(
                    f"{name}_tail must be {dtype} {(batch, group, width)}, got {tail.dtype} {tuple(tail.shape)}"
                )
        for part, t in (("scale", scale), ("zero", zero)):
            if tuple(t.shape) != sz_shape or t.dtype != quant.SCALE_DTYPE:
                where = "paged: [pages, page_size, groups]" if paged else layout
                raise ValueError(
                    f"{name}_{part} must be {quant.SCALE_DTYPE} {sz_shape} ({where}), got {t.dtype} {tuple(t.shape)}"
                )
        for part, t in (("packed", packed), ("scale", scale), ("zero", zero), ("tail", tail)):
            if t is not None and t.device != device:
                raise ValueError(f"{name}_{part} is on {t.device} but query is on {device}")


class Shapes(NamedTuple):
    batch: int
    q_heads: int
    seq: int
    head_dim: int
    kv_heads: int
    max_len: int
    k_width: int
    v_width: int


@dataclass(frozen=True)
class DecodeAttentionInputs:
    """One call of ``xq_compile::decode_attention`` (see the package docstring for the semantics).

    ``values`` None: the value rows are the key-source rows (the MHA X cache). ``col0`` fp16 [B, L]
    (optional): channel 0 of the dequantized key-source rows is replaced by col0[b, j]; with a shared
    source the value rows get it too."""

    query: torch.Tensor
    keys: QuantizedSource
    values: Optional[QuantizedSource]
    col0: Optional[torch.Tensor]
    k_weight: torch.Tensor
    k_bias: Optional[torch.Tensor]
    v_weight: torch.Tensor
    v_bias: Optional[torch.Tensor]
    cos: Optional[torch.Tensor]
    sin: Optional[torch.Tensor]
    mask: Optional[torch.Tensor]
    length: torch.Tensor
    sm_scale: float
    positions: Optional[torch.Tensor] = None
    rope_inv_freq: Optional[torch.Tensor] = None
    rope_scale: float = 1.0
    block_table: Optional[torch.Tensor] = None
    window: int = 0
    soft_cap: float = 0.0
    k_norm_weight: Optional[torch.Tensor] = None
    k_norm_eps: float = 1e-6

    @property
    def paged(self) -> bool:
        """Whether the per-token sources (and col0) are pages read through ``block_table``."""
        return self.block_table is not None

    @property
    def rope_from_positions(self) -> bool:
        """Whether RoPE is HF's default rotary embedding computed from ``positions`` (else: the tables)."""
        return self.positions is not None

    def first_row(self, n: int, seq: int) -> int:
        """The first of the ``n`` rows some query token sees through the window (0 without one): the first
        token, at row n - seq, sees the ``window - 1`` rows before its own."""
        return max(n - seq + 1 - self.window, 0) if self.window else 0

    @classmethod
    def from_op_args(
        cls, query, k_packed, k_scale, k_zero, k_tail, v_packed, v_scale, v_zero, v_tail, col0,
        k_weight, k_bias, v_weight, v_bias, cos, sin, mask, length, k_bits, k_group, k_layout,
        v_bits, v_group, v_layout, sm_scale, positions=None, rope_inv_freq=None, rope_scale=1.0, block_table=None,
        window=0, soft_cap=0.0, k_norm_weight=None, k_norm_eps=1e-6,
    ) -> "DecodeAttentionInputs":
        """From the op's flat arguments, in schema order (positional or by name)."""
        if v_packed is None:
            if v_scale is not None or v_zero is not None or v_tail is not None:
                raise ValueError("v_scale/v_zero/v_tail given without v_packed")
            values = None
        else:
            if v_scale is None or v_zero is None:
                raise ValueError("v_packed needs v_scale and v_zero")
            values = QuantizedSource(v_packed, v_scale, v_zero, v_tail, v_bits, v_group, v_layout)
        return cls(query, QuantizedSource(k_packed, k_scale, k_zero, k_tail, k_bits, k_group, k_layout), values,
                   col0, k_weight, k_bias, v_weight, v_bias, cos, sin, mask, length, sm_scale, positions,
                   rope_inv_freq, rope_scale, block_table, window, soft_cap, k_norm_weight, k_norm_eps)

    @property
    def value_source(self) -> QuantizedSource:
        """The source of the value rows: ``values``, or the key source when they share it."""
        return self.keys if self.values is None else self.values

    def check(self) -> Shapes:
        """Raise ValueError unless the inputs fit together; return their sizes."""
        query, k_weight, v_weight = self.query, self.k_weight, self.v_weight
        if query.dim() != 4 or not query.dtype.is_floating_point:
            raise ValueError(f"query must be a floating [B, Hq, S, D] tensor, got {query.dtype} {tuple(query.shape)}")
        batch, q_heads, seq, head_dim = query.shape
        dtype, device = k_weight.dtype, query.device
        if query.dtype != dtype:
            raise ValueError(f"query is {query.dtype} but the weights are {dtype}")
        if head_dim % 2:
            raise ValueError(f"head_dim={head_dim} must be even (RoPE rotates halves)")
        for name, w in (("k_weight", k_weight), ("v_weight", v_weight)):
            if w.dim() != 2 or w.dtype != dtype or w.shape[0] % head_dim or w.shape[0] == 0:
                raise ValueError(f"{name} must be {dtype} [Hkv·D, C] with D={head_dim}, got {w.dtype} {tuple(w.shape)}")
        kv_heads = k_weight.shape[0] // head_dim
        if v_weight.shape[0] != k_weight.shape[0]:
            raise ValueError(f"v_weight has {v_weight.shape[0]} output features, k_weight {k_weight.shape[0]}")
        if q_heads % kv_heads:
            raise ValueError(f"{q_heads} query heads are not a multiple of the {kv_heads} KV heads")
        for name, bias in (("k_bias", self.k_bias), ("v_bias", self.v_bias)):
            if bias is not None and (tuple(bias.shape) != (kv_heads * head_dim,) or bias.dtype != dtype):
                raise ValueError(f"{name} must be {dtype} [{kv_heads * head_dim}], got {bias.dtype} {tuple(bias.shape)}")
        if self.keys.packed.dim() != 3:
            raise ValueError(f"k_packed must be uint8 [B, L, P], got {tuple(self.keys.packed.shape)}")
        # the sources' leading dimensions: [B, L] dense, [pages, page_size] paged
        rows_of = (self.keys.packed.shape[0], self.keys.packed.shape[1]) if self.paged else None
        max_len = self._check_block_table(batch, device) if self.paged else self.keys.packed.shape[1]
        lead = rows_of or (batch, max_len)
        k_width, v_width = k_weight.shape[1], v_weight.shape[1]
        self.keys.check("k", *lead, k_width, dtype, device, self.paged)
        if self.values is None:
            if v_width != k_width:
                raise ValueError(f"shared source: v_weight reads C={v_width} channels but the rows have {k_width}")
        else:
            self.values.check("v", *lead, v_width, dtype, device, self.paged)
        col0 = self.col0
        if col0 is not None and (tuple(col0.shape) != lead or col0.dtype != quant.SCALE_DTYPE):
            paged = " (paged like the codes)" if self.paged else ""
            raise ValueError(f"col0 must be {quant.SCALE_DTYPE} {lead}{paged}, got {col0.dtype} {tuple(col0.shape)}")
        self._check_rope(batch, max_len, head_dim, dtype)
        self._check_window_cap_norm(head_dim)
        mask = self.mask
        if mask is not None:
            ok = (
                mask.dim() == 4
                and mask.shape[0] in (1, batch)
                and mask.shape[1] in (1, q_heads)
                and mask.shape[2] == seq
                and mask.shape[3] == max_len
                and (mask.dtype == torch.bool or mask.dtype.is_floating_point)
            )
            if not ok:
                raise ValueError(
                    f"mask must be bool or floating [B or 1, 1 or Hq, S, L] = [{batch}|1, 1|{q_heads}, {seq}, {max_len}], "
                    f"got {mask.dtype} {tuple(mask.shape)}"
                )
        length = self.length
        if (length.numel() != 1 and tuple(length.shape) != (batch,)) or length.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"length must be an int32/int64 tensor of 1 element (one fill for every batch row) or "
                             f"[B={batch}] (a fill per row, e.g. vLLM's seq_lens), got {length.dtype} "
                             f"{tuple(length.shape)}")
        for name, t in (("k_weight", k_weight), ("v_weight", v_weight), ("k_bias", self.k_bias),
                        ("v_bias", self.v_bias), ("col0", col0), ("cos", self.cos), ("sin", self.sin),
                        ("mask", mask), ("length", length), ("positions", self.positions),
                        ("rope_inv_freq", self.rope_inv_freq), ("block_table", self.block_table),
                        ("k_norm_weight", self.k_norm_weight)):
            if t is not None and t.device != device:
                raise ValueError(f"{name} is on {t.device} but query is on {device}")
        return Shapes(batch, q_heads, seq, head_dim, kv_heads, max_len, k_width, v_width)

    def _check_window_cap_norm(self, head_dim: int) -> None:
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 0:
            raise ValueError(f"window={self.window!r} must be an int >= 0 (the rows a query token sees, itself "
                             "included; 0: no window)")
        if not (self.soft_cap >= 0.0 and self.soft_cap != float("inf")):
            raise ValueError(f"soft_cap={self.soft_cap!r} must be finite and >= 0 (Gemma 2's attention-logit cap; "
                             "0: none)")
        weight = self.k_norm_weight
        if weight is not None and (tuple(weight.shape) != (head_dim,) or weight.dtype != torch.float32):
            raise ValueError(f"k_norm_weight must be float32 [{head_dim}] (the keys' per-head RMSNorm weight as it "
                             f"multiplies: Gemma's 1 + w), got {weight.dtype} {tuple(weight.shape)}")
        if not self.k_norm_eps > 0.0:
            raise ValueError(f"k_norm_eps={self.k_norm_eps!r} must be > 0")

    def _check_block_table(self, batch: int, device: torch.device) -> int:
        """The capacity L = max_blocks · page_size of a paged call, once its block table is checked."""
        table = self.block_table
        if table.dim() != 2 or table.shape[0] != batch or table.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"block_table must be int32/int64 [B={batch}, max_blocks] (the pages of each batch "
                             f"row, in order), got {table.dtype} {tuple(table.shape)}")
        if table.device != device:
            raise ValueError(f"block_table is on {table.device} but query is on {device}")
        return table.shape[1] * self.keys.packed.shape[1]

    def _check_rope(self, batch: int, max_len: int, head_dim: int, dtype: torch.dtype) -> None:
        """Either the cos/sin tables, or positions and inv_freq (HF's default RoPE, computed in the kernel)."""
        tables = (self.cos is not None, self.sin is not None)
        computed = (self.positions is not None, self.rope_inv_freq is not None)
        if tables != (True, True) and computed != (True, True) or any(tables) and any(computed):
            raise ValueError("RoPE: give either cos and sin (tables [B, L, D]) or positions and rope_inv_freq "
                             "(HF's default rotary embedding, computed in the kernel), not a mix")
        if any(tables):
            for name, t in (("cos", self.cos), ("sin", self.sin)):
                if tuple(t.shape) != (batch, max_len, head_dim) or t.dtype != dtype:
                    raise ValueError(f"{name} must be {dtype} {(batch, max_len, head_dim)}, got {t.dtype} {tuple(t.shape)}")
            return
        pos, freq = self.positions, self.rope_inv_freq
        if tuple(pos.shape) != (batch, max_len) or pos.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"positions must be int32/int64 [B={batch}, L={max_len}] (the cached rows' position "
                             f"ids), got {pos.dtype} {tuple(pos.shape)}")
        if tuple(freq.shape) != (head_dim // 2,) or freq.dtype != torch.float32:
            raise ValueError(f"rope_inv_freq must be float32 [{head_dim // 2}] (HF's inv_freq), got {freq.dtype} "
                             f"{tuple(freq.shape)}")
