"""Launch configuration of the decode-attention Triton kernels: block sizes, head tiles, split count and
warps for a shape (:func:`default_config`, a fixed rule), with checked overrides (:func:`resolve_config`,
the one place the launcher, the benchmarks' sweep and the tests get a configuration from)."""

from __future__ import annotations

import contextlib
import contextvars
import os

import torch

from xq_compile.kernels.decode_attention.inputs import DecodeAttentionInputs, Shapes
from xq_compile.kernels.devices import GpuTarget, gpu_target
from xq_compile.kernels.tiles import next_power_of_2

CONFIG_KEYS = ("block_n", "block_c", "block_h", "block_m", "block_nv", "block_cv", "num_splits", "block_d",
               "num_warps", "num_stages", "x_as_b", "gluon", "gluon_ws")

# gluon="auto": each launch takes the Gluon scores kernel where it can run the call (W resident where the head
# tile's slice fits, else streamed) and the Triton one elsewhere (other GPUs, 3-bit keys, other tiles, ...).
# gluon_ws=1 (with gluon 1, 2 or "auto"): that Gluon kernel warp-specialized (dequantizing warps for its MMA warps).
GLUON_AUTO = "auto"


# Overrides set by config_overrides() for the launches inside its block (this thread / task only).
_OVERRIDES: contextvars.ContextVar[dict] = contextvars.ContextVar("xq_decode_attention_config", default={})


def _check_keys(config: dict) -> None:
    unknown = set(config) - set(CONFIG_KEYS)
    if unknown:
        raise TypeError(f"unknown decode_attention config {sorted(unknown)}; known: {CONFIG_KEYS}")


@contextlib.contextmanager
def config_overrides(**config: int | str):
    """Within the block, every launch of the op's Triton kernels takes these overrides of
    :func:`default_config` (keys :data:`CONFIG_KEYS`): the way to configure the launches a compiled model
    makes, which call the op without a configuration -- e.g. ``with config_overrides(gluon="auto"): step()``
    to run the Gluon scores kernel inside a compiled decode step wherever it can (and in the CUDA graphs
    captured there).
    Nested blocks stack; a launcher's own keyword arguments win. Keys and values are checked on entry
    (:func:`check_overrides`)."""
    check_overrides(config)
    token = _OVERRIDES.set({**_OVERRIDES.get(), **config})
    try:
        yield
    finally:
        _OVERRIDES.reset(token)


def pow2_at_least_16(x: int) -> int:
    """The smallest power of two >= max(x, 16): the smallest block ``tl.dot`` takes."""
    return max(16, next_power_of_2(x))


def _largest_pow2_divisor(x: int, cap: int) -> int:
    p = 1
    while p < cap and x % (2 * p) == 0:
        p *= 2
    return p


