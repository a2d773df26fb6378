"""vLLM glue: the XQUANT attention backend, the attention layer that owns a layer's X pages, and the
Llama, Qwen2, Qwen3, Gemma 2 and Gemma 3 attention modules that feed it X instead of K and V.

Needs vLLM (``pip install xq-compile[vllm]``); the computation itself is :mod:`xq_compile.vllm.paged`.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from vllm.config import VllmConfig, get_current_vllm_config
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import GemmaRMSNorm, RMSNorm
from vllm.model_executor.layers.rotary_embedding import RotaryEmbedding
from vllm.model_executor.models.gemma2 import Gemma2Attention
from vllm.model_executor.models.gemma3 import Gemma3Attention
from vllm.model_executor.models.llama import LlamaAttention
from vllm.model_executor.models.qwen2 import Qwen2Attention
from vllm.model_executor.models.qwen3 import Qwen3Attention
from vllm.v1.attention.backend import (AttentionBackend, AttentionImpl, AttentionMetadataBuilder, AttentionType,
                                       CommonAttentionMetadata)
from vllm.v1.kv_cache_interface import AttentionSpec, FullAttentionSpec, SlidingWindowSpec

from ..config import XQuantConfig
from ..kernels.devices import triton_kernels_serve
from ..latent import latent_width
from ..rotation import fold_into_weight, hadamard
from . import decode_config_of, paged
from .layout import bytes_per_token, token_state_layout

BACKEND_NAME = "XQUANT"


def plain_neox_inv_freq(rotary) -> torch.Tensor | None:
    """The rotary frequencies (fp32 [head_size / 2]) when ``rotary`` is vLLM's plain neox RoPE over the whole
    head -- what the fused decode kernel computes from the positions -- else None (scaled or partial
    RoPE: the torch path applies the model's own rotary). vLLM's own formula, so the kernel's angles
    pos·inv_freq are those of the model's cos/sin cache."""
    if type(rotary) is not RotaryEmbedding or not rotary.is_neox_style or rotary.rotary_dim != rotary.head_size:
        return None
    return 1.0 / (rotary.base ** (torch.arange(0, rotary.rotary_dim, 2, dtype=torch.float) / rotary.rotary_dim))


def fused_key_norm(norm) -> paged.KeyNorm | None:
    """The keys' per-head RMSNorm as the fused decode kernel applies it, when ``norm`` is vLLM's RMSNorm
    (Qwen3: x · rsqrt(mean(x²) + eps) · w) or GemmaRMSNorm (Gemma 3: the same times 1 + w), else None (the
    torch path applies the module itself). Read once the weights are loaded."""
    if type(norm) is RMSNorm and norm.variance_size_override is None:
        weight = norm.weight.detach().float()
    elif type(norm) is GemmaRMSNorm:
        weight = norm.weight.detach().float() + 1.0
    else:
        return None
    return paged.KeyNorm(weight=weight.contiguous(), eps=float(norm.variance_epsilon))


def xquant_of(hf_config) -> XQuantConfig:
    """The XQuantConfig that :func:`xq_compile.vllm.engine_args` put into the model's config."""
    options = getattr(hf_config, "xquant", None)
    if options is None:
        raise ValueError(
            "this model class serves with an X cache and needs an XQuantConfig: build the engine with "
            "vllm.LLM(model, **xq_compile.vllm.engine_args(XQuantConfig(...)))"
        )
    from . import check_servable

    xquant = XQuantConfig.from_options(options)
    check_servable(xquant)
    return xquant


# --------------------------------------------------------------------------------------------------
# backend


@dataclasses.dataclass
class XQuantMetadata:
    batch: paged.PagedBatch
    num_actual_tokens: int


class XQuantMetadataBuilder(AttentionMetadataBuilder[XQuantMetadata]):
    def __init__(self, kv_cache_spec, layer_names: list[str], vllm_config: VllmConfig, device: torch.device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> XQuantMetadata:
        m = common_attn_metadata
        batch = paged.PagedBatch(query_start_loc=m.query_start_loc, seq_lens=m.seq_lens,
                                 block_table=m.block_table_tensor, slot_mapping=m.slot_mapping,
                                 max_query_len=m.max_query_len, max_seq_len=m.max_seq_len)
        return XQuantMetadata(batch=batch, num_actual_tokens=m.num_actual_tokens)


class XQuantAttentionImpl(AttentionImpl[XQuantMetadata]):
    """Holds the layer's settings only: the computation runs in ``torch.ops.xq_compile.vllm_attention``,
    which needs X, not the K and V that vLLM's attention interface passes."""

    def __init__(self, num_heads, head_size, scale, num_kv_heads=None, alibi_slopes=None, sliding_window=None,
                 kv_cache_dtype="auto", logits_soft_cap=None, attn_type=AttentionType.DECODER,
                 kv_sharing_target_layer_name=None, **extra) -> None:
        # sliding_window: the layer (XQuantPagedAttention) applies it
        asked = {"alibi_slopes": alibi_slopes, "logits_soft_cap": logits_soft_cap,
                 "kv_sharing_target_layer_name": kv_sharing_target_layer_name, **extra}
        unsupported = {name: value for name, value in asked.items() if value is not None}
        if unsupported or attn_type != AttentionType.DECODER or kv_cache_dtype != "auto":
            raise NotImplementedError(
                f"the XQuant X cache serves plain causal decoder attention; this layer asks for {unsupported}, "
                f"attn_type={attn_type}, kv_cache_dtype={kv_cache_dtype!r}. Serve this model without "
                "xq_compile.vllm.engine_args (stock vLLM).")
        self.num_heads, self.head_size, self.scale = num_heads, head_size, scale
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype

    def forward(self, *args, **kwargs):
        raise RuntimeError("XQuant attention reads X, not K/V: it runs through torch.ops.xq_compile.vllm_attention")


class XQuantAttentionBackend(AttentionBackend):
    forward_includes_kv_cache_update = True  # the op writes the X rows itself
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto"]

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_impl_cls():
        return XQuantAttentionImpl

    @staticmethod
    def get_builder_cls():
        return XQuantMetadataBuilder


# --------------------------------------------------------------------------------------------------
# the op: opaque to torch.compile, like vLLM's own attention op


@torch.library.custom_op("xq_compile::vllm_attention", mutates_args=("output",))
def vllm_attention(query: torch.Tensor, x: torch.Tensor, output: torch.Tensor, layer_name: str) -> None:
    """Store the new tokens' X in the layer's pages, attend over every request's rows, write ``output``."""
    context = get_forward_context()
    layer = context.no_compile_layers[layer_name]
    metadata = context.attn_metadata
    if isinstance(metadata, dict):
        metadata = metadata.get(layer_name)
    if metadata is None:  # a profiling / warm-up run without a cache
        output.zero_()
        return
    layer.run(query, x, output, metadata)


@vllm_attention.register_fake
def _vllm_attention_fake(query, x, output, layer_name) -> None:
    return None


class XQuantPagedAttention(Attention):
    """An attention layer whose cache pages hold, per token, the packed X (the X form) or the packed key and
    value latents of this rank's heads (the GQA latent form); see layout.py and paged.py.

    ``sliding_window``: the stock layer's (vLLM's ``Attention.sliding_window``: its own per-layer window, or
    the model's global one). Such a layer asks vLLM for a sliding-window cache, whose blocks behind the
    window vLLM frees, and attends over the last ``sliding_window`` rows. ``logits_soft_cap``: Gemma 2's
    attention-logit soft-capping."""

    def __init__(self, *, num_heads: int, head_dim: int, scale: float, num_kv_heads: int, total_num_kv_heads: int,
                 hidden_size: int, xquant: XQuantConfig, rotary_emb, cache_config, prefix: str,
                 decode_config: dict | None = None, key_norm=None, sliding_window: int | None = None,
                 logits_soft_cap: float | None = None) -> None:
        super().__init__(num_heads, head_dim, scale, num_kv_heads=num_kv_heads, cache_config=cache_config,
                         prefix=prefix, attn_backend=XQuantAttentionBackend,
                         per_layer_sliding_window=sliding_window)
        self.xquant = xquant
        self.logits_soft_cap = logits_soft_cap
        self.decode_config = decode_config or {}  # the fused decode's kernel configuration (engine_args)
        self.latent = xquant.form_of(hidden_size, total_num_kv_heads * head_dim) == "latent"
        self.total_num_kv_heads = total_num_kv_heads
        # A latent row is [key latent | value latent] of this rank's heads: each quantized in whole groups.
        width = latent_width(num_kv_heads, head_dim, hidden_size)
        if self.latent and xquant.quantized and width % xquant.group_size:
            raise NotImplementedError(
                f"the latent form quantizes each rank's {width}-wide key and value latents in groups of "
                f"{xquant.group_size}: pass an XQuantConfig(group_size=...) dividing {width}, or form='x'")
        self.row_width = 2 * width if self.latent else hidden_size
        self.layout = token_state_layout(xquant, self.row_width, torch.get_default_dtype())
        self._rotary = (rotary_emb,)  # a tuple: the module belongs to the parent, not registered twice
        # Qwen3, Gemma 3: the keys' per-head RMSNorm before RoPE, applied to the rebuilt keys (the parent's module)
        self._key_norm = (key_norm,) if key_norm is not None else ()
        # decode batches on CUDA: the fused kernel reading the pages, where it computes this RoPE and can view
        # these rows as its sources (it applies the window and the cap too; the key norm where it knows its
        # formula, decided once the weights are loaded: set_projection)
        self.fused_inv_freq = plain_neox_inv_freq(rotary_emb) if paged.pages_readable(self.layout) else None
        self.fused_key_norm: paged.KeyNorm | None = None
        self.projection: paged.Projection | None = None
        # bits=None reproduces the unmodified model exactly: nothing to spread, no rotation.
        self.rotation = (hadamard(xquant.group_size) if xquant.rotation == "hadamard" and xquant.quantized
                         else None)

    def get_kv_cache_spec(self, vllm_config: VllmConfig) -> AttentionSpec:
        # One "head" of state_content_bytes per token: vLLM's block manager then sizes the cache in those
        # bytes. X form: every tensor-parallel rank stores all of X (it rebuilds only its own heads), a
        # replica: max_tp_shards=1. Latent form: each rank stores its own heads' latents, as many distinct
        # shards as K/V heads. Every layer's page has the same size, so the sliding-window layers of a
        # hybrid model share the pool with the full-attention ones.
        spec = dict(block_size=vllm_config.cache_config.block_size, num_kv_heads=1, head_size=self.row_width,
                    dtype=torch.uint8, max_tp_shards=self.total_num_kv_heads if self.latent else 1,
                    state_content_bytes=bytes_per_token(self.layout))
        if self.sliding_window is not None:
            return SlidingWindowSpec(**spec, sliding_window=self.sliding_window)
        return FullAttentionSpec(**spec)

    def set_projection(self, k_weight, k_bias, v_weight, v_bias) -> None:
        """Keep this rank's rebuild weights (once): W_k, W_v folded with the rotation (X form), or the latent
        factors of W_k and W_v (latent form, the rotation in the factors)."""
        shape = dict(num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=self.head_size,
                     scale=self.impl.scale)
        h = None if self.rotation is None else self.rotation.to(k_weight.device)
        if self.fused_inv_freq is not None:
            self.fused_inv_freq = self.fused_inv_freq.to(k_weight.device)
            if self._key_norm:
                self.fused_key_norm = fused_key_norm(self._key_norm[0])
                if self.fused_key_norm is None:  # a norm the kernel does not compute: the torch path
                    self.fused_inv_freq = None
        if self.latent:
            self.projection = paged.latent_projection(k_weight, k_bias, v_weight, v_bias, h, **shape)
            self.rotation = None  # the stored latents come out of the factors already rotated
            return
        if h is not None:
            k_weight, v_weight = fold_into_weight(k_weight, h), fold_into_weight(v_weight, h)
            self.rotation = h
        self.projection = paged.Projection(k_weight=k_weight.contiguous(), v_weight=v_weight.contiguous(),
                                           k_bias=k_bias, v_bias=v_bias, **shape)

    def forward(self, query: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        output = torch.empty(query.shape[0], self.num_heads * self.head_size, dtype=query.dtype, device=query.device)
        torch.ops.xq_compile.vllm_attention(query, x, output, self.layer_name)
        return output

    def run(self, query: torch.Tensor, x: torch.Tensor, output: torch.Tensor, metadata: XQuantMetadata) -> None:
        if self.projection is None:
            raise RuntimeError(f"{self.layer_name}: K/V weights were never handed over (model not loaded?)")
        batch, n = metadata.batch, metadata.num_actual_tokens
        pages = self.kv_cache
        paged.store(pages, batch.slot_mapping[:n], self.projection.row_source(x[:n]), self.layout, self.xquant,
                    self.rotation)
        if self._fused_decode(pages, batch, n):
            requests = batch.seq_lens.shape[0]  # token r is request r's new token; tokens past them padding
            output[:requests] = paged.fused_decode(query[:requests], pages, batch, self.layout, self.xquant,
                                                   self.projection, self.fused_inv_freq, self.decode_config,
                                                   self.sliding_window, self.logits_soft_cap, self.fused_key_norm)
            output[requests:] = 0
            return
        # static shapes on CUDA (graph capture), only the rows held on CPU
        rows, valid = paged.gather(pages, batch, self.layout, self.xquant, query.dtype, static=pages.is_cuda,
                                   window=self.sliding_window)
        absorb = paged.absorb_values(self.xquant, batch.max_query_len, self.projection)
        out = paged.attend(query[:n], rows, valid, batch, self.projection, self._keys_at, absorb,
                           window=self.sliding_window, soft_cap=self.logits_soft_cap)
        output[:n] = out
        output[n:] = 0

    def _keys_at(self, positions: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """The rebuilt keys [T, heads * head_dim] as the model's attention sees them: its key norm (Qwen3,
        Gemma 3), then its RoPE at ``positions``."""
        if self._key_norm:
            keys = self._key_norm[0](keys.unflatten(-1, (-1, self.head_size))).flatten(-2)
        rotary = self._rotary[0]
        if hasattr(rotary, "forward_native"):  # vLLM's rotary custom ops: the keys alone, no in-place kernel
            return rotary.forward_native(positions, keys)[0]
        # a plain module (Phi-3's LongRoPE) wants a query and a key: the keys as both, the key's result
        return rotary(positions, keys, keys)[1]

    def _fused_decode(self, pages: torch.Tensor, batch: paged.PagedBatch, num_tokens: int) -> bool:
        """Whether this step takes paged.fused_decode: on a GPU the Triton kernels serve (compute capability
        8.0 on; on CPU the op would run its torch reference, no faster than the torch path), a decode batch and a layer whose RoPE and
        rows the kernel reads. A decode batch: at most one new token per request, and a token for each
        (host integers of the metadata, no sync). vLLM's CUDA graphs pad the batch with requests of
        seq_len 0 (their output is 0) and tokens of slot -1 (stored into the null block), both after
        the real ones."""
        if not triton_kernels_serve(pages.device) or self.fused_inv_freq is None:
            return False
        return batch.max_query_len == 1 and num_tokens >= batch.seq_lens.shape[0]


# --------------------------------------------------------------------------------------------------
# the model side: a family's attention module with X in, the same projections and RoPE


class XCacheAttention:
    """What turns a vLLM attention module of the Llama shape (fused ``qkv_proj``, ``rotary_emb``, ``o_proj``,
    ``attn``; per-head ``q_norm``/``k_norm`` before RoPE where the family has them) into one that caches X:
    mixed in before the family's own class (``LlamaAttention``, ``Qwen2Attention``, ...), whose ``__init__``
    builds the weights; :meth:`use_x_cache` then replaces its ``attn`` layer. The model is not copied."""

    family: ClassVar[str]

    @classmethod
    def unsupported(cls, stock) -> list[str]:
        """The features of ``stock`` (a module of the family's class) that the X cache does not serve."""
        return []

    @classmethod
    def replacing(cls, stock, config, cache_config, prefix: str):
        """For a family whose decoder layer builds its attention itself (it takes no attention class, as
        Llama's does): turn the stock module into this class after the fact. Changing the class keeps the
        module's weights, projections, norms and rotary as vLLM built them (nothing allocated twice); the
        two classes differ only in methods, then :meth:`use_x_cache` swaps the attention layer."""
        unsupported = cls.unsupported(stock)
        if unsupported:
            raise NotImplementedError(f"the XQuant X cache serves {cls.family} without {', '.join(unsupported)}; "
                                      "serve this model without xq_compile.vllm.engine_args (stock vLLM).")
        stock.__class__ = cls
        stock.use_x_cache(config, stock.hidden_size, cache_config, prefix)
        return stock

    def use_x_cache(self, config, hidden_size: int, cache_config, prefix: str) -> None:
        xquant = xquant_of(config)
        # The stock layer registered itself under this name; ours takes its place (with its window).
        forward_context = get_current_vllm_config().compilation_config.static_forward_context
        del forward_context[self.attn.layer_name]
        self.attn = XQuantPagedAttention(
            num_heads=self.num_heads, head_dim=self.head_dim, scale=self.scaling, num_kv_heads=self.num_kv_heads,
            total_num_kv_heads=self.total_num_kv_heads, hidden_size=hidden_size, xquant=xquant, rotary_emb=self.rotary_emb, cache_config=cache_config,
            prefix=f"{prefix}.attn", decode_config=decode_config_of(config), key_norm=getattr(self, "k_norm", None),
            sliding_window=self.attn.sliding_window, logits_soft_cap=self.attention_logit_cap(config))

    def attention_logit_cap(self, config) -> float | None:
        """The family's attention-logit soft cap (vLLM hands it to the stock layer's backend only)."""
        return None

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, _ = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        # as the stock layer does (k is dropped: rebuilt from X)
        q, _ = self.rotary_emb(positions, self.normed_queries(q), k)
        output, _ = self.o_proj(self.attn(q, hidden_states))
        return output

    def normed_queries(self, q: torch.Tensor) -> torch.Tensor:
        """The queries before RoPE: as projected (Llama, Qwen2), or through the family's per-head RMSNorm
        (Qwen3, Gemma 3; the keys' is applied to the rebuilt keys, XQuantPagedAttention._keys_at)."""
        q_norm = getattr(self, "q_norm", None)
        return q if q_norm is None else q_norm(q.unflatten(-1, (-1, self.head_dim))).flatten(-2)

    def hand_over_kv_weights(self) -> None:
        """Copy this rank's K/V rows of the fused qkv weight (and bias: Qwen2) to the attention layer. Called
        right after loading: on CPU, vLLM then repacks qkv_proj for oneDNN and frees its weight."""
        weight, bias = self.qkv_proj.weight.detach(), self.qkv_proj.bias
        k_rows = slice(self.q_size, self.q_size + self.kv_size)
        v_rows = slice(self.q_size + self.kv_size, self.q_size + 2 * self.kv_size)
        self.attn.set_projection(weight[k_rows].clone(), None if bias is None else bias.detach()[k_rows].clone(),
                                 weight[v_rows].clone(), None if bias is None else bias.detach()[v_rows].clone())


def refuse_quantized_checkpoint(quant_config) -> None:
    if quant_config is not None:
        raise NotImplementedError("XQuant rebuilds K/V from dense K/V weights: quantized checkpoints are "
                                  "not supported; serve a dense model.")


class XQuantLlamaAttention(XCacheAttention, LlamaAttention):
    """vLLM's LlamaAttention (Llama, Mistral) caching X. Passed to vLLM's LlamaDecoderLayer as
    ``attn_layer_type``."""

    family = "Llama"

    def __init__(self, config, hidden_size: int, num_heads: int, num_kv_heads: int, *args, quant_config=None,
                 cache_config=None, prefix: str = "", **kwargs) -> None:
        refuse_quantized_checkpoint(quant_config)
        super().__init__(config, hidden_size, num_heads, num_kv_heads, *args, quant_config=quant_config,
                         cache_config=cache_config, prefix=prefix, **kwargs)
        self.use_x_cache(config, hidden_size, cache_config, prefix)


class XQuantQwen2Attention(XCacheAttention, Qwen2Attention):
    """vLLM's Qwen2Attention (q/k/v biases) caching X (:meth:`~XCacheAttention.replacing`: vLLM's Qwen2
    decoder layer builds its attention itself)."""

    family = "Qwen2"

    @classmethod
    def unsupported(cls, stock: Qwen2Attention) -> list[str]:
        return [name for name, on in (("qk_norm", stock.qk_norm),
                                      ("dual_chunk_attention_config", stock.dual_chunk_attention_config)) if on]


class XQuantQwen3Attention(XCacheAttention, Qwen3Attention):
    """vLLM's Qwen3Attention caching X: per-head RMSNorms of q and k before RoPE, the keys' applied to the
    rebuilt keys."""

    family = "Qwen3"

    @classmethod
    def unsupported(cls, stock: Qwen3Attention) -> list[str]:
        return ["dual_chunk_attention_config"] if stock.dual_chunk_attention_config else []


class XQuantGemma2Attention(XCacheAttention, Gemma2Attention):
    """vLLM's Gemma2Attention caching X: attention-logit soft-capping, ``query_pre_attn_scalar`` in the scale,
    a sliding window on every other layer."""

    family = "Gemma 2"

    def attention_logit_cap(self, config) -> float | None:
        return config.attn_logit_softcapping


class XQuantGemma3Attention(XCacheAttention, Gemma3Attention):
    """vLLM's Gemma3Attention (text: ``Gemma3ForCausalLM``) caching X: per-head RMSNorms of q and k before
    RoPE (as Qwen3's), ``query_pre_attn_scalar`` in the scale, and on the sliding layers (5 of 6 in the
    released models) a window and their own RoPE base -- each layer's own ``rotary_emb`` and window."""

    family = "Gemma 3"

    @classmethod
    def unsupported(cls, stock: Gemma3Attention) -> list[str]:
        return [] if stock.attn.attn_type == AttentionType.DECODER else ["bidirectional attention (is_causal=False)"]
