"""Tests of ``xq_compile::decode_attention``.

  (a) the op's CPU kernel (the torch reference) against an independent formulation: dequantize with
      xq_compile.quant, build the full K (F.linear, HF's apply_rotary_pos_emb) and V = X̂·Wvᵀ + bv,
      repeat_kv, F.scaled_dot_product_attention with the mask, all in float64;
  (b) the Triton kernels under the Triton interpreter (subprocess with TRITON_INTERPRET=1, see
      tests/test_kernels.py for why) against the CPU reference, with small blocks so that every path
      is taken: several splits (some empty), ragged row blocks, several channel blocks;
  (c) on a GPU (skipped without CUDA): the compiled kernels against the reference, in bf16 and
      captured in a CUDA graph replayed with a changing length:
          pytest tests/test_decode_attention.py -k cuda
      (XQ_CUDA_TEST_DEVICE=cpu dry-runs those tests' own code on CPU, against the reference itself).

Inputs: random codes over the whole code range; every cache entry past the fill n is poisoned (inf
scale, NaN zero/tail/col0/cos/mask) so reading one shows up as a NaN. Per-channel sources poison the
scale of the partly filled token group too: those rows must come from the tail.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from xq_compile import quant
from xq_compile.kernels import decode_attention as da

ROOT = Path(__file__).resolve().parents[1]
OP = torch.ops.xq_compile.decode_attention.default
HAS_TRITON = importlib.util.find_spec("triton") is not None
CUDA_DEVICE = os.environ.get("XQ_CUDA_TEST_DEVICE", "cuda")


# --------------------------------------------------------------------------------------------------
# Cases and inputs
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    B: int = 2
    Hq: int = 2
    Hkv: int = 2
    S: int = 1
    D: int = 32
    L: int = 40
    n: int = 23
    C: int = 64            # key-source width (and value-source width unless Cv)
    Cv: int | None = None  # None: shared source (MHA X); else a separate value source of this width
    k_bits: int = 4
    k_layout: str = "per_token"
    k_group: int = 16
    v_bits: int = 4
    v_layout: str = "per_token"
    v_group: int = 16
    col0: bool = False
    bias: bool = True
    mask: str | None = None   # None, "bool", "float"
    mask_shape: str = "B1"    # "B1": [B, 1, S, L]; "1H": [1, Hq, S, L]
    dtype: torch.dtype = torch.float32
    rope: str = "tables"      # "tables": cos/sin given; "positions": computed in the kernel (HF default RoPE)
    pos_offset: int = 0       # first position id (large: the in-kernel angle reduction is exercised)
    window: int = 0           # sliding window (0: none); the rows no query token sees are poisoned
    soft_cap: float = 0.0     # attention-logit soft cap (0: none)
    k_norm: bool = False      # the keys' per-head RMSNorm before RoPE
    seed: int = 0

    @property
    def first_seen(self) -> int:
        """The first row some query token sees through the window (the rows before it are poisoned)."""
        return max(self.n - self.S + 1 - self.window, 0) if self.window else 0

    def __str__(self):
        v = "shared" if self.Cv is None else f"v{self.v_bits}{self.v_layout[4]}{self.v_group}_Cv{self.Cv}"
        return (f"B{self.B}_Hq{self.Hq}_Hkv{self.Hkv}_S{self.S}_D{self.D}_L{self.L}_n{self.n}_C{self.C}_"
                f"k{self.k_bits}{self.k_layout[4]}{self.k_group}_{v}{'_col0' if self.col0 else ''}"
                f"{'' if self.bias else '_nobias'}_{self.mask}{self.mask_shape if self.mask else ''}_"
                f"{str(self.dtype)[6:]}{'' if self.rope == 'tables' else f'_pos{self.pos_offset}'}"
                f"{f'_win{self.window}' if self.window else ''}{f'_cap{self.soft_cap}' if self.soft_cap else ''}"
                f"{'_knorm' if self.k_norm else ''}")


def _source(g, B, L, C, bits, layout, group, n, dtype, lo=0):
    qmax = (1 << bits) - 1
    codes = torch.randint(0, qmax + 1, (B, L, C), generator=g, dtype=torch.uint8)
    packed = quant.pack(codes, bits)
    rows = L if layout == "per_token" else -(-L // group)
    shape = (B, rows, C // group) if layout == "per_token" else (B, rows, C)
    # x_hat spans about [-1, 3] whatever the width; distinct scales per group catch a wrong group index
    scale = ((0.5 + torch.rand(shape, generator=g)) * 2 / qmax).to(torch.float16)
    zero = (torch.rand(shape, generator=g) * 2 - 1).to(torch.float16)
    tail = None
    if layout == "per_token":
        scale[:, n:] = float("inf")
        zero[:, n:] = float("nan")
        scale[:, :lo] = float("inf")  # behind every query token's window
        zero[:, :lo] = float("nan")
    else:
        scale[:, : lo // group] = float("inf")  # token groups wholly behind every window
        zero[:, : lo // group] = float("nan")
        n_full = n // group * group
        scale[:, n_full // group:] = float("inf")  # the partial group: its rows come from the tail
        zero[:, n_full // group:] = float("nan")
        tail = (torch.rand(B, group, C, generator=g) * 4 - 1).to(dtype)
        tail[:, n - n_full:] = float("nan")
    return packed, scale, zero, tail


def rope_tables(B, L, D, dtype, offset=0):
    """HF-style cos/sin [B, L, D] (positions shifted per batch row), second half perturbed."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    pos = torch.arange(L, dtype=torch.float64)[None] + 3 * torch.arange(B, dtype=torch.float64)[:, None] + offset
    freqs = pos[..., None] * inv_freq
    # HF tables repeat the frequencies in both halves; a different second half (an arbitrary table, as
    # the op allows) makes a kernel that reads the wrong half fail.
    emb = torch.cat([freqs, freqs * 1.3 + 0.2], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def make_inputs(case: Case) -> dict:
    """The op's arguments as a dict (in schema order)."""
    c = case
    g = torch.Generator().manual_seed(c.seed)
    dtype = c.dtype
    lo = c.first_seen
    kp, ks, kz, kt = _source(g, c.B, c.L, c.C, c.k_bits, c.k_layout, c.k_group, c.n, dtype, lo)
    if c.Cv is None:
        vp = vs = vz = vt = None
        cv = c.C
    else:
        vp, vs, vz, vt = _source(g, c.B, c.L, c.Cv, c.v_bits, c.v_layout, c.v_group, c.n, dtype, lo)
        cv = c.Cv
    col0 = None
    if c.col0:
        col0 = (torch.randn(c.B, c.L, generator=g) * 4).to(torch.float16)  # outside the codes' range
        col0[:, c.n:] = float("nan")
        col0[:, :lo] = float("nan")
    N = c.Hkv * c.D
    wk = (torch.randn(N, c.C, generator=g) / math.sqrt(c.C)).to(dtype)
    wv = (torch.randn(N, cv, generator=g) / math.sqrt(cv)).to(dtype)
    bk = torch.randn(N, generator=g).to(dtype) if c.bias else None
    bv = torch.randn(N, generator=g).to(dtype) if c.bias else None
    rope = dict(positions=None, rope_inv_freq=None, rope_scale=1.0)
    if c.rope == "tables":
        cos, sin = rope_tables(c.B, c.L, c.D, dtype)
        cos[:, c.n:] = float("nan")
        sin[:, c.n:] = float("nan")
        cos[:, :lo] = float("nan")
        sin[:, :lo] = float("nan")
    else:
        cos = sin = None
        # positions shifted per batch row (left padding), rows past n a wild value; Llama-3-style
        # non-uniform frequencies and an attention scaling != 1
        pos = torch.arange(c.L)[None] + 3 * torch.arange(c.B)[:, None] + c.pos_offset
        pos[:, c.n:] = 2**40
        pos[:, :lo] = 2**40
        inv_freq = (1.0 / (500000 ** (torch.arange(0, c.D, 2, dtype=torch.float32) / c.D)))
        inv_freq[c.D // 4:] /= 8
        rope = dict(positions=pos, rope_inv_freq=inv_freq, rope_scale=0.9)
    q = (torch.randn(c.B, c.Hq, c.S, c.D, generator=g) * 1.5).to(dtype)
    mask = None
    if c.mask is not None:
        shape = (c.B, 1, c.S, c.L) if c.mask_shape == "B1" else (1, c.Hq, c.S, c.L)
        keep = torch.rand(shape, generator=g) < 0.75
        keep[..., 0, 0] = True  # each row attends somewhere ...
        keep[0, 0, -1, :] = False  # ... except one fully masked row (a left-padded query)
        if c.mask == "bool":
            mask = keep
        else:
            add = (torch.rand(shape, generator=g) - 0.5).to(dtype)  # a genuinely additive part too
            mask = torch.where(keep, add, torch.tensor(float("-inf"), dtype=dtype))
            mask[..., c.n:] = float("nan")
            mask[..., :lo] = float("nan")
    extras = {}
    if c.window or c.soft_cap or c.k_norm:
        extras = dict(window=c.window, soft_cap=c.soft_cap, k_norm_eps=1e-5,
                      k_norm_weight=(0.5 + torch.rand(c.D, generator=g)) if c.k_norm else None)
    return dict(
        query=q, k_packed=kp, k_scale=ks, k_zero=kz, k_tail=kt, v_packed=vp, v_scale=vs, v_zero=vz, v_tail=vt,
        col0=col0, k_weight=wk, k_bias=bk, v_weight=wv, v_bias=bv, cos=cos, sin=sin, mask=mask,
        length=torch.tensor(c.n), k_bits=c.k_bits, k_group=c.k_group, k_layout=c.k_layout,
        v_bits=c.v_bits, v_group=c.v_group, v_layout=c.v_layout, sm_scale=c.D ** -0.5, **rope, **extras,
    )


def inputs(a: dict) -> da.DecodeAttentionInputs:
    """The op's arguments (a dict in schema order) as the launcher and the reference take them."""
    return da.DecodeAttentionInputs.from_op_args(**a)


def _independent_rows(packed, scale, zero, tail, n, bits, group, layout):
    """float64 rows [B, n, C] straight from quant (per_channel: scale gathered per token)."""
    if layout == "per_token":
        return quant.dequantize(packed[:, :n], scale[:, :n], zero[:, :n], bits, group, dtype=torch.float64)
    n_full = n // group * group
    token_group = torch.arange(n_full) // group
    codes = quant.unpack(packed[:, :n_full], bits).double()
    x = codes * scale[:, token_group].double() + zero[:, token_group].double()
    return torch.cat([x, tail[:, : n - n_full].double()], dim=1)


def independent(a: dict) -> torch.Tensor:
    """float64 SDPA over the fully rebuilt, RoPE'd K and V = X̂·Wvᵀ + bv (repeat_kv), [B, Hq, S, D]; with a
    window, a soft cap or a key norm (HF's formulas: Gemma 2's ``tanh`` cap, ``sliding_window_overlay``'s
    q - kv < window), the attention written out over the rows some query token sees."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

    q = a["query"]
    B, Hq, S, D = q.shape
    n = int(a["length"])
    Hkv = a["k_weight"].shape[0] // D
    dt = a["k_weight"].dtype
    # X̂ rounded to the model dtype first: that is what the cache's dequantization gives the model
    xk = _independent_rows(a["k_packed"], a["k_scale"], a["k_zero"], a["k_tail"], n, a["k_bits"], a["k_group"],
                           a["k_layout"]).to(dt).double()
    if a["col0"] is not None:
        xk[..., 0] = a["col0"][:, :n].to(dt).double()
    if a["v_packed"] is None:
        xv = xk
    else:
        xv = _independent_rows(a["v_packed"], a["v_scale"], a["v_zero"], a["v_tail"], n, a["v_bits"],
                               a["v_group"], a["v_layout"]).to(dt).double()
    f64 = lambda t: None if t is None else t.double()  # noqa: E731
    k = F.linear(xk, f64(a["k_weight"]), f64(a["k_bias"])).view(B, n, Hkv, D).transpose(1, 2)
    if a.get("k_norm_weight") is not None:  # HF's Qwen3RMSNorm over each head's features, in float64
        k = k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + a["k_norm_eps"]) * a["k_norm_weight"].double()
    v = F.linear(xv, f64(a["v_weight"]), f64(a["v_bias"])).view(B, n, Hkv, D).transpose(1, 2)
    cos, sin = a["cos"], a["sin"]
    if a["positions"] is not None:  # transformers' default rotary embedding (fp32 angles, both halves)
        angles = a["positions"].float()[..., None] * a["rope_inv_freq"]
        emb = torch.cat([angles, angles], dim=-1)
        cos, sin = (emb.cos() * a["rope_scale"]).to(dt), (emb.sin() * a["rope_scale"]).to(dt)
    _, k = apply_rotary_pos_emb(k, k, cos[:, :n].double(), sin[:, :n].double())
    k, v = repeat_kv(k, Hq // Hkv), repeat_kv(v, Hq // Hkv)
    mask = a["mask"]
    if mask is not None:
        mask = mask[..., :n] if mask.dtype == torch.bool else mask[..., :n].double()
    window, cap = a.get("window", 0), a.get("soft_cap", 0.0)
    if not window and not cap:
        return F.scaled_dot_product_attention(q.double(), k, v, attn_mask=mask, scale=a["sm_scale"])
    # query token s sits at row n - S + s; the rows before the first one seen hold poison: cut away
    lo = max(n - S + 1 - window, 0) if window else 0
    k, v = k[:, :, lo:], v[:, :, lo:]
    scores = q.double() @ k.transpose(-1, -2) * a["sm_scale"]
    if cap:
        scores = cap * torch.tanh(scores / cap)
    if mask is not None:
        mask = mask[..., lo:]
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    if window:
        query_row = n - S + torch.arange(S)
        scores = scores.masked_fill(query_row[:, None] - torch.arange(lo, n)[None, :] >= window, float("-inf"))
    return torch.softmax(scores, -1).nan_to_num(0.0) @ v  # a row that sees nothing: 0, as SDPA gives


def tolerance(dtype) -> dict:
    return dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)


def check_close(out, expected, dtype, what):
    assert torch.isfinite(out).all(), f"{what}: non-finite output"
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(out.double() / scale, expected.double() / scale, **tolerance(dtype), msg=lambda m: f"{what}: {m}")


def fully_masked_rows(a: dict) -> torch.Tensor | None:
    """Bool [B, Hq, S]: query rows that attend to nothing among the n rows."""
    if a["mask"] is None:
        return None
    B, Hq, S, _ = a["query"].shape
    n = int(a["length"])
    m = a["mask"].expand(B, Hq, S, -1)[..., :n]
    attend = m if m.dtype == torch.bool else m > float("-inf")
    if a.get("window"):
        attend = attend & ((n - S + torch.arange(S))[:, None] - torch.arange(n)[None, :] < a["window"])
    return ~attend.any(-1)


# --------------------------------------------------------------------------------------------------
# The case list (shared by the CPU-reference tests and the interpreter subprocesses).
# --------------------------------------------------------------------------------------------------

GQA = dict(Hq=6, Hkv=2, D=32, C=64, Cv=64, k_layout="per_channel", k_group=16, v_layout="per_token", v_group=16)
CASES = [
    # MHA X cache (shared source, Hq = Hkv), ragged n, masks, S = 4
    Case(Hq=2, Hkv=2, C=64, n=23, k_bits=4),
    Case(Hq=3, Hkv=3, C=96, n=40, L=40, k_bits=3, k_group=32, S=4, mask="bool"),
    Case(Hq=2, Hkv=2, C=64, n=1, k_bits=2, mask="float", S=4, bias=False),
    Case(Hq=2, Hkv=2, C=80, D=40, n=37, k_bits=8, k_group=20, mask="bool", mask_shape="1H", col0=True),
    # GQA latents (group 3): per_channel keys with a tail (n not a multiple of the group, n < group,
    # n a multiple), per_token values of another width
    Case(**GQA, n=37, k_bits=2, v_bits=3, S=4, mask="float", mask_shape="1H"),
    Case(**GQA, n=7, k_bits=3, v_bits=4, col0=True),
    Case(**GQA, n=48, L=48, k_bits=4, v_bits=8, mask="bool", bias=False),
    Case(**{**GQA, "k_group": 8, "Cv": 96, "v_group": 32}, n=64, L=80, k_bits=8, v_bits=2, S=4, col0=True,
         mask="bool"),
    # per_channel value source too (and a per_token key source)
    Case(**{**GQA, "k_layout": "per_token", "v_layout": "per_channel", "v_group": 8}, n=29, k_bits=4, v_bits=4,
         S=2, mask="float"),
    # shared per_channel source (both K and V from one KIVI-style latent, tail included)
    Case(Hq=4, Hkv=2, C=64, n=27, k_bits=3, k_layout="per_channel", k_group=8, S=1, col0=True),
    # bf16 (model dtype) versions
    Case(Hq=3, Hkv=3, C=96, n=33, k_bits=4, k_group=32, S=4, mask="bool", dtype=torch.bfloat16),
    Case(**GQA, n=30, k_bits=2, v_bits=4, S=4, col0=True, mask="float", dtype=torch.bfloat16),
    Case(**GQA, n=48, L=48, k_bits=8, v_bits=3, bias=False, dtype=torch.bfloat16, mask="bool", mask_shape="1H"),
    # S = 16 with GQA group 3 (48 query rows per KV head), D = 64, groups not aligned with 3-bit words
    Case(B=1, Hq=3, Hkv=1, D=64, C=96, n=50, L=70, k_bits=3, k_group=12, S=16, mask="bool"),
    Case(B=2, Hq=6, Hkv=2, D=16, C=32, Cv=48, n=70, L=70, k_bits=2, k_layout="per_channel", k_group=32,
         v_bits=3, v_group=12, S=3, col0=True, mask="float", dtype=torch.bfloat16),
    # RoPE computed in the kernel from the positions (HF default RoPE): near 0 and at positions ~100K
    Case(Hq=2, Hkv=2, C=64, n=29, k_bits=4, S=2, mask="bool", rope="positions"),
    Case(**GQA, n=37, k_bits=4, v_bits=4, S=4, col0=True, mask="bool", rope="positions", pos_offset=100_000,
         dtype=torch.bfloat16),
    # Sliding windows (Mistral, Gemma 2/3's local layers): rows behind every window poisoned, so reading one
    # shows; whole row blocks behind it and a block cut by it. Soft caps (Gemma 2) and key norms (Qwen3,
    # Gemma 3) alone, and all three on GQA latents (per-channel keys) with S = 4 and a bool mask.
    Case(Hq=2, Hkv=2, C=64, n=37, L=48, k_bits=4, window=9, rope="positions"),
    Case(Hq=4, Hkv=2, C=64, n=40, L=48, k_bits=4, S=2, soft_cap=2.0, k_norm=True, mask="float"),
    Case(**GQA, n=45, L=48, k_bits=4, v_bits=4, S=4, mask="bool", window=7, soft_cap=1.5, k_norm=True,
         col0=True, dtype=torch.bfloat16),
    Case(Hq=3, Hkv=3, C=96, n=23, k_bits=3, k_group=32, S=4, window=64, mask="float", bias=False),
]
CASES = [replace(c, seed=i) for i, c in enumerate(CASES)]


# --------------------------------------------------------------------------------------------------
# (a) the CPU reference
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=str)
def test_reference_matches_sdpa(case):
    a = make_inputs(case)
    out = OP(**a)
    assert out.shape == a["query"].shape and out.dtype == a["query"].dtype
    check_close(out, independent(a), case.dtype, str(case))
    full = fully_masked_rows(a)
    if full is not None:
        assert full.any()
        assert (out[full] == 0).all(), "a fully masked query row must give 0"


def test_reference_n_zero_and_clamping():
    a = make_inputs(Case(n=0, L=16, k_group=16))
    assert (OP(**a) == 0).all()
    a = make_inputs(Case(n=16, L=16))
    expected = OP(**a)
    for length in (torch.tensor([99], dtype=torch.int32), torch.tensor(16)):
        torch.testing.assert_close(OP(**{**a, "length": length}), expected)


def test_opcheck():
    a = make_inputs(Case(**GQA, n=7, k_bits=3, v_bits=4, col0=True, mask="bool", L=24))
    torch.library.opcheck(OP, tuple(a.values()))


def test_rejects_bad_inputs():
    a = make_inputs(Case(**GQA, n=7, L=24))
    with pytest.raises(ValueError, match="k_tail"):
        OP(**{**a, "k_tail": None})
    with pytest.raises(ValueError, match="k_scale"):
        OP(**{**a, "k_layout": "per_token", "k_tail": None})
    with pytest.raises(ValueError, match="layout"):
        OP(**{**a, "v_layout": "per_row"})
    with pytest.raises(ValueError, match="query heads"):
        OP(**{**a, "query": a["query"][:, :5]})
    with pytest.raises(ValueError, match="mask"):
        OP(**{**a, "mask": torch.ones(2, 1, 1, 23, dtype=torch.bool)})
    with pytest.raises(ValueError, match="length"):  # neither one fill nor one per batch row (B = 2)
        OP(**{**a, "length": torch.tensor([1, 2, 3])})
    with pytest.raises(ValueError, match="bytes|packed"):
        OP(**{**a, "k_bits": 2})
    with pytest.raises(ValueError, match="either cos and sin"):  # tables and positions at once
        OP(**{**a, "positions": torch.zeros(2, 24, dtype=torch.long), "rope_inv_freq": torch.ones(16)})
    with pytest.raises(ValueError, match="either cos and sin"):
        OP(**{**a, "cos": None})
    with pytest.raises(ValueError, match="rope_inv_freq must be float32"):
        OP(**{**a, "cos": None, "sin": None, "positions": torch.zeros(2, 24, dtype=torch.long),
              "rope_inv_freq": torch.ones(16, dtype=torch.float64)})


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_launcher_rejects_bad_configs():
    """Checked before anything is launched (so on CPU tensors without the interpreter too)."""
    a = make_inputs(Case(n=7, L=24))
    with pytest.raises(TypeError, match="unknown decode_attention config.*block_q"):
        da.decode_attention_triton(inputs(a), block_q=16)
    with pytest.raises(ValueError, match="block_h=3"):
        da.decode_attention_triton(inputs(a), block_h=3)
    with pytest.raises(ValueError, match="block_nv=8"):
        da.decode_attention_triton(inputs(a), block_nv=8)
    with pytest.raises(ValueError, match="num_splits=0"):
        da.decode_attention_triton(inputs(a), num_splits=0)
    with pytest.raises(ValueError, match="x_as_b=2"):
        da.decode_attention_triton(inputs(a), x_as_b=2)


def test_config_overrides_configure_the_launches_inside_the_block():
    """config_overrides() is how a compiled model's launches (which pass no configuration) get one: every
    configuration resolved inside the block takes it, blocks stack, the launcher's own keywords win, and
    leaving the block restores the default; keys and values are checked on entry."""
    a = inputs(make_inputs(Case(n=7, L=24)))
    base = da.resolve_config(a)
    with da.config_overrides(num_splits=3, block_d=16):
        assert da.resolve_config(a)["num_splits"] == 3
        with da.config_overrides(num_splits=5):
            cfg = da.resolve_config(a)
            assert (cfg["num_splits"], cfg["block_d"]) == (5, 16)
        assert da.resolve_config(a, num_splits=7)["num_splits"] == 7
        assert da.resolve_config(a)["num_splits"] == 3
    assert da.resolve_config(a) == base
    with pytest.raises(TypeError, match="unknown decode_attention config.*block_q"):
        with da.config_overrides(block_q=16):
            pass
    for bad, message in (({"block_n": 48}, "block_n=48 must be a power of two"),
                         ({"gluon": "fast"}, "gluon='fast' must be 0"), ({"num_splits": 0}, "num_splits=0"),
                         ({"block_h": "2"}, "block_h='2' must be a power of two")):
        with pytest.raises(ValueError, match=message):
            with da.config_overrides(**bad):
                pass
    with da.config_overrides(block_n=None):  # None: the default
        assert da.resolve_config(a) == base


def test_default_config_shapes_the_tiles():
    """The rule of default_config on the benchmark shapes: K-rebuild tiles of up to 256 features by
    128 rows (2 heads of 128), head tiles that leave little empty (9 heads of 64: 2, not 4), the scale
    group as the channel step when smaller than 64, and value programs that cover the GPU about twice.
    Key sources under 16 channel steps (SmolLM2's 576 channels) take 64 x 64 tiles on one warpgroup
    on Hopper (the fastest on an H200), 128-row tiles elsewhere."""
    common = dict(batch=1, query_rows=1, max_len=32768, k_layout="per_token", v_layout="per_token",
                  dtype=torch.bfloat16, device=torch.device("cpu"))
    smol_shape = dict(kv_heads=9, head_dim=64, k_width=576, v_width=576, k_group=64, v_group=64, **common)
    smol = da.default_config(**smol_shape)
    assert (smol["block_n"], smol["block_h"], smol["block_c"], smol["num_warps"]) == (64, 1, 64, 4)
    assert smol["block_cv"] == 64  # inside one 64-channel scale group: broadcast scales
    ada = da.GpuTarget(capability=89, multiprocessors=58, shared_memory=99 * 1024)
    smol_ada = da.default_config(**smol_shape, target=ada)  # mma.sync: 128-feature tiles, whatever the loop
    assert (smol_ada["block_n"], smol_ada["block_h"], smol_ada["num_warps"]) == (128, 2, 8)
    long_loop = da.default_config(**{**smol_shape, "k_width": 1024})  # 16 steps: the long loops' tile
    assert (long_loop["block_n"], long_loop["block_h"], long_loop["num_warps"]) == (128, 2, 8)
    big = da.default_config(kv_heads=32, head_dim=128, k_width=4096, v_width=4096, k_group=128, v_group=128,
                            **common)
    assert (big["block_n"], big["block_h"], big["block_cv"], big["block_m"]) == (128, 2, 128, 32)
    assert big["num_splits"] * 32 >= 2 * 8  # 32 value-channel blocks x splits >= 2 x the (CPU) 8 "SMs"
    latent = da.default_config(kv_heads=8, head_dim=128, k_width=1024, v_width=1024, k_group=128, v_group=128,
                               **{**common, "k_layout": "per_channel", "v_layout": "per_channel"})
    assert (latent["block_n"], latent["block_h"], latent["num_warps"]) == (128, 2, 8)
    three = da.default_config(kv_heads=3, head_dim=64, k_width=2048, v_width=192, k_group=32, v_group=32, **common)
    assert three["block_h"] == 1 and three["block_c"] == 32  # 4 or 2 heads per tile would leave 1 of 4 empty
    eight = da.default_config(kv_heads=8, head_dim=64, k_width=2048, v_width=512, k_group=64, v_group=64, **common)
    assert eight["block_h"] == 4  # 256 features, no empty slot
    fp32 = da.default_config(**{**smol_shape, "k_width": 2048, "dtype": torch.float32})
    assert fp32["block_n"] == 64


def test_default_config_fits_the_k_tile_to_the_gpus_mma():
    """256-feature K tiles only where the dots are Hopper's wgmma; elsewhere (mma.sync on Ampere, Ada,
    RTX 50; tcgen05 on B200) 128, which compiles without spills in the MMA loop and within the 99 KB of
    shared memory an sm_86/89/120 program may use (test_compile_report checks the compiled kernels), and
    K is rebuilt transposed (x_as_b). The value splits follow the target's multiprocessors."""
    common = dict(batch=1, query_rows=1, max_len=32768, k_layout="per_token", v_layout="per_token",
                  dtype=torch.bfloat16, device=torch.device("cpu"))
    seven_b = dict(kv_heads=32, head_dim=128, k_width=4096, v_width=4096, k_group=128, v_group=128, **common)
    smol = dict(kv_heads=9, head_dim=64, k_width=576, v_width=576, k_group=64, v_group=64, **common)
    target = lambda cap, sms=132: da.GpuTarget(capability=cap, multiprocessors=sms, shared_memory=99 * 1024)  # noqa: E731
    for cap, heads_7b, heads_smol in ((90, 2, 1), (100, 1, 2), (80, 1, 2), (86, 1, 2), (89, 1, 2), (120, 1, 2)):
        assert da.default_config(**seven_b, target=target(cap))["block_h"] == heads_7b, cap
        assert da.default_config(**smol, target=target(cap))["block_h"] == heads_smol, cap
        # the dequantized tile is wgmma's register operand on Hopper, the B operand elsewhere
        assert da.default_config(**smol, target=target(cap))["x_as_b"] == (cap != 90), cap
    assert da.default_config(**seven_b)["block_h"] == 2  # CPU tensors (the interpreter): configured as Hopper
    few, many = (da.default_config(**smol, target=target(89, sms))["num_splits"] for sms in (58, 132))
    assert (few, many) == (13, 30)  # 9 value-channel blocks x splits >= 2 x the multiprocessors
    # the Wv projection's output-feature blocks: halved until KV heads x blocks cover the multiprocessors
    assert da.default_config(**seven_b, target=target(90, 132))["block_d"] == 16  # 32 x 4 blocks of 32 < 132
    assert da.default_config(**seven_b, target=target(90, 16))["block_d"] == 128  # 32 heads cover 16
    assert da.default_config(**smol, target=target(90, 16))["block_d"] == 32  # 9 x 2 blocks of 32 >= 16


def test_compiles_with_data_dependent_length():
    """Under torch.compile (fullgraph) the op is one node with a static output shape."""
    a = make_inputs(Case(n=24, L=24))  # no poisoned rows: both lengths below read real ones
    del a["length"]

    def f(length):
        return OP(**a, length=length) * 2

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    for n in (3, 20):
        torch.testing.assert_close(compiled(torch.tensor(n)), f(torch.tensor(n)))


def test_cuda_kernel_is_registered():
    assert torch._C._dispatch_has_kernel_for_dispatch_key(OP.name(), "CUDA")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(OP.name(), "CompositeExplicitAutograd")


def test_module_imports_without_triton():
    code = """
import sys
sys.modules["triton"] = None
import torch
from xq_compile.kernels import decode_attention as da
assert not da.HAS_TRITON
try:
    da.decode_attention_triton(None)
except RuntimeError as e:
    assert "install" in str(e) and "triton" in str(e), e
else:
    raise AssertionError("the launcher ran without triton")
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], env=_subprocess_env(), capture_output=True, text=True)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout + proc.stderr


# --------------------------------------------------------------------------------------------------
# (b) the Triton kernels under the interpreter (subprocess)
# --------------------------------------------------------------------------------------------------

# Small blocks so the interpreter cases take every path: with 16-row blocks and 3 splits over L <= 80,
# some splits are empty (n = 1, 7), chunks end mid-block, C = 64..96 spans several 32-channel blocks
# (ragged for 80 and 96 with block_c 64), Cv spans several value blocks; head tiles of 2 and 4 over 1..3
# KV heads leave some tiles partly empty; 16-channel / 16-row blocks inside a 16-wide scale group take
# the broadcast-scale path of dequant_tile, the others its gather path. The second rebuilds K as
# Kᵀ = Wk·X̂ᵀ (x_as_b, what GPUs without wgmma run); the defaults are Hopper's K = X̂·Wkᵀ.
INTERPRETER_CONFIGS = [
    dict(block_n=16, block_c=32, block_h=2, block_m=16, block_nv=16, block_cv=32, num_splits=3),
    dict(block_n=16, block_c=16, block_h=4, block_m=32, block_nv=32, block_cv=64, num_splits=2, x_as_b=1),
    dict(block_n=32, block_c=16, block_h=1, block_m=16, block_nv=16, block_cv=16, num_splits=1, block_d=32),
]


def default_config_of(case: Case) -> dict:
    return da.resolve_config(inputs(make_inputs(case)))


SHARDS = 3


def _subprocess_env(**extra: str) -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("shard", range(SHARDS))
def test_triton_kernels_interpreted(shard):
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--interpreter", str(shard)],
        env=_subprocess_env(TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    assert f"interpreter cases passed: shard={shard}" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_kernels_read_rows_past_2_31_bytes():
    """Row offsets are computed in int64 in the scores and the values kernels: the key source (shared
    with the values) has its last row 2**31 + 8 KB bytes in (tests/test_kernels.py's wide_rows); with
    int32 offsets the interpreter reads below the allocation (a crash) or wrong bytes."""
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--interpreter", "wide"],
        env=_subprocess_env(TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}: " + proc.stdout[-5000:] + proc.stderr[-5000:]
    assert "wide offsets passed" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_query_tokens_share_one_rebuild():
    """S = 1, 4, 16 query tokens (decode, speculative decoding, short chunks) under the interpreter: the
    output matches the reference, and the K-rebuild launch (_scores_kernel, where the dequantize-GEMM
    runs) has the same grid and the same K tile for every S -- the S·group query rows of a KV head are
    one more dot on the tile rebuilt once, not S rebuilds."""
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--interpreter", "queries"],
        env=_subprocess_env(TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}: " + proc.stdout[-5000:] + proc.stderr[-5000:]
    assert "query tokens passed" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_combine_stage_matches_torch():
    """The split combine (``_combine_kernel``) under the interpreter against the float64 formula."""
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--interpreter", "combine"],
        env=_subprocess_env(TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}: " + proc.stdout[-5000:] + proc.stderr[-5000:]
    assert "combine cases passed" in proc.stdout, proc.stdout + proc.stderr


def _run_query_token_cases() -> None:
    kernels = da.triton_kernels
    real = kernels._scores_kernel
    launches = []

    class Recorder:  # records each scores launch's grid and block sizes, then runs it
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append((tuple(grid), kwargs["BLOCK_N"], kwargs["BLOCK_H"], kwargs["BLOCK_C"]))
                return real[grid](*args, **kwargs)
            return launch

    kernels._scores_kernel = Recorder()
    try:
        per_s = {}
        for s in (1, 4, 16):
            # GQA group 2 (2·S query rows per KV head), a causal-style bool mask over the last S rows
            case = Case(B=2, Hq=4, Hkv=2, S=s, D=32, C=64, L=48, n=40, k_bits=4, k_group=16, mask="bool",
                        dtype=torch.bfloat16, seed=100 + s)
            a = make_inputs(case)
            ref = OP(**a)
            out = da.decode_attention_triton(inputs(a), block_n=16, block_c=32, block_nv=16, block_cv=32,
                                             num_splits=2)
            check_close(out, ref, case.dtype, str(case))
            per_s[s] = launches[-1]
            print(f"ok S={s} scores launch {launches[-1]}", flush=True)
    finally:
        kernels._scores_kernel = real
    assert len(set(per_s.values())) == 1, f"the K-rebuild launch depends on S: {per_s}"
    # 128 query rows (GQA group 4 at S = 16, 2 KV heads): the values kernel takes them in one block of 128
    # at the default configuration
    case = Case(B=1, Hq=8, Hkv=2, S=16, D=32, C=64, L=48, n=45, k_bits=4, k_group=16, mask="bool",
                dtype=torch.bfloat16, seed=7)
    a = make_inputs(case)
    assert da.resolve_config(inputs(a))["block_m"] == 128
    check_close(da.decode_attention_triton(inputs(a), num_splits=3), OP(**a), case.dtype, str(case))
    check_close(da.decode_attention_triton(inputs(a), num_splits=7), OP(**a), case.dtype, str(case))
    print("query tokens passed")


def combine_reference(acc, m_part, l_part, dtype):
    """What the combine stage computes, in float64: Σ_s w_s·acc_s / Σ_s w_s·l_s with w_s = exp(m_s - max_s m_s)
    (0 for a row with nothing attended), rounded to ``dtype``."""
    m, l, acc = m_part.double(), l_part.double(), acc.double()
    w = torch.exp(m - m.amax(dim=1, keepdim=True))  # [B, splits, M]
    total = (w * l).sum(dim=1)
    mixed = (w[..., None] * acc).sum(dim=1) / total[..., None]
    return torch.where(total[..., None] > 0, mixed, 0.0).to(dtype)


def _run_combine_cases() -> None:
    """The combine stage on its own: splits' partial sums with empty splits (maximum -FLT_MAX, sum 0, as
    the softmax writes them) and rows with nothing attended, in tiles that take the splits several steps
    at a time (a small tile budget), over ragged row and channel blocks."""
    g = torch.Generator().manual_seed(3)
    batch, splits, rows, width = 2, 11, 10, 40
    m_part = torch.randn(batch, splits, rows, generator=g) * 4
    l_part = torch.rand(batch, splits, rows, generator=g) * 30 + 1
    acc = torch.randn(batch, splits, rows, width, generator=g) * l_part[..., None]
    m_part[:, 7:] = -3.4028234663852886e38  # empty splits (the last steps hold only these ...)
    l_part[:, 7:] = 0.0
    acc[:, 7:] = 0.0
    m_part[1, :, 3] = -3.4028234663852886e38  # ... and a row with nothing attended
    l_part[1, :, 3] = 0.0
    acc[1, :, 3] = 0.0
    m_part[0, 2, 5] = 60.0  # one split dominating a row: the others' weights underflow to 0
    kernels = da.triton_kernels
    for elements in (256, 4096):
        tiles = kernels._combine_tiles(rows, splits, width, elements)
        for dtype in (torch.float32, torch.bfloat16):
            out = kernels.combine_splits(acc, m_part, l_part, dtype, elements)
            ref = combine_reference(acc, m_part, l_part, dtype)
            assert (out[1, 3] == 0).all(), "a row with nothing attended must give 0"
            tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.0, rtol=8e-3)
            torch.testing.assert_close(out, ref, **tol, msg=lambda m: f"{tiles} {dtype}: {m}")
            print(f"ok combine {tiles} {dtype}", flush=True)
    assert kernels._combine_tiles(rows, splits, width, 256)["SPLIT_STEP"] == 4  # 4 steps of 4 splits
    assert kernels._combine_tiles(rows, splits, width, 4096)["R1"] == 4  # 3 row blocks, the last ragged
    print("combine cases passed")


def _run_wide_offset_case() -> None:
    from test_kernels import wide_rows

    a = make_inputs(Case(B=1, Hq=4, Hkv=2, L=3, n=3, C=64, k_bits=4, k_group=16, S=2, mask="bool"))
    ref = OP(**a)
    a["k_packed"] = wide_rows(a["k_packed"])
    out = da.decode_attention_triton(inputs(a), block_n=16, block_c=32, block_nv=16, block_cv=32, num_splits=2)
    check_close(out, ref, torch.float32, "k_packed rows 2**30 + 4096 bytes apart")
    print("wide offsets passed")


def _run_interpreter_cases(shard: int) -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    kernel = da.triton_kernels._scores_kernel
    assert type(kernel).__name__ == "InterpretedFunction", type(kernel)
    t0 = time.perf_counter()
    for i, case in enumerate(CASES):
        if i % SHARDS != shard:
            continue
        a = make_inputs(case)
        ref = OP(**a)
        # a small-block configuration, and the defaults (what runs on the GPU)
        for cfg in (INTERPRETER_CONFIGS[i % len(INTERPRETER_CONFIGS)], {}):
            out = da.decode_attention_triton(inputs(a), **cfg)
            what = f"{case} cfg={cfg or default_config_of(case)}"
            assert out.shape == ref.shape and out.dtype == ref.dtype, what
            check_close(out, ref, case.dtype, what)
            full = fully_masked_rows(a)
            if full is not None:
                assert (out[full] == 0).all(), f"{what}: a fully masked query row must give 0"
            print(f"ok {what} ({time.perf_counter() - t0:.1f}s)", flush=True)
    if shard == 0:
        # int32 length, n = 0 (every split empty), and non-contiguous query / weight / cache views
        a = make_inputs(Case(**GQA, n=0, L=24, mask="bool"))
        assert (da.decode_attention_triton(inputs(a), block_n=16, block_nv=16, num_splits=2) == 0).all()
        a = make_inputs(Case(Hq=2, Hkv=2, S=2, C=64, n=21, L=40, k_bits=3, mask="float"))
        a["length"] = torch.tensor([21], dtype=torch.int32)
        a["query"] = a["query"].transpose(1, 2).contiguous().transpose(1, 2)
        a["k_weight"] = a["k_weight"].T.contiguous().T
        a["v_weight"] = a["v_weight"].T.contiguous().T
        big = make_inputs(Case(Hq=2, Hkv=2, C=64, n=26, L=50, k_bits=3))  # poisoned from 26 = 21 + 5
        for key in ("k_packed", "k_scale", "k_zero"):
            a[key] = big[key][:, 5:45].clone()  # same values ...
            a[key] = torch.cat([big[key][:, :5], a[key]], 1)[:, 5:]  # ... as a non-contiguous view
        a["cos"], a["sin"] = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (a["cos"], a["sin"])]
        assert not a["k_weight"].is_contiguous() and not a["query"].is_contiguous()
        out = da.decode_attention_triton(inputs(a), block_n=16, block_c=32, block_nv=16, block_cv=32, num_splits=2)
        check_close(out, OP(**a), torch.float32, "non-contiguous")
        # gluon="auto" where no Gluon kernel can run (here the interpreter): exactly the Triton scores
        # kernel's result, asked for by keyword or around the call (tests/test_gluon_scores.py: its choice)
        a = make_inputs(Case(Hq=4, Hkv=2, C=128, n=70, L=80, k_bits=4, k_group=64, S=2, mask="bool",
                             dtype=torch.bfloat16))
        small = INTERPRETER_CONFIGS[0]
        triton_out = da.decode_attention_triton(inputs(a), **small)
        assert torch.equal(da.decode_attention_triton(inputs(a), gluon="auto", **small), triton_out)
        with da.config_overrides(gluon="auto"):
            assert torch.equal(da.decode_attention_triton(inputs(a), **small), triton_out)
        check_close(triton_out, OP(**a), torch.bfloat16, "gluon=auto under the interpreter")
        # a split masked whole for one query row: rows 0..31 (split 0 of 2 at n = 40, blocks of 16) for
        # head 0, rows 32..39 (split 1) for head 1 -- that split's probabilities are relative to the lowest
        # finite float with sum 0, and the reduce must give it no weight
        a = make_inputs(Case(Hq=2, Hkv=2, C=64, n=40, L=48, k_bits=4, mask="bool"))
        a["mask"] = a["mask"].expand(2, 2, 1, 48).clone()
        a["mask"][:, :, :, :40] = True
        a["mask"][:, 0, :, :32] = False
        a["mask"][:, 1, :, 32:40] = False
        out = da.decode_attention_triton(inputs(a), block_n=16, block_c=32, block_nv=16, block_cv=32, num_splits=2)
        check_close(out, OP(**a), torch.float32, "a split masked whole")
        print("ok extras", flush=True)
    if shard == 1:
        # a real shape with the default configuration: SmolLM2's MHA X cache (9 heads of 64 in tiles of 2,
        # so the last tile is half empty; d 576 = 9 channel steps; ragged last row block; batch 2)
        case = CUDA_CASES[len(CASES)]
        a = make_inputs(case)
        check_close(da.decode_attention_triton(inputs(a)), OP(**a), case.dtype, f"{case} (default config)")
        print(f"ok {case} ({time.perf_counter() - t0:.1f}s)", flush=True)
    print(f"interpreter cases passed: shard={shard}")


# --------------------------------------------------------------------------------------------------
# (c) on a GPU
# --------------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(
    CUDA_DEVICE == "cuda" and (not torch.cuda.is_available() or not HAS_TRITON), reason="needs a CUDA GPU and triton"
)


def _to(a: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in a.items()}


CUDA_CASES = [
    *CASES,
    # real shapes: SmolLM2 MHA X (d 576, 9 heads of 64), GQA latents (8 KV heads of 128, 32 q heads)
    Case(B=2, Hq=9, Hkv=9, D=64, C=576, L=1500, n=1337, k_bits=4, k_group=64, S=1, mask="bool",
         dtype=torch.bfloat16),
    Case(B=1, Hq=9, Hkv=9, D=64, C=576, L=4096, n=4096, k_bits=3, k_group=64, S=4, dtype=torch.bfloat16),
    Case(B=2, Hq=32, Hkv=8, D=128, C=1024, Cv=1024, L=2048, n=2000, k_bits=2, k_layout="per_channel",
         k_group=128, v_bits=4, v_group=128, S=2, col0=True, mask="float", dtype=torch.bfloat16),
    Case(B=1, Hq=9, Hkv=9, D=64, C=576, L=700, n=513, k_bits=8, k_group=64, S=16, dtype=torch.float32),
    # several query tokens where the values and reduce dots fill wgmma's 64-row tiles: SmolLM2 at S = 16
    # (144 query rows), a 7B-like MHA tile at S = 4, the GQA latent at S = 16 (64 query rows per KV head)
    Case(B=2, Hq=9, Hkv=9, D=64, C=576, L=700, n=613, k_bits=4, k_group=64, S=16, mask="bool",
         dtype=torch.bfloat16),
    Case(B=1, Hq=4, Hkv=4, D=128, C=512, L=1100, n=1037, k_bits=4, k_group=128, S=4, mask="float",
         dtype=torch.bfloat16),
    Case(B=2, Hq=32, Hkv=8, D=128, C=1024, Cv=1024, L=600, n=455, k_bits=4, k_layout="per_channel",
         k_group=128, v_bits=4, v_group=128, S=16, bias=False, dtype=torch.bfloat16),
]


@needs_cuda
@pytest.mark.parametrize("case", CUDA_CASES, ids=str)
def test_cuda_matches_reference(case):
    a = make_inputs(case)
    ref = OP(**a)
    out = OP(**_to(a, CUDA_DEVICE))
    assert out.device.type == torch.device(CUDA_DEVICE).type
    tol = case.dtype
    if case.dtype == torch.float32 and CUDA_DEVICE == "cuda":
        tol = torch.float32  # fp32 dots run in IEEE unless the user allowed TF32
    check_close(out.cpu(), ref, tol, str(case))
    full = fully_masked_rows(a)
    if full is not None:
        assert (out.cpu()[full] == 0).all()


@needs_cuda
@pytest.mark.skipif(CUDA_DEVICE != "cuda", reason="calls the launcher: a GPU (the interpreter runs both forms above)")
@pytest.mark.parametrize("x_as_b", [0, 1])
@pytest.mark.parametrize("case", CUDA_CASES[len(CASES):len(CASES) + 4], ids=str)
def test_cuda_both_k_forms_match_the_reference(case, x_as_b):
    """K = X̂·Wkᵀ (Hopper's default) and Kᵀ = Wk·X̂ᵀ (every other GPU's) on this GPU, whichever it is: on
    an H200 the second form runs compiled nowhere else in the GPU check (per token and per channel, 2/3/4/8
    bits, fp32, S = 1 to 16)."""
    a = make_inputs(case)
    out = da.decode_attention_triton(inputs(_to(a, CUDA_DEVICE)), x_as_b=x_as_b)
    check_close(out.cpu(), OP(**a), torch.float32 if case.dtype == torch.float32 else case.dtype,
                f"{case} x_as_b={x_as_b}")


# The case test_cuda_graph_replay_follows_the_device_length captures (in bf16 and fp32) and replays at other fills
GRAPH_REPLAY_CASE = Case(B=2, Hq=32, Hkv=8, D=128, C=1024, Cv=1024, L=1024, n=1024, k_bits=4, k_layout="per_channel",
                         k_group=64, v_bits=4, v_group=64, S=1, col0=True, dtype=torch.bfloat16)


@needs_cuda
@pytest.mark.skipif(CUDA_DEVICE != "cuda", reason="CUDA graphs")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_cuda_graph_replay_follows_the_device_length(dtype):
    """One captured graph serves every fill: n is read on the device by every launch."""
    case = replace(GRAPH_REPLAY_CASE, dtype=dtype)
    base = make_inputs(case)
    # no poison: every fill of the replay reads a different prefix
    fresh = {n: make_inputs(replace(case, n=n)) for n in (1, 63, 64, 700, 1024)}
    dev = _to(base, CUDA_DEVICE)
    length = torch.tensor(5, device=CUDA_DEVICE)
    dev["length"] = length
    OP(**dev)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = OP(**dev)
    for n, a in fresh.items():
        for key in ("k_tail", "col0", "cos", "sin", "k_scale", "k_zero", "v_scale", "v_zero"):
            dev[key].copy_(a[key])  # the per-fill poison (tail/scale of the partial group) moves with n
        length.fill_(n)
        graph.replay()
        torch.cuda.synchronize()
        check_close(out.cpu(), OP(**a), dtype, f"graph replay n={n}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--interpreter":
        if sys.argv[2] == "wide":
            _run_wide_offset_case()
        elif sys.argv[2] == "queries":
            _run_query_token_cases()
        elif sys.argv[2] == "combine":
            _run_combine_cases()
        else:
            _run_interpreter_cases(int(sys.argv[2]))
    else:
        sys.exit(f"usage: TRITON_INTERPRET=1 {sys.argv[0]} --interpreter SHARD|wide|queries|combine")
