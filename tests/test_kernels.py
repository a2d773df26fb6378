"""Tests of ``xq_compile::dequant_project``: the CPU reference kernel in-process, the Triton kernel
under the Triton interpreter in a subprocess.

Why a subprocess: ``TRITON_INTERPRET`` is read when ``@triton.jit`` decorates, i.e. when
``xq_compile.kernels.dequant_project`` is imported, and the custom op can be registered only once per
process. So the interpreter cases run as ``python tests/test_kernels.py --interpreter BITS`` with
``TRITON_INTERPRET=1`` (see ``_run_interpreter_cases`` at the bottom), and this process never compiles.

Inputs are built from random *codes* (every code value of the width occurs) rather than from a
quantized X, and two kinds of weight are used:
  * random weights, compared against a float64 reference with tight tolerances;
  * "selection" weights (each output feature = one input channel times a power of two), for which
    the result is exact, so a single wrongly unpacked code, wrong group, or wrong weight index fails.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from xq_compile import quant
from xq_compile.kernels import dequant_project as dp
from xq_compile.kernels.tiles import scale_broadcast

ROOT = Path(__file__).resolve().parents[1]
BITS = (2, 3, 4, 8)
OP = torch.ops.xq_compile.dequant_project.default


# --------------------------------------------------------------------------------------------------
# Inputs and reference
# --------------------------------------------------------------------------------------------------


def make_inputs(
    B: int,
    L: int,
    d: int,
    N: int,
    bits: int,
    group_size: int,
    *,
    dtype: torch.dtype = torch.float32,
    bias: bool = True,
    weight: str = "random",
    poison_tail_from: int | None = None,
    seed: int = 0,
):
    """(packed, scale, zero, weight, bias) with random codes over the full code range."""
    g = torch.Generator().manual_seed(seed)
    qmax = (1 << bits) - 1
    codes = torch.randint(0, qmax + 1, (B, L, d), generator=g, dtype=torch.uint8)
    packed = quant.pack(codes, bits)
    # The tests rely on quant's format being what the kernel reads: check the round trip once here.
    assert torch.equal(quant.unpack(packed, bits), codes.to(torch.int32))
    G = d // group_size
    # x_hat spans about [-1, 5] whatever the width; distinct scales per group catch a wrong group index.
    scale = ((0.5 + torch.rand(B, L, G, generator=g)) * 4 / qmax).to(torch.float16)
    zero = (torch.rand(B, L, G, generator=g) * 2 - 1).to(torch.float16)
    if poison_tail_from is not None:
        # Tokens past the fill are garbage in a real cache; the op must not read them at all.
        scale[:, poison_tail_from:] = float("inf")
        zero[:, poison_tail_from:] = float("nan")
    if weight == "random":
        w = torch.randn(N, d, generator=g).to(dtype)
    elif weight == "selection":
        # out[..., j] = x_hat[..., idx[j]] * 2**e[j]: exact in any float dtype, fp32 accumulation included.
        idx = torch.randint(0, d, (N,), generator=g)
        exps = torch.randint(-2, 3, (N,), generator=g).to(torch.float32)
        w = torch.zeros(N, d)
        w[torch.arange(N), idx] = torch.exp2(exps)
        w = w.to(dtype)
    else:
        raise ValueError(weight)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    return packed, scale, zero, w, b


def reference(packed, scale, zero, weight, bias, n, bits, group_size):
    """float64 ``dequantize + matmul`` over the full length, then the tail zeroed."""
    x_hat = quant.dequantize(packed, scale, zero, bits, group_size, dtype=weight.dtype).double()
    y = x_hat @ weight.double().T
    if bias is not None:
        y = y + bias.double()
    y[:, n:] = 0  # also overwrites whatever a poisoned tail produced
    return y


def dequantize_folded(packed, scale, zero, bits, group_size):
    """fp32 X̂ bit for bit as ``tiles.fma_code`` computes it where a tile has one scale and zero per row
    (``SCALE_BCAST``, below 8 bits): ``m * s' + (z - s')`` with ``m = 1 + code / 2^k`` and ``s' = s * 2^k``,
    ``k = 23 - SHIFT`` for the bit ``SHIFT`` where the kernel finds the code (15 + bits * its place in
    the byte, or for 3 bits in its pair). ``m * s'`` is exact in fp32; ``z - s'`` and the sum round once
    each, as the kernel's FMA does."""
    codes = quant.unpack(packed, bits).float()
    places = 2 if bits == 3 else 8 // bits
    k = torch.exp2(8 - bits * (torch.arange(codes.shape[-1]) % places).float())
    s = scale.float().repeat_interleave(group_size, -1) * k
    z = zero.float().repeat_interleave(group_size, -1)
    return (1 + codes / k) * s + (z - s)


