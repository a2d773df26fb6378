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
from transformers.pytorch_utils import Conv1D

from . import quant
from .config import XQuantConfig
from .forms import LayerShape, form_for, layer_shapes
from .forms.x import rotated_reconstruction
from .fused_rows import FusedRows
from .rotation import rotate, rotation_of

__all__ = ["hooks_removed_after", "rotated_reconstruction", "simulate_xquant", "simulated_x"]


def _rotation(config: XQuantConfig, x: torch.Tensor) -> torch.Tensor | None:
    return rotation_of(config, x.device)


def simulated_x(x: torch.Tensor, config: XQuantConfig, bits: int | None = None) -> torch.Tensor:
    """X̂ as the compiled path reconstructs it (rotation undone, so it feeds the original weights)."""
    bits = config.bits if bits is None else bits
    h = _rotation(config, x)
    if h is None:
        return quant.fake_quantize_as(x, bits, config.group_size, config.scale_format)
    # blockdiag(H) is symmetric and orthogonal: R⁻¹ = R.
    return rotate(quant.fake_quantize_as(rotate(x, h), bits, config.group_size, config.scale_format), h)


def _kv_projections(model: torch.nn.Module) -> list[tuple[torch.nn.Module, ...]]:
    """Per attention layer, in order: (k_proj, v_proj), or for a fused projection (qkv, (its K rows, its V
    rows)) as :class:`~xq_compile.fused_rows.FusedRows`."""
    layers = []
    for module in model.modules():
        k, v, qkv, wqkv, neox, c_attn = (getattr(module, name, None) for name in
                                         ("k_proj", "v_proj", "qkv_proj", "wqkv", "query_key_value", "c_attn"))
        if isinstance(k, torch.nn.Linear) and isinstance(v, torch.nn.Linear):
            layers.append((k, v))
        elif isinstance(qkv, torch.nn.Linear) and hasattr(module, "mp_num"):  # CodeGen: [q | v | k] per block
            local = qkv.out_features // (3 * module.mp_num)
            layers.append((qkv, (FusedRows(2 * local, 3 * local, 3 * local), FusedRows(local, 2 * local, 3 * local))))
        elif isinstance(qkv, torch.nn.Linear):  # Phi-3 style: rows [q | k | v]
            layers.append((qkv, _blocks(qkv, module.config.num_attention_heads * module.head_dim)))
        elif isinstance(wqkv, torch.nn.Linear):  # gpt-fast: rows [q | k | v], q as wide as the model
            layers.append((wqkv, _blocks(wqkv, module.dim)))
        elif isinstance(neox, torch.nn.Linear):  # GPT-NeoX, Persimmon, Falcon
            layers.append((neox, _query_key_value_rows(module, neox)))
        elif isinstance(c_attn, torch.nn.Linear) and hasattr(module, "multi_query"):  # GPTBigCode
            layers.append((c_attn, _query_key_value_rows(module, c_attn)))
        elif isinstance(c_attn, Conv1D) and c_attn.nf == 3 * c_attn.nx:  # GPT-2: [q | k | v], stored [in, out]
            d = c_attn.nx
            layers.append((c_attn, (FusedRows(d, 2 * d, weight_transposed=True),
                                    FusedRows(2 * d, 3 * d, weight_transposed=True))))
    if not layers:
        raise ValueError("no attention module with k_proj/v_proj, qkv_proj, wqkv, query_key_value Linear layers "
                         "or a GPT-2 or GPTBigCode c_attn to simulate XQuant on")
    return layers


def _query_key_value_rows(module: torch.nn.Module, qkv: torch.nn.Linear) -> tuple[FusedRows, FusedRows]:
    """The K and V rows of a fused ``query_key_value`` (``c_attn``) projection: per head [q_h; k_h; v_h]
    (GPT-NeoX, Persimmon, GPTBigCode and Falcon with a K/V head per query head), or [q | k | v] with one K/V
    head (multi-query: Falcon-7B, StarCoder)."""
    if getattr(module, "new_decoder_architecture", False):
        raise ValueError("Falcon's new_decoder_architecture repeats each K/V head for its query heads before the "
                         "cache: XQuant does not simulate or rewrite it")
    if getattr(module, "multi_query", False):
        return _blocks(qkv, module.num_heads * module.head_dim)
    d = getattr(module, "head_size", None) or module.head_dim
    return FusedRows(d, 2 * d, 3 * d), FusedRows(2 * d, 3 * d, 3 * d)


def _blocks(qkv: torch.nn.Linear, q_width: int) -> tuple[FusedRows, FusedRows]:
    """The K and V rows of a projection with rows [q | k | v], k and v alike wide."""
    kv = (qkv.out_features - q_width) // 2
    return FusedRows(q_width, q_width + kv), FusedRows(q_width + kv, q_width + 2 * kv)


def _sliding_windows(model: torch.nn.Module) -> list[int | None]:
    """Each layer's sliding window (None: full attention) for a transformers model; [] for any other."""
    config = getattr(model, "config", None)
    if not hasattr(config, "get_text_config"):
        return []
    return [shape.sliding_window for shape in layer_shapes(config)]


@contextlib.contextmanager
def simulate_xquant(model: torch.nn.Module, config: XQuantConfig, trace: dict | None = None) -> Iterator[None]:
    """Within the block, every k_proj/v_proj of ``model`` sees X̂ instead of X.

    With ``cross_layer`` the layers are chained in module order exactly as the compiled path chains
    them: layer i sees X̂_{i-1} + deq(Q(X_i·R - X̂_{i-1})) for the tokens of the current call.
    Each layer's cache form (:mod:`xq_compile.forms`) installs the hooks that quantize as it stores; a
    sliding-window layer's X window quantizes as the X form does, its model window installs none (the
    compiled path leaves its K/V exact too).
    ``trace``, if given, receives for every X-form layer i ``trace[i] = (X·R, X̂_{i-1}·R or None)``:
    what its reconstruction was computed from (:mod:`xq_compile.calibrate` re-quantizes it at other
    widths).
    """
    chain: dict = {"trace": trace} if trace is not None else {}  # shared by the layers' hooks
    windows = _sliding_windows(model)
    handles = []
    for i, (first, second) in enumerate(_kv_projections(model)):
        # widths as the cache sees them (a Conv1D's weight is [in, out], a Linear's [out, in])
        width, outputs = first.weight.shape if isinstance(first, Conv1D) else first.weight.shape[::-1]
        kv_width = second[0].count(outputs) if isinstance(second, tuple) else outputs
        window = windows[i] if i < len(windows) else None
        form = form_for(config, i, LayerShape(width, kv_width, sliding_window=window))
        handles += form.simulation_hooks(first, second, chain)
    with hooks_removed_after(handles):
        yield


@contextlib.contextmanager
def hooks_removed_after(handles: list) -> Iterator[None]:
    """Keep module hooks installed for the ``with`` block only (also on error)."""
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
