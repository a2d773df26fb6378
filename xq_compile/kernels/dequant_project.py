"""``xq_compile::dequant_project``: rebuild K (or V) from the packed X cache in one op.

    out[:, :n] = dequantize(packed[:, :n], scale[:, :n], zero[:, :n]) @ weight.T + bias
    out[:, n:] = 0                                   with n = length (clamped to [0, L])

``L`` is the cache capacity (max_cache_len), ``n`` the current fill. The work follows ``n``: the CPU
kernel slices the first ``n`` tokens; the CUDA kernel reads ``n`` on the device and every program whose
row block starts at or past ``n`` only writes its zeros. Reading ``n`` on the device (no ``.item()``,
no host sync) keeps the op capturable in a CUDA graph, where ``n`` changes between replays.

The quantization format is the one of :mod:`xq_compile.quant` (the reference): per-token groups of
``group_size`` channels with an fp16 scale and zero, b-bit codes packed densely little-endian. Code ``k``
of a token starts at bit ``k * bits`` of that token's byte string for every supported width (a 3-bit
word is 8 codes in 3 bytes, i.e. the codes simply follow each other), which is what the kernel uses.

Triton is optional: without it this module still imports and the CPU kernel works; only dispatching a
CUDA tensor to the op raises (asking to install triton).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from xq_compile import quant
from xq_compile.kernels.devices import GpuTarget, check_kernel_device, gpu_target
from xq_compile.kernels.tiles import next_power_of_2

try:  # Triton is an optional dependency (pip install 'xq-compile[triton]').
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised by a subprocess test that hides triton
    triton = None
    tl = None

HAS_TRITON = triton is not None

__all__ = ["HAS_TRITON", "dequant_project", "dequant_project_triton"]


# --------------------------------------------------------------------------------------------------
# Input checks (shapes, dtypes and devices only: never reads tensor data, so no host sync).
# --------------------------------------------------------------------------------------------------


def _check_inputs(
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    length: torch.Tensor,
    bits: int,
    group_size: int,
) -> None:
    if packed.dim() != 3 or packed.dtype != torch.uint8:
        raise ValueError(f"packed must be uint8 [B, L, P], got {packed.dtype} {tuple(packed.shape)}")
    if weight.dim() != 2 or not weight.dtype.is_floating_point:
        raise ValueError(f"weight must be a floating [N, d] tensor, got {weight.dtype} {tuple(weight.shape)}")
    batch, max_len, width = packed.shape
    out_features, hidden = weight.shape
    if group_size < 1 or hidden % group_size:
        raise ValueError(f"group_size={group_size} does not divide the hidden size {hidden} of weight")
    expected_width = quant.packed_width(hidden, bits)  # also rejects unsupported bit widths
    if width != expected_width:
        raise ValueError(
            f"packed has {width} bytes per token but {bits}-bit codes of d={hidden} take {expected_width}"
        )
    groups = hidden // group_size
    for name, t in (("scale", scale), ("zero", zero)):
        if tuple(t.shape) != (batch, max_len, groups) or t.dtype != quant.SCALE_DTYPE:
            raise ValueError(
                f"{name} must be {quant.SCALE_DTYPE} {(batch, max_len, groups)}, got {t.dtype} {tuple(t.shape)}"
            )
    if bias is not None and (tuple(bias.shape) != (out_features,) or bias.dtype != weight.dtype):
        raise ValueError(
            f"bias must be {weight.dtype} [{out_features}], got {bias.dtype} {tuple(bias.shape)}"
        )
    if length.numel() != 1 or length.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"length must be a 1-element int32/int64 tensor, got {length.dtype} {tuple(length.shape)}")
    for name, t in (("scale", scale), ("zero", zero), ("weight", weight), ("bias", bias), ("length", length)):
        if t is not None and t.device != packed.device:
            raise ValueError(f"{name} is on {t.device} but packed is on {packed.device}")


# --------------------------------------------------------------------------------------------------
# The custom op. The default kernel (CPU and any device without its own kernel) is the torch reference.
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("xq_compile::dequant_project", mutates_args=())
def dequant_project(
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    length: torch.Tensor,
    bits: int,
    group_size: int,
) -> torch.Tensor:
    """Dequantize the first ``length`` cached tokens of X and project them: ``[B, L, N]``, tail zero."""
    _check_inputs(packed, scale, zero, weight, bias, length, bits, group_size)
    batch, max_len, _ = packed.shape
    out = packed.new_zeros((batch, max_len, weight.shape[0]), dtype=weight.dtype)
    # Same clamping as the CUDA kernel, so both devices agree on an out-of-range length.
    n = min(max(int(length), 0), max_len)
    if n > 0:
        x_hat = quant.dequantize(packed[:, :n], scale[:, :n], zero[:, :n], bits, group_size, dtype=weight.dtype)
        out[:, :n] = F.linear(x_hat, weight, bias)
    return out


@dequant_project.register_fake
def _(packed, scale, zero, weight, bias, length, bits, group_size):
    return packed.new_empty((packed.shape[0], packed.shape[1], weight.shape[0]), dtype=weight.dtype)


@dequant_project.register_kernel("cuda")
def _(packed, scale, zero, weight, bias, length, bits, group_size):
    check_kernel_device(packed.device, "dequant_project")
    with torch.cuda.device(packed.device):
        return dequant_project_triton(packed, scale, zero, weight, bias, length, bits, group_size)


# --------------------------------------------------------------------------------------------------
# Triton kernel.
# --------------------------------------------------------------------------------------------------

if HAS_TRITON:
    from xq_compile.kernels.tiles import dequant_tile, offset64, scale_broadcast

    @triton.jit
    def _dequant_project_kernel(
        packed_ptr, scale_ptr, zero_ptr, weight_ptr, bias_ptr, length_ptr, out_ptr,
        L, N, P, D: tl.constexpr,
        stride_pb, stride_pl, stride_pp,
        stride_sb, stride_sl, stride_sg,
        stride_zb, stride_zl, stride_zg,
        stride_wn, stride_wk,
        stride_ob, stride_ol, stride_on,
        BITS: tl.constexpr,
        GROUP_SIZE: tl.constexpr,
        SCALE_BCAST: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        X_AS_B: tl.constexpr,
    ):
        # Axis 0 walks (batch, row block) pairs, axis 1 the output-feature blocks.
        pid_bm = tl.program_id(0)
        pid_n = tl.program_id(1)
        num_m_blocks = tl.cdiv(L, BLOCK_M)
        batch = (pid_bm // num_m_blocks).to(tl.int64)  # int64: B * L * stride may exceed 2**31
        m_block = pid_bm % num_m_blocks

        rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < N
        out_ptrs = out_ptr + batch * stride_ob + offset64(rows, stride_ol)[:, None] + cols[None, :] * stride_on
        out_mask = (rows[:, None] < L) & col_mask[None, :]

        # The fill n is read here, on the device: the host never syncs, so CUDA graphs can replay the
        # launch with a new n. Clamped to [0, L] like the CPU kernel.
        n = tl.load(length_ptr).to(tl.int32)
        n = tl.minimum(tl.maximum(n, 0), L)
        if m_block * BLOCK_M >= n:
            # Block entirely past the fill: the cost of these tokens is one store of zeros.
            tl.store(out_ptrs, tl.zeros((BLOCK_M, BLOCK_N), dtype=out_ptr.dtype.element_ty), mask=out_mask)
            return

        row_mask = rows < n  # tokens of a partly filled block past n are never read

        # out = X̂ · Wᵀ: the dequantized tile is the first operand, which wgmma reads from registers,
        # and the Wᵀ tile -- a plain load from global memory -- the second, which Triton's pipeliner
        # prefetches into multi-buffered shared memory; so each step's MMA stays in flight while the
        # next tile is dequantized (docs/kernels.md). The loop bound D is a constexpr: with a runtime
        # bound ptxas serializes the MMAs for some widths (C7515).
        # X_AS_B (mma.sync GPUs): outᵀ = W · X̂ᵀ instead. There each warp dequantizes the part of the tile
        # its own MMAs read; Triton lays the 4 warps of the 64 x 128 tile out [1, 4], so as the first
        # operand every X̂ element is dequantized by all 4 warps, as the second (128 x 64, [2, 2]) by 2.
        if X_AS_B:
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < D  # ragged last tile when BLOCK_K does not divide d
            # x_hat = code * scale + zero of the channel's group, in fp32 like quant.dequantize (0 past n)
            x = dequant_tile(
                packed_ptr, scale_ptr, zero_ptr, packed_ptr, packed_ptr, batch, m_block * BLOCK_M, n, k0, 0, D, P,
                stride_pb, stride_pl, stride_pp, stride_sb, stride_sl, stride_sg, stride_zb, stride_zl, stride_zg,
                0, 0, 0, 0, 0,
                packed_ptr, 0, 0, 1,  # not paged: no block table (page size 1)
                BITS, GROUP_SIZE, False, False, SCALE_BCAST, BLOCK_M, BLOCK_K, False,
            )
            # weight is [N, d]: the [BLOCK_K, BLOCK_N] tile of its transpose.
            w = tl.load(
                weight_ptr + ks[:, None] * stride_wk + cols[None, :] * stride_wn,
                mask=k_mask[:, None] & col_mask[None, :],
                other=0.0,
            )
            # X-hat is rounded to the weight dtype first (as the reference dequantizes to it), the
            # products accumulate in fp32. (if / else: Triton compiles what follows a constexpr branch's
            # return too)
            if X_AS_B:
                acc = tl.dot(tl.trans(w), tl.trans(x.to(w.dtype)), acc, input_precision=DOT_PRECISION)
            else:
                acc = tl.dot(x.to(w.dtype), w, acc, input_precision=DOT_PRECISION)
        if X_AS_B:
            acc = tl.trans(acc)

        if HAS_BIAS:
            b = tl.load(bias_ptr + cols, mask=col_mask, other=0.0)
            acc += b.to(tl.float32)[None, :]
        # Rows past n in this block must be exactly 0 (the bias would otherwise land there).
        acc = tl.where(row_mask[:, None], acc, 0.0)
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@functools.cache  # read at every launch: parse the version once
def triton_release() -> tuple[int, int]:
    """(major, minor) of the installed Triton ("3.9.0+git..." -> (3, 9))."""
    return tuple(int(part) for part in triton.__version__.split(".")[:2])


def rebuild_transposed(target: GpuTarget, bits: int, release: Optional[tuple[int, int]] = None) -> bool:
    """Whether the kernel computes outᵀ = W·X̂ᵀ on ``target``: where the dots are ``mma.sync``, except for
    3-bit codes under Triton 3.8 and newer (``release``: Triton's (major, minor), default the installed one).

    Triton lays the 4 warps of the 64-row x 128-feature tile out [1, 4]: as the first operand every
    dequantized element is computed by all 4 warps. Transposed (128 x 64, warps [2, 2]) by 2. SASS
    instructions per 32-channel step on sm_89, triton 3.9: 415 -> 353 at 2 bits, 505 -> 357 at 4, 477 -> 375
    at 8 (sm_80, sm_120 and triton 3.6-3.8 alike). At 3 bits Triton 3.8 and 3.9 dequantize the tile once,
    in a blocked layout, and move it to the operand's layout through shared memory in either form: the
    transposes only cost (351 -> 381); 3.6 and 3.7 do not, and the swap saves there too (489 -> 399).
    Hopper keeps the dequantized tile as wgmma's register operand, the only form that keeps its MMAs in
    flight; sm_100 (tcgen05, both operands from shared memory) took 539 -> 670 at 4 bits transposed
    (docs/kernels.md "Other GPUs")."""
    if not target.mma_sync:
        return False
    return bits != 3 or (release or triton_release()) < (3, 8)


def dequant_project_triton(
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    length: torch.Tensor,
    bits: int,
    group_size: int,
    *,
    block_m: int = 64,
    block_n: Optional[int] = None,
    block_k: int = 32,
    num_warps: int = 4,
    num_stages: int = 3,
    x_as_b: Optional[bool] = None,
    target: Optional[GpuTarget] = None,
) -> torch.Tensor:
    """Launch the Triton kernel (what the op's CUDA kernel calls). Same semantics as the op.

    Works on CPU tensors under ``TRITON_INTERPRET=1`` (the tests do that). ``length`` is only passed
    by pointer: nothing here reads tensor data, so the launch is CUDA-graph capturable.

    Block sizes: ``block_m`` tokens x ``block_n`` output features per program (default: N rounded up
    to a power of two, capped at 128, so a K projection of a small model re-dequantizes X for few N
    blocks), looping over d in ``block_k`` channels. All are powers of two >= 16 (``tl.dot`` needs
    that); d need not be a multiple of ``block_k``.

    ``x_as_b``: compute outᵀ = W·X̂ᵀ, the dequantized tile the MMA's second operand (default:
    :func:`rebuild_transposed` for ``target``, by default the tensors' GPU). ``target``: configure for
    that GPU instead (``benchmarks/compile_report.py`` compiles for GPUs it does not have).
    """
    if not HAS_TRITON:
        raise RuntimeError(
            "xq_compile::dequant_project on CUDA needs triton, which is not installed: "
            "pip install 'xq-compile[triton]' (or pip install triton)."
        )
    _check_inputs(packed, scale, zero, weight, bias, length, bits, group_size)
    batch, max_len, width = packed.shape
    out_features, hidden = weight.shape
    if block_n is None:
        block_n = min(128, max(16, next_power_of_2(out_features)))
    for name, block in (("block_m", block_m), ("block_n", block_n), ("block_k", block_k)):
        if block < 16 or block & (block - 1):
            raise ValueError(f"{name}={block} must be a power of two >= 16")

    if x_as_b is None:
        x_as_b = rebuild_transposed(target or gpu_target(packed.device), bits)
    out = torch.empty((batch, max_len, out_features), device=packed.device, dtype=weight.dtype)
    if out.numel() == 0:
        return out
    # fp32 weights follow torch's matmul precision setting (TF32 only when the user allowed it, as
    # F.linear does); 16-bit weights get Triton's default, which does not apply to them anyway.
    fp32_exact = weight.dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest"
    precision = "ieee" if fp32_exact else "tf32"
    grid = (batch * triton.cdiv(max_len, block_m), triton.cdiv(out_features, block_n))
    _dequant_project_kernel[grid](
        packed, scale, zero, weight, weight if bias is None else bias, length, out,
        max_len, out_features, width, hidden,
        *packed.stride(), *scale.stride(), *zero.stride(), *weight.stride(), *out.stride(),
        BITS=bits,
        GROUP_SIZE=group_size,
        SCALE_BCAST=scale_broadcast("per_token", group_size, block_m, block_k),
        HAS_BIAS=bias is not None,
        DOT_PRECISION=precision,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        X_AS_B=bool(x_as_b),
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out