def selection_expected(packed, scale, zero, weight, n, bits, group_size, folded=False):
    """Exact output for a selection weight without bias, in weight.dtype. ``folded``: X̂ as the Triton
    kernel dequantizes it with one scale and zero per row and tile (:func:`dequantize_folded`)."""
    if folded and bits != 8:
        x_hat = dequantize_folded(packed[:, :n], scale[:, :n], zero[:, :n], bits, group_size).to(weight.dtype)
    else:
        x_hat = quant.dequantize(packed[:, :n], scale[:, :n], zero[:, :n], bits, group_size, dtype=weight.dtype)
    idx = weight.float().abs().argmax(dim=1)
    factor = weight.float()[torch.arange(weight.shape[0]), idx]
    out = torch.zeros(packed.shape[0], packed.shape[1], weight.shape[0], dtype=weight.dtype)
    out[:, :n] = (x_hat.float()[..., idx] * factor).to(weight.dtype)
    return out


def tolerances(dtype: torch.dtype) -> dict:
    # fp32: 48-term sums of magnitude <= ~20, rounding well under 1e-4. fp16: the output is rounded
    # once to fp16 (half an ulp: <= 2**-11 relative) after fp32 accumulation.
    if dtype == torch.float32:
        return dict(rtol=1e-5, atol=2e-4)
    return dict(rtol=2e-3, atol=2e-3)


def check_against_reference(out, packed, scale, zero, weight, bias, n, bits, group_size):
    B, L, _ = packed.shape
    assert out.shape == (B, L, weight.shape[0]) and out.dtype == weight.dtype
    assert torch.isfinite(out).all()
    assert (out[:, n:] == 0).all(), "rows past the fill must be exactly zero"
    torch.testing.assert_close(
        out.double(), reference(packed, scale, zero, weight, bias, n, bits, group_size), **tolerances(weight.dtype)
    )


# --------------------------------------------------------------------------------------------------
# CPU kernel of the op
# --------------------------------------------------------------------------------------------------

# (B, L, d, N, group_size, n): ragged L and N, partial and full fills, group sizes that do not line up
# with the 8-code words of the 3-bit packing (12) or that cover the whole row (48).
CPU_SHAPES = [
    (1, 37, 48, 20, 16, 21),
    (3, 37, 48, 20, 16, 37),
    (3, 20, 48, 33, 12, 1),
    (1, 5, 48, 7, 48, 4),
]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=lambda s: "B{}_L{}_d{}_N{}_g{}_n{}".format(*s))
def test_cpu_op_matches_reference(bits, with_bias, shape):
    B, L, d, N, gs, n = shape
    packed, scale, zero, w, b = make_inputs(B, L, d, N, bits, gs, bias=with_bias, seed=bits * 7 + n)
    out = OP(packed, scale, zero, w, b, torch.tensor(n), bits, gs)
    check_against_reference(out, packed, scale, zero, w, b, n, bits, gs)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cpu_op_selection_is_exact(bits, dtype):
    B, L, d, N, gs, n = 2, 19, 48, 29, 12, 13
    packed, scale, zero, w, _ = make_inputs(B, L, d, N, bits, gs, dtype=dtype, bias=False, weight="selection")
    out = OP(packed, scale, zero, w, None, torch.tensor(n), bits, gs)
    assert torch.equal(out, selection_expected(packed, scale, zero, w, n, bits, gs))


