"""``xq_compile::decode_attention``: one attention layer's decode output straight from the quantized cache.

For a few query tokens (decode, S = 1..16) and the ``n`` cached rows (``n`` = ``length``, read on the
device), per batch ``b`` and KV head ``h`` (query head ``i`` uses KV head ``i // group``, repeat_kv order):

    x̂k_j = key-source row j, dequantized                      (width Ck)
    k_j  = x̂k_j · Wk[h·D:(h+1)·D]ᵀ (+ bk),  (optionally RMS-normalized per head: k_norm_weight, Qwen3 /
           Gemma 3), then RoPE with cos[b, j], sin[b, j] (HF rotate_half; the tables given, or HF's
           default RoPE computed in the kernel from positions[b, j] and inv_freq)
    p    = softmax(cap(sm_scale · q·kᵀ) (+ mask))              (fp32; a fully masked row gives 0;
           cap(s) = soft_cap · tanh(s / soft_cap) where soft_cap > 0, Gemma 2)
    out  = (Σ_j p_j · x̂v_j) · Wv[h·D:(h+1)·D]ᵀ + (Σ_j p_j) · bv  (absorbed values: V is never built)

K and V are never written to memory. The CPU (default) kernel is the plain-torch reference
(:func:`reference_decode_attention`); the CUDA kernel is five Triton launches (see
:func:`decode_attention_triton`, block sizes from :func:`default_config`):

  1. ``_scores_kernel``   grid (B · KV-head tiles, row blocks of the capacity L): the K rebuild as one
     dequantize-GEMM tile per program -- ``block_n`` cached rows (dequantized once, ``block_c`` channels
     at a time, by :func:`xq_compile.kernels.tiles.dequant_tile`) times the Wkᵀ of ``block_h`` KV heads,
     one accumulator whose column halves are the two halves of every head, split after the loop so RoPE
     (fp32) pairs meet elementwise -- then the scores of those heads' query rows as one more dot with a
     block-diagonal query, scaled and masked (natural log domain, so an HF finfo.min float mask cannot
     overflow to -inf), written to a small fp32 scratch [B, Hkv, R, L]. Scores, not K: R·n floats
     instead of n·D. The tile is K = X̂·Wkᵀ with X̂ the register operand, so its MMAs stay in flight
     (``docs/kernels.md``).
  2. ``_softmax_kernel``  grid (B · query-row blocks, splits): per query row and chunk of the rows
     (split), the chunk's maximum score, p = exp(s - max) in the model dtype and Σ p.
  3. ``_values_kernel``   grid (B · query-row blocks, splits, Cv blocks): accᵀ += x̂vᵀ · pᵀ over one chunk
     of the rows (the softmax's) for one block of value channels, for the query rows of *all* KV heads at once (the
     value rows -- the X cache or the one value latent -- are the same for every head, so each
     dequantized tile serves them all; flash-decoding over the splits). X̂v is the register operand and
     p a tile loaded from memory, so these MMAs stay in flight too.
  4. ``_combine_kernel``  grid (B · query-row blocks, Cv blocks): combines the chunks (weights
     exp(max_chunk - max)) and normalizes, writing the mixed rows [B, Hkv·R, Cv] in the model dtype.
  5. ``_project_kernel``  grid (B·Hkv, D blocks): projects the mixed rows with Wv (tl.dot) and adds the
     bias, writing [B, Hq, S, D]. Stages 4 and 5 were one program per KV head; split over channels and
     output features they spread the partial sums and Wv over the GPU.

Why scores go through memory instead of one fused pass: the absorbed-value accumulator of a KV head's
query rows is [group·S, Cv] with Cv up to the hidden size (4096 for a 7B MHA model), too large for
registers next to the K tile, and splitting Cv across programs would rebuild K once per Cv block,
multiplying the dominant cost. The round trip (scores written in fp32 and read twice by the softmax, p
written in 16 bits and read by each block of value channels) costs R·n·(14 + 2·Cv/block_cv) bytes per KV
head, next to the 2·n·Ck·D FLOPs of its K rebuild.

Every launch reads ``n`` on the device (no ``.item()``, no host sync): a split whose chunk starts at or
past ``n`` does nothing but write an empty partial result (a row block past ``n`` returns at once), so
one CUDA graph serves every fill. The grids depend only on the capacity L and the shapes. ``length``
may hold one fill per batch row ([B], vLLM's seq_lens): each program reads its own row's.

Sliding window (``window`` > 0: Mistral, Gemma 2/3's local layers): query token s, at row n - S + s, sees
only rows j > n - S + s - window. Every launch computes the first row some token sees, lo = n - S + 1 -
window, on the device next to n: the scores kernel skips row blocks before it, the softmax and the values
kernel cut their splits from lo's row block and treat its rows before lo as absent (the values kernel
zeroes them: rows before lo may be freed pages of any bytes).

Paged sources (``block_table`` [B, max_blocks], vLLM's cache): the per-token sources (and col0) are
``[pages, page_size, ...]`` and row j of batch row b is row j % page_size of page
block_table[b, j // page_size] (:func:`xq_compile.kernels.tiles.cache_rows`); L = max_blocks ·
page_size. Everything indexed by position (cos/sin, positions, mask) stays [B, L, ...].

Row sources (the "key source" and the optional "value source"; omitted = the key source's rows, the MHA
X-cache case): ``per_token`` (exactly the format of :mod:`xq_compile.quant`) or ``per_channel`` (KIVI-style
GQA key latents, the open token group read from a model-dtype tail); see :class:`QuantizedSource`. ``col0``
fp16 [B, L] (optional) replaces channel 0 of the dequantized key-source rows (and of the value rows of a
shared source).

Modules: ``inputs`` (:class:`QuantizedSource`, :class:`DecodeAttentionInputs` and their checks: the op's
flat arguments become these once, at the op boundary), ``op`` (the custom op), ``reference`` (the torch
reference, the CPU kernel), ``config`` (launch configuration, for the
:class:`~xq_compile.kernels.devices.GpuTarget` it launches on),
``triton_kernels`` (the kernels and their launcher).

Triton is optional: without it the package imports and the CPU kernel works; only dispatching CUDA
tensors to the op raises (asking to install triton).
"""

from xq_compile.kernels.decode_attention.config import (CONFIG_KEYS, GLUON_AUTO, check_overrides, config_overrides,
                                                        default_config, resolve_config)
from xq_compile.kernels.decode_attention.inputs import LAYOUTS, DecodeAttentionInputs, QuantizedSource
from xq_compile.kernels.decode_attention.op import decode_attention
from xq_compile.kernels.decode_attention.reference import (reference_decode_attention, rope_tables, rotate_half,
                                                           source_rows)
from xq_compile.kernels.decode_attention.triton_kernels import HAS_TRITON, decode_attention_triton
from xq_compile.kernels.devices import GpuTarget, gpu_target  # the launcher's ``target``

__all__ = [
    "CONFIG_KEYS", "GLUON_AUTO", "GpuTarget", "HAS_TRITON", "LAYOUTS", "DecodeAttentionInputs", "QuantizedSource",
    "check_overrides", "config_overrides", "decode_attention", "decode_attention_triton", "default_config",
    "gpu_target", "reference_decode_attention", "resolve_config", "rope_tables", "rotate_half", "source_rows",
]
