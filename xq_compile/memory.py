"""Cache sizes as formulas: what an fp16 K/V cache would hold, and what the X cache holds."""

from __future__ import annotations

from . import quant
from .config import XQuantConfig


def _dims(config) -> tuple[int, int, int, int]:
    config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, config.hidden_size, kv_heads, head_dim


def fp16_kv_cache_bytes(config, batch_size: int, seq_len: int) -> int:
    """Bytes of an fp16 K and V cache of all layers for ``seq_len`` tokens (the paper's baseline)."""
    layers, _, kv_heads, head_dim = _dims(config)
    return 2 * layers * batch_size * seq_len * kv_heads * head_dim * 2


def xquant_cache_bytes(config, xquant: XQuantConfig, batch_size: int, seq_len: int, dtype_bytes: int = 4) -> int:
    """Bytes of the X state of all layers for ``seq_len`` rows, plus the shared int64 positions.

    Quantized: packed codes + fp16 scale + fp16 zero per group; unquantized: X in the cache dtype.
    """
    layers, hidden, _, _ = _dims(config)
    if xquant.quantized:
        per_row = quant.packed_width(hidden, xquant.bits) + 2 * 2 * (hidden // xquant.group_size)
    else:
        per_row = hidden * dtype_bytes
    return batch_size * seq_len * (layers * per_row + 8)