@pytest.mark.parametrize("bits", [3, 4])
def test_cpu_op_fp16_random_weights(bits):
    B, L, d, N, gs, n = 2, 11, 48, 24, 16, 9
    packed, scale, zero, w, b = make_inputs(B, L, d, N, bits, gs, dtype=torch.float16)
    out = OP(packed, scale, zero, w, b, torch.tensor(n), bits, gs)
    check_against_reference(out, packed, scale, zero, w, b, n, bits, gs)


def test_cpu_op_does_not_read_the_tail():
    B, L, d, N, gs, n = 2, 12, 48, 16, 16, 5
    packed, scale, zero, w, b = make_inputs(B, L, d, N, 3, gs, poison_tail_from=n)
    out = OP(packed, scale, zero, w, b, torch.tensor(n), 3, gs)
    check_against_reference(out, packed, scale, zero, w, b, n, 3, gs)


@pytest.mark.parametrize(
    "length, n",
    [
        (torch.tensor(7), 7),  # 0-d int64
        (torch.tensor([7], dtype=torch.int32), 7),  # 1-element int32
        (torch.tensor(0), 0),  # empty cache: all zeros
        (torch.tensor(50), 12),  # past the capacity: clamped to L (like the CUDA kernel)
        (torch.tensor(-3), 0),  # negative: clamped to 0
    ],
    ids=["0d_int64", "1elem_int32", "zero", "over_L", "negative"],
)
def test_cpu_op_length_forms(length, n):
    packed, scale, zero, w, b = make_inputs(2, 12, 48, 16, 4, 16)
    out = OP(packed, scale, zero, w, b, length, 4, 16)
    check_against_reference(out, packed, scale, zero, w, b, n, 4, 16)
    if n == 0:
        assert not out.any()


def test_cpu_op_rejects_bad_inputs():
    packed, scale, zero, w, b = make_inputs(1, 4, 48, 8, 4, 16)
    n = torch.tensor(2)
    with pytest.raises(ValueError, match="bytes per token"):
        OP(packed, scale, zero, w, b, n, 2, 16)  # packed as 4-bit, called as 2-bit
    with pytest.raises(ValueError, match="bits=5"):
        OP(packed, scale, zero, w, b, n, 5, 16)
    with pytest.raises(ValueError, match="scale"):
        OP(packed, scale, zero, w, b, n, 4, 8)  # G would be 6, scale has 3
    with pytest.raises(ValueError, match="bias"):
        OP(packed, scale, zero, w, b.half(), n, 4, 16)
    with pytest.raises(ValueError, match="length"):
        OP(packed, scale, zero, w, b, torch.tensor([1, 2]), 4, 16)


@pytest.mark.parametrize("with_bias", [True, False])
def test_opcheck(with_bias):
    packed, scale, zero, w, b = make_inputs(2, 9, 24, 12, 3, 12, bias=with_bias)
    torch.library.opcheck(OP, (packed, scale, zero, w, b, torch.tensor(5), 3, 12))


def test_op_compiles_with_data_dependent_length():
    """Traced under torch.compile (fullgraph) the op keeps its static [B, L, N] output shape."""
    packed, scale, zero, w, b = make_inputs(1, 10, 24, 8, 4, 12)

    def rebuild_k(packed, scale, zero, length):
        return dp.dequant_project(packed, scale, zero, w, b, length, 4, 12) * 2

    compiled = torch.compile(rebuild_k, backend="aot_eager", fullgraph=True)
    for n in (3, 10):
        out = compiled(packed, scale, zero, torch.tensor(n))
        torch.testing.assert_close(out, 2 * OP(packed, scale, zero, w, b, torch.tensor(n), 4, 12))
        assert (out[:, n:] == 0).all() and out[:, :n].abs().sum() > 0


def test_cuda_kernel_is_registered():
    """CUDA has its own kernel (the Triton launcher, not runnable here without a GPU); every other
    device falls back to the default (torch reference) kernel."""
    assert torch._C._dispatch_has_kernel_for_dispatch_key(OP.name(), "CUDA")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(OP.name(), "CompositeExplicitAutograd")