def interpreted() -> bool:
    """Whether Triton runs kernels in its interpreter (TRITON_INTERPRET=1, read as Triton reads it)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() not in ("", "0", "false", "off")


def default_config(
    *, batch: int, kv_heads: int, head_dim: int, query_rows: int, max_len: int, k_width: int, v_width: int,
    k_layout: str, k_group: int, v_layout: str, v_group: int, dtype: torch.dtype, device: torch.device,
    target: GpuTarget | None = None, k_bits: int = 4, paged: bool = False,
) -> dict:
    """Block sizes, head tiles, split count and warps for a shape: a fixed rule, no autotuning (compile
    time matters, and GPU time to tune is scarce; ``benchmarks/decode_attention.py --sweep`` measures
    the alternatives on a GPU).

    Scores kernel (the K rebuild, where almost all FLOPs are): a [block_h·D, block_n] dequantize-GEMM
    tile of up to 256 features (2 heads of 128, 4 of 64) by 128 rows on 8 warps: each dequantized X̂
    element feeds 256 MACs, so the dequantization's instructions (about as many per step as for a
    128-feature tile, ``benchmarks/compile_report.py``) are spread over twice the tensor-core work.
    Fewer heads when the KV heads would leave more than 15% of a tile empty (SmolLM2's 9 heads of
    64: tiles of 2). ``block_c`` = 64 channels per step, or the scale group when that is smaller, so
    the scale is one broadcast vector per tile. Compiled for sm_90 this keeps every MMA loop free of
    register spills, with its wgmma in flight, for 2/3/4/8 bits under triton 3.6 and 3.9 (128-wide
    heads at 255 registers, with 76-92 spill instructions after the loop, once per tile); ``--sweep``
    times the alternatives on a GPU. On other GPUs (not ``target.wgmma``: Ampere, Ada, RTX 50 with
    ``mma.sync``, B200 with tcgen05) the tile has at most 128 features: at 256 the 7B and GQA tiles
    spilled inside the MMA loop, and with ``mma.sync`` took 128 KB of shared memory, more than the 99 KB
    an sm_86/89/120 program may use (the launch would fail); at 128 they compile without spills in at
    most 96.5 KB. There ``x_as_b`` also rebuilds K transposed, Kᵀ = Wk·X̂ᵀ, so that each dequantized
    element is computed by 2 warps rather than 4 (``_rebuild_k``).

    Short channel loops (a key source under 16 steps of ``block_c``: the hidden size of small models,
    576 for SmolLM2-135M, 896-960 for Qwen2-0.5B and SmolLM2-360M) take 64-row tiles of 64 features on
    one warpgroup on Hopper. A 128 x 128 tile there runs one program per multiprocessor through 9 steps,
    so nothing hides its pipeline's filling and its epilogue (RoPE, the scores' dot and store); the
    small tile fits 3-4 programs per multiprocessor. Replayed from CUDA graphs on an H200 it made
    SmolLM2's op 8-10% faster at 8K and 32K cached tokens (0.052 -> 0.047 ms, 0.146 -> 0.135 ms), the
    best of the sweep there, while the long loops of the 7B (4096 channels) and GQA latent (1024) shapes
    were as fast or slower with it.

    Paged sources (vLLM): each row's page is loaded from the block table and stays live through the
    channel loop; for 3-bit keys in 256-feature tiles that pushed the tile past 255 registers with
    spills inside the loop (the GQA latent shape), so those take 32 channels per step.

    Values kernel: ``block_m`` flattened query rows (all heads share the value rows), ``block_nv``
    rows by ``block_cv`` value channels per step, ``num_splits`` chunks of the rows so that about two
    programs run per multiprocessor (those of ``target``; default: ``device``'s). Each block of
    query rows dequantizes the value rows again, so with several query tokens the blocks are as large
    as compiles without spills: up to 128 rows (the wgmma's N; at S = 16 a 7B MHA step then dequantizes
    the values 4 times instead of 8, for 5% more instructions per step).

    Projection kernel: ``block_d`` output features of one KV head per program, halved from the head
    size (down to 16) until the programs cover the multiprocessors, so that reading Wv (as large as Wk)
    is spread over the GPU: one program per KV head left 3-32 multiprocessors to stream it.
    """
    target = target or gpu_target(device)
    d_pad = pow2_at_least_16(head_dim // 2) * 2
    block_h = max(1, (256 if target.wgmma else 128) // d_pad)
    while block_h > 1 and -(-kv_heads // block_h) * block_h > 1.15 * kv_heads:  # also keeps block_h <= 2·Hkv
        block_h //= 2
    block_n = 128 if dtype != torch.float32 else 64  # fp32 operands: twice the registers per element
    if k_layout == "per_channel":  # a row block inside one token group broadcasts its scales
        block_n = max(64, min(block_n, _largest_pow2_divisor(k_group, block_n)))
    block_c = 64
    if k_layout == "per_token" and k_group % 64:
        block_c = max(16, _largest_pow2_divisor(k_group, 64))
    if paged and k_bits == 3 and block_h * d_pad >= 256:
        block_c = min(block_c, 32)
    if target.wgmma and k_width < 16 * block_c:  # short channel loop: several programs per multiprocessor
        block_n, block_h = min(block_n, 64), max(1, 64 // d_pad)
    num_warps = 8 if block_n * block_h * d_pad >= 128 * 128 else 4  # two warpgroups from 128 x 128 on

    block_m = min(128, pow2_at_least_16(kv_heads * query_rows))
    block_nv = 64
    block_cv = 128 if v_layout == "per_channel" or v_group % 128 == 0 else 64
    block_cv = min(block_cv, pow2_at_least_16(v_width))
    programs = batch * -(-kv_heads * query_rows // block_m) * -(-v_width // block_cv)
    splits = max(1, min(-(-2 * target.multiprocessors // max(programs, 1)), -(-max_len // block_nv), 128))
    block_d = pow2_at_least_16(head_dim)
    while block_d > 16 and batch * kv_heads * -(-head_dim // block_d) < target.multiprocessors:
        block_d //= 2
    return dict(block_n=block_n, block_c=block_c, block_h=block_h, block_m=block_m, block_nv=block_nv,
                block_cv=block_cv, num_splits=splits, block_d=block_d, num_warps=num_warps, num_stages=3,
                x_as_b=int(not target.wgmma), gluon=0, gluon_ws=0)


def resolve_config(inputs: DecodeAttentionInputs, target: GpuTarget | None = None, **config: int) -> dict:
    """The configuration :func:`~xq_compile.kernels.decode_attention.decode_attention_triton` launches
    ``inputs`` with: :func:`default_config` for their shapes (on ``target``, default: their device's),
    then the keyword overrides (:data:`CONFIG_KEYS`), checked."""
    return resolve(inputs, config, target)[1]


def resolve(inputs: DecodeAttentionInputs, config: dict, target: GpuTarget | None = None) -> tuple[Shapes, dict]:
    """(the checked sizes of ``inputs``, the launch configuration: the default, then the overrides of any
    enclosing :func:`config_overrides`, then ``config``)."""
    _check_keys(config)
    shapes = inputs.check()
    values = inputs.value_source
    cfg = default_config(
        batch=shapes.batch, kv_heads=shapes.kv_heads, head_dim=shapes.head_dim,
        query_rows=shapes.q_heads // shapes.kv_heads * shapes.seq, max_len=shapes.max_len,
        k_width=shapes.k_width, v_width=shapes.v_width,
        k_layout=inputs.keys.layout, k_group=inputs.keys.group, v_layout=values.layout, v_group=values.group,
        dtype=inputs.k_weight.dtype, device=inputs.query.device, target=target, k_bits=inputs.keys.bits,
        paged=inputs.paged,
    )
    cfg.update({k: v for k, v in {**_OVERRIDES.get(), **config}.items() if v is not None})
    check_overrides(cfg)
    return shapes, cfg


def check_overrides(config: dict) -> None:
    """Raise unless ``config`` holds valid decode_attention configuration values (any of :data:`CONFIG_KEYS`;
    None means "the default"): TypeError naming an unknown key, ValueError a bad value. What the launcher
    checks at every launch, and what a configuration given ahead of any launch (a server's) is checked with."""
    _check_keys(config)

    def fails(key: str, ok) -> bool:
        value = config.get(key)
        return value is not None and not (isinstance(value, int) and ok(value))

    for key in ("block_n", "block_c", "block_m", "block_nv", "block_cv", "block_d"):
        if fails(key, lambda v: v >= 16 and not v & (v - 1)):
            raise ValueError(f"{key}={config[key]!r} must be a power of two >= 16")
    if fails("block_h", lambda v: v >= 1 and not v & (v - 1)):
        raise ValueError(f"block_h={config['block_h']!r} must be a power of two >= 1")
    if fails("x_as_b", lambda v: v in (0, 1)):
        raise ValueError(f"x_as_b={config['x_as_b']!r} must be 0 (K = X̂·Wkᵀ) or 1 (Kᵀ = Wk·X̂ᵀ)")
    if config.get("gluon") not in (None, 0, 1, 2, GLUON_AUTO):
        raise ValueError(f"gluon={config['gluon']!r} must be 0 (the Triton scores kernel), 1 (the Gluon one, "
                         "Hopper), 2 (the Gluon one with the head tile's W resident in shared memory) or 'auto' "
                         "(per call: 2 where it can run, else 1, else 0)")
    if config.get("gluon_ws") not in (None, 0, 1):
        raise ValueError(f"gluon_ws={config['gluon_ws']!r} must be 0 (the Gluon scores kernel's warps dequantize and "
                         "issue the MMAs) or 1 (warp-specialized: more warps dequantize for them)")
    if config.get("gluon_ws") == 1 and config.get("gluon") == 0:
        raise ValueError("gluon_ws=1 warp-specializes the Gluon scores kernel, which gluon=0 does not run: set gluon "
                         "to 1, 2 or 'auto' as well")
    for key in ("num_splits", "num_warps", "num_stages"):
        if fails(key, lambda v: v >= 1):
            raise ValueError(f"{key}={config[key]!r} must be an integer >= 1")
