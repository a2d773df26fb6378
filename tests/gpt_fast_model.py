"""A decoder written the way gpt-fast (pytorch-labs/gpt-fast) writes its ``model.py`` and ``generate.py``.

Only the sizes are tiny; the code paths a compiler sees are gpt-fast's:

* ``Transformer.setup_caches(max_batch_size, max_seq_length)`` rounds the length up to a multiple of 8,
  gives every attention layer a ``KVCache`` module whose ``k_cache``/``v_cache`` buffers are written with
  ``k_out[:, :, input_pos] = k_val``, and sets ``freqs_cis`` (RoPE as the real and imaginary parts of
  ``torch.polar``, for ``block_size`` positions) and ``causal_mask`` as plain tensor attributes;
* ``forward(idx, input_pos)`` indexes them with ``input_pos``: ``causal_mask[None, None, input_pos]``;
* attention projects q, k and v with one fused ``wqkv`` linear and splits it, applies the rotary
  embedding on ``[B, S, H, D]`` before the transpose, expands GQA heads with ``repeat_interleave`` and
  calls SDPA with the boolean mask;
* ``generate_logits`` (the model compiled) and ``generate_greedy`` (``prefill`` and ``decode_one_token``
  compiled, the model an argument, as ``generate.py`` compiles them) prefill with
  ``input_pos = torch.arange(T)`` and then decode one token at a time with an int32
  ``input_pos = torch.tensor([T])`` incremented in place, as ``generate.py`` does (greedy here, not
  sampled, so that runs are comparable).

``rope="complex"`` swaps in the other common way to write the same rotation (``view_as_complex`` on a
complex ``freqs_cis``, as Meta's Llama reference code does).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


@dataclasses.dataclass
class ModelArgs:
    block_size: int = 64        # positions the RoPE table covers (gpt-fast: the model's context length)
    vocab_size: int = 96
    n_layer: int = 2
    n_head: int = 4
    dim: int = 64
    n_local_heads: int = -1     # K/V heads; -1: as many as query heads (MHA)
    intermediate_size: int = 128
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    rope: str = "real"          # "real": gpt-fast's stacked (cos, sin) table; "complex": view_as_complex

    def __post_init__(self):
        if self.n_local_heads == -1:
            self.n_local_heads = self.n_head
        self.head_dim = self.dim // self.n_head


class KVCache(nn.Module):
    def __init__(self, max_batch_size, max_seq_length, n_heads, head_dim, dtype):
        super().__init__()
        shape = (max_batch_size, n_heads, max_seq_length, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype))
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype))

    def update(self, input_pos, k_val, v_val):
        assert input_pos.shape[0] == k_val.shape[2]
        k_out, v_out = self.k_cache, self.v_cache
        k_out[:, :, input_pos] = k_val
        v_out[:, :, input_pos] = v_val
        return k_out, v_out


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class FeedForward(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.intermediate_size, bias=False)
        self.w3 = nn.Linear(config.dim, config.intermediate_size, bias=False)
        self.w2 = nn.Linear(config.intermediate_size, config.dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def precompute_freqs_cis(seq_len: int, n_elem: int, base: float, dtype: torch.dtype, complex_table: bool):
    """RoPE angles for positions [0, seq_len) as unit complex numbers: [seq_len, n_elem/2] complex,
    or (gpt-fast) their real and imaginary parts stacked: [seq_len, n_elem/2, 2] in the model's dtype."""
    freqs = 1.0 / (base ** (torch.arange(0, n_elem, 2)[: n_elem // 2].float() / n_elem))
    angles = torch.outer(torch.arange(seq_len).float(), freqs)
    table = torch.polar(torch.ones_like(angles), angles)
    return table if complex_table else torch.stack([table.real, table.imag], dim=-1).to(dtype)


def apply_rotary_emb(x, freqs_cis):
    """gpt-fast's form: x [B, S, H, D] as D/2 (re, im) pairs, rotated with real arithmetic."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    freqs_cis = freqs_cis.view(1, pairs.size(1), 1, pairs.size(3), 2)
    rotated = torch.stack([
        pairs[..., 0] * freqs_cis[..., 0] - pairs[..., 1] * freqs_cis[..., 1],
        pairs[..., 1] * freqs_cis[..., 0] + pairs[..., 0] * freqs_cis[..., 1],
    ], -1)
    return rotated.flatten(3).type_as(x)


def apply_rotary_emb_complex(x, freqs_cis):
    """The same rotation as a complex product (Meta's Llama reference code)."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    freqs_cis = freqs_cis.view(1, pairs.size(1), 1, pairs.size(3))
    return torch.view_as_real(pairs * freqs_cis).flatten(3).type_as(x)


class Attention(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        self.wqkv = nn.Linear(config.dim, (config.n_head + 2 * config.n_local_heads) * config.head_dim, bias=False)
        self.wo = nn.Linear(config.dim, config.dim, bias=False)
        self.kv_cache = None
        self.n_head, self.n_local_heads, self.head_dim, self.dim = (config.n_head, config.n_local_heads,
                                                                    config.head_dim, config.dim)
        self.rotary = apply_rotary_emb_complex if config.rope == "complex" else apply_rotary_emb

    def forward(self, x, freqs_cis, mask, input_pos):
        bsz, seqlen, _ = x.shape
        kv_size = self.n_local_heads * self.head_dim
        q, k, v = self.wqkv(x).split([self.dim, kv_size, kv_size], dim=-1)
        q = q.view(bsz, seqlen, self.n_head, self.head_dim)
        k = k.view(bsz, seqlen, self.n_local_heads, self.head_dim)
        v = v.view(bsz, seqlen, self.n_local_heads, self.head_dim)
        q, k = self.rotary(q, freqs_cis), self.rotary(k, freqs_cis)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v)
        k = k.repeat_interleave(self.n_head // self.n_local_heads, dim=1)
        v = v.repeat_interleave(self.n_head // self.n_local_heads, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0)
        return self.wo(y.transpose(1, 2).contiguous().view(bsz, seqlen, self.dim))


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)

    def forward(self, x, input_pos, freqs_cis, mask):
        h = x + self.attention(self.attention_norm(x), freqs_cis, mask, input_pos)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.freqs_cis = None
        self.max_batch_size = self.max_seq_length = -1

    def setup_caches(self, max_batch_size: int, max_seq_length: int) -> None:
        if self.max_seq_length >= max_seq_length and self.max_batch_size >= max_batch_size:
            return
        max_seq_length = find_multiple(max_seq_length, 8)
        self.max_seq_length, self.max_batch_size = max_seq_length, max_batch_size
        dtype = self.output.weight.dtype
        for block in self.layers:
            block.attention.kv_cache = KVCache(max_batch_size, max_seq_length, self.config.n_local_heads,
                                               self.config.head_dim, dtype)
        self.freqs_cis = precompute_freqs_cis(self.config.block_size, self.config.head_dim, self.config.rope_base,
                                              dtype, complex_table=self.config.rope == "complex")
        self.causal_mask = torch.tril(torch.ones(max_seq_length, max_seq_length, dtype=torch.bool))

    def forward(self, idx, input_pos):
        assert self.freqs_cis is not None, "Caches must be initialized first"
        mask = self.causal_mask[None, None, input_pos]
        freqs_cis = self.freqs_cis[input_pos]
        x = self.tok_embeddings(idx)
        for layer in self.layers:
            x = layer(x, input_pos, freqs_cis, mask)
        return self.output(self.norm(x))


def tiny_gpt_fast(n_local_heads: int = -1, dtype: torch.dtype = torch.float32, seed: int = 0,
                  max_batch_size: int = 1, max_seq_length: int = 30, **config) -> Transformer:
    """Random weights, caches set up; K rows of ``wqkv`` scaled so that K errors visibly move the logits."""
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(n_local_heads=n_local_heads, **config)).eval()
    with torch.no_grad():
        q_and_k = model.config.dim + model.config.n_local_heads * model.config.head_dim
        for block in model.layers:
            block.attention.wqkv.weight[:q_and_k].mul_(4)
    model.to(dtype)
    model.setup_caches(max_batch_size, max_seq_length)
    return model


def generate_logits(forward, prompt: torch.Tensor, next_tokens: torch.Tensor) -> list[torch.Tensor]:
    """Prefill ``prompt`` [B, T], then feed ``next_tokens`` [B, steps] one per call, with the positions
    gpt-fast's ``generate`` passes (prefill: arange(T), int64; decode: an int32 [1] tensor incremented in
    place). The tokens are given rather than sampled so that two models see the same inputs.
    Returns every call's logits."""
    with torch.no_grad():
        T = prompt.shape[1]
        logits = [forward(prompt, torch.arange(0, T))]
        input_pos = torch.tensor([T], dtype=torch.int)
        for step in range(next_tokens.shape[1]):
            logits.append(forward(next_tokens[:, step:step + 1], input_pos))
            input_pos += 1
        return logits


def prefill(model, x, input_pos):
    """generate.py's prefill, greedy instead of sampled: (next token, logits)."""
    logits = model(x, input_pos)
    return logits[:, -1].argmax(-1, keepdim=True), logits


def decode_one_token(model, x, input_pos):
    assert input_pos.shape[-1] == 1
    logits = model(x, input_pos)
    return logits[:, -1].argmax(-1, keepdim=True), logits


def generate_greedy(prefill_fn, decode_fn, model, prompt: torch.Tensor, max_new_tokens: int):
    """generate.py's loop with the given (compiled or plain) prefill and decode functions:
    (generated tokens, every call's logits)."""
    with torch.no_grad():
        token, logits = prefill_fn(model, prompt, torch.arange(0, prompt.shape[1]))
        tokens, all_logits = [token], [logits]
        input_pos = torch.tensor([prompt.shape[1]], dtype=torch.int)
        for _ in range(max_new_tokens - 1):
            token, logits = decode_fn(model, token.view(1, -1), input_pos)
            input_pos += 1
            tokens.append(token)
            all_logits.append(logits)
        return torch.cat(tokens, dim=1), all_logits


def random_tokens(batch: int = 1, prompt: int = 8, steps: int = 8, vocab: int = 96, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, prompt), generator=g), torch.randint(0, vocab, (batch, steps), generator=g)