def test_module_imports_without_triton():
    """Hiding triton: the module imports, the CPU kernel works, the launcher asks to install triton."""
    code = """
import sys
sys.modules["triton"] = None  # makes `import triton` raise ImportError
import torch
from xq_compile import quant
from xq_compile.kernels import dequant_project as dp
assert not dp.HAS_TRITON
codes = torch.randint(0, 16, (1, 4, 16), dtype=torch.uint8)
scale, zero = torch.ones(1, 4, 1, dtype=torch.float16), torch.zeros(1, 4, 1, dtype=torch.float16)
args = (quant.pack(codes, 4), scale, zero, torch.eye(16), None, torch.tensor(4), 4, 16)
assert torch.equal(torch.ops.xq_compile.dequant_project(*args), codes.float())
try:
    dp.dequant_project_triton(*args)
except RuntimeError as e:
    assert "install" in str(e) and "triton" in str(e), e
else:
    raise AssertionError("the launcher ran without triton")
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], env=_subprocess_env(), capture_output=True, text=True)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout + proc.stderr


# --------------------------------------------------------------------------------------------------
# Triton kernel under the interpreter (subprocess)
# --------------------------------------------------------------------------------------------------


def _subprocess_env(**extra: str) -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.parametrize("bits", BITS)
def test_triton_kernel_interpreted(bits):
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--interpreter", str(bits)],
        env=_subprocess_env(TRITON_INTERPRET="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"interpreter cases passed: bits={bits}" in proc.stdout, proc.stdout + proc.stderr


# (B, L, d, N, group_size, n, (block_m, block_n, block_k)). With 16-row blocks: row blocks entirely
# past n (early exit), a block that n cuts in the middle, ragged L and N tiles, d not a multiple of
# block_k (48 = 32 + 16, 40 = 2 * 16 + 8), group sizes not aligned with the 3-bit words (12). The last
# two have groups of whole channel blocks (32 and 64 channels by 16 or 32), the models' common case:
# one scale and zero per row and block (``SCALE_BCAST``), dequantized by ``tiles.fma_code``.
INTERPRETER_SHAPES = [
    (1, 37, 48, 20, 16, 21, (16, 16, 32)),
    (3, 20, 40, 33, 8, 20, (16, None, 16)),
    (2, 16, 24, 16, 12, 1, (16, 16, 16)),
    (2, 18, 48, 17, 48, 0, (16, 16, 32)),
    (2, 19, 64, 18, 32, 19, (16, 16, 16)),
    (1, 24, 128, 16, 64, 17, (16, 16, 32)),
]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernel_reads_rows_past_2_31_bytes():
    """Row offsets are computed in int64: a packed cache whose last row starts 2**31 + 8 KB bytes in.
    With int32 offsets (row index x row stride) the address wraps below the allocation: the
    interpreter then reads unmapped memory (a crash) or wrong bytes."""
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--interpreter", "wide"],
        env=_subprocess_env(TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}: " + proc.stdout + proc.stderr
    assert "wide offsets passed" in proc.stdout, proc.stdout + proc.stderr


def wide_rows(packed: torch.Tensor, row_stride: int = 2**30 + 4096) -> torch.Tensor:
    """``packed`` [1, L, P] copied into a view whose rows lie ``row_stride`` bytes apart (below 2**31,
    so Triton passes the stride as int32; from row 2 on the offsets pass 2**31). The storage is
    virtual: only the pages of the L rows are ever touched, a few KB of memory."""
    batch, length, width = packed.shape
    assert batch == 1 and 2 * row_stride >= 2**31
    storage = torch.empty((length - 1) * row_stride + width, dtype=torch.uint8)
    wide = storage.as_strided(packed.shape, (length * row_stride, row_stride, 1))
    wide.copy_(packed)
    return wide


def _run_wide_offset_case() -> None:
    """Runs in the subprocess with TRITON_INTERPRET=1 (see test_triton_kernel_reads_rows_past_2_31_bytes)."""
    B, L, d, N, bits, gs, n = 1, 3, 64, 32, 4, 16, 3
    packed, scale, zero, w, b = make_inputs(B, L, d, N, bits, gs, seed=3)
    wide = wide_rows(packed)
    out = dp.dequant_project_triton(wide, scale, zero, w, b, torch.tensor(n), bits, gs, block_m=16, block_k=32)
    check_against_reference(out, packed, scale, zero, w, b, n, bits, gs)
    print("wide offsets passed")


def _run_interpreter_cases(bits: int) -> None:
    """Runs in the subprocess with TRITON_INTERPRET=1: every case for one bit width."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    # Really interpreted (not compiled, which needs a GPU): the jit object is an InterpretedFunction.
    assert type(dp._dequant_project_kernel).__name__ == "InterpretedFunction", type(dp._dequant_project_kernel)

    # Both operand forms: out = X̂·Wᵀ (Hopper, and the interpreter's default) and outᵀ = W·X̂ᵀ (x_as_b, the
    # mma.sync GPUs' form), whose tiles are transposed: a swapped index or a wrong transpose back shows.
    for (case, (B, L, d, N, gs, n, (bm, bn, bk))), x_as_b in itertools.product(enumerate(INTERPRETER_SHAPES),
                                                                              (False, True)):
        blocks = dict(block_m=bm, block_n=bn, block_k=bk, x_as_b=x_as_b)
        where = f"bits={bits} case={case} B={B} L={L} d={d} N={N} g={gs} n={n} blocks={blocks}"
        length = torch.tensor(n) if case % 2 == 0 else torch.tensor([n], dtype=torch.int32)
        for dtype in (torch.float32, torch.float16):
            seed = 100 * bits + 10 * case + (dtype == torch.float16)
            # Random weights and bias (with the tail poisoned), against the float64 reference and the
            # CPU kernel of the op.
            packed, scale, zero, w, b = make_inputs(
                B, L, d, N, bits, gs, dtype=dtype, bias=case != 2, poison_tail_from=n, seed=seed
            )
            out = dp.dequant_project_triton(packed, scale, zero, w, b, length, bits, gs, **blocks)
            try:
                check_against_reference(out, packed, scale, zero, w, b, n, bits, gs)
                torch.testing.assert_close(out, OP(packed, scale, zero, w, b, length, bits, gs), **tolerances(dtype))
            except AssertionError as e:
                raise AssertionError(f"random weights, {dtype}, {where}: {e}") from None

            # Selection weights: exact, so any wrongly unpacked code / group / weight index shows.
            packed, scale, zero, w, _ = make_inputs(
                B, L, d, N, bits, gs, dtype=dtype, bias=False, weight="selection", seed=seed + 1
            )
            out = dp.dequant_project_triton(packed, scale, zero, w, None, length, bits, gs, **blocks)
            folded = scale_broadcast("per_token", gs, bm, bk)  # tiles.fma_code: dequantize_folded
            expected = selection_expected(packed, scale, zero, w, n, bits, gs, folded=folded)
            bad = (out != expected).nonzero()
            assert bad.numel() == 0, f"selection weights, {dtype}, {where}: {len(bad)} wrong: {bad[:5].tolist()}"

    # Non-contiguous inputs: the cache sliced out of a longer buffer and a transposed weight view.
    B, L, d, N, gs, n = 2, 21, 48, 18, 16, 17
    packed, scale, zero, w, b = make_inputs(B, L + 7, d, N, bits, gs, seed=bits)
    packed, scale, zero = packed[:, 3 : 3 + L], scale[:, 3 : 3 + L], zero[:, 3 : 3 + L]
    w = w.T.contiguous().T
    assert not (packed.is_contiguous() or w.is_contiguous())
    for x_as_b in (False, True):
        out = dp.dequant_project_triton(packed, scale, zero, w, b, torch.tensor(n), bits, gs, block_m=16, block_k=32,
                                        x_as_b=x_as_b)
        check_against_reference(out, packed, scale, zero, w, b, n, bits, gs)

    print(f"interpreter cases passed: bits={bits}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--interpreter":
        _run_wide_offset_case() if sys.argv[2] == "wide" else _run_interpreter_cases(int(sys.argv[2]))
    else:
        sys.exit(f"usage: TRITON_INTERPRET=1 {sys.argv[0]} --interpreter BITS|wide")
