"""Cache forms: what one attention layer keeps instead of K and V, as registered data.

:data:`FORMS` lists every form; :func:`form_for` is the one place a layer's form is chosen, from the
config and the layer's widths. The cache allocates a layer's state from its form's spec, the memory
formulas evaluate the same spec, the rewrite asks the form to emit its store and rebuild, and the
simulation installs the form's hooks. A new form is a new module here and one entry in ``FORMS``
(see "Adding a cache form" in the README).
"""

from __future__ import annotations

from ..config import XQuantConfig
from .base import CacheForm, FusedSources, LayerShape, StateTensor, allocate
from .joint_latent import JointLatentForm
from .split_latent import SplitLatentForm
from .window import ModelWindowForm, XWindowForm
from .x import XDeltaForm, XForm

# In order: a layer's form is the first entry whose ``applies`` is true (a specialization goes before the
# form it specializes). Sliding-window layers take XWindowForm where its rows are smaller than the model's
# K/V window's, else ModelWindowForm; the four others are exclusive and cover every config and shape of a
# full-attention layer.
FORMS: list[type[CacheForm]] = [XWindowForm, ModelWindowForm, XForm, XDeltaForm, SplitLatentForm, JointLatentForm]


def form_for(xquant: XQuantConfig, layer_idx: int, shape: LayerShape) -> CacheForm:
    """The form of layer ``layer_idx`` with these widths under ``xquant``: the one place it is chosen."""
    for form in FORMS:
        if form.applies(xquant, layer_idx, shape):
            return form(xquant, layer_idx, shape)
    raise RuntimeError(f"no cache form applies to layer {layer_idx} ({shape}, {xquant.describe()})")


SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")


def layer_shapes(model_config) -> list[LayerShape]:
    """Each decoder layer's :class:`LayerShape`, from a transformers config: the widths, and the window of
    the layers transformers' StaticCache gives a sliding-window layer (its ``layer_types``)."""
    config = model_config.get_text_config(decoder=True) if hasattr(model_config, "get_text_config") else model_config
    if getattr(config, "kv_lora_rank", None):
        raise ValueError(
            f"this model uses multi-head latent attention (kv_lora_rank={config.kv_lora_rank}, as DeepSeek V2/V3): "
            "its cache already holds a compressed latent of K and V, not K and V from the layer's input X, so "
            "XQuantCache does not apply; use transformers' own cache for it.")
    heads = config.num_attention_heads
    kv_heads = _cached_kv_heads(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    types, windows = layer_types_and_windows(config)
    unsupported = sorted(set(types) - set(SUPPORTED_LAYER_TYPES))
    if unsupported:
        raise ValueError(
            f"XQuantCache supports full-attention and sliding-window layers ({', '.join(SUPPORTED_LAYER_TYPES)}); "
            f"this model also has layer types {unsupported}; use transformers' own cache for it."
        )
    return [LayerShape(config.hidden_size, kv_heads * head_dim, kv_heads, window) for window in windows]


def _cached_kv_heads(config) -> int:
    """How many K/V heads a layer of this (text) config writes into its cache."""
    if getattr(config, "multi_query", False) and not getattr(config, "new_decoder_architecture", False):
        return 1  # Falcon-7B's multi-query attention (its config's num_kv_heads counts the query heads)
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def layer_types_and_windows(config) -> tuple[list[str], list[int | None]]:
    """(attention type, sliding window or None) of each layer, as transformers' StaticCache reads them."""
    from transformers import PretrainedConfig
    from transformers.cache_utils import get_layer_types_and_kwargs

    if not isinstance(config, PretrainedConfig):  # e.g. a gpt-fast ModelArgs: layer_types, or one window
        window = getattr(config, "sliding_window", None)
        default = "sliding_attention" if window is not None else "full_attention"
        types = list(getattr(config, "layer_types", None) or [default] * config.num_hidden_layers)
        return types, [window if t == "sliding_attention" else None for t in types]
    types, kwargs = get_layer_types_and_kwargs(config)
    # transformers 5.17 and 5.18 return one kwargs dict for all layers, 5.19 on one per layer
    per_layer = kwargs if isinstance(kwargs, list) else [kwargs] * len(types)
    return list(types), [k.get("sliding_window") if t == "sliding_attention" else None
                         for t, k in zip(types, per_layer)]


__all__ = ["FORMS", "CacheForm", "FusedSources", "LayerShape", "StateTensor", "allocate", "form_for", "layer_shapes"]
