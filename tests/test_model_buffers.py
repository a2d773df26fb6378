"""Caches that are not an XQuantCache: a gpt-fast-style model whose K/V cache is a module buffer written
with ``k_cache[:, :, pos] = k``, configured by torch.compile(options=...); and transformers'
DynamicCache, which is reported and left unmodified."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache

import xq_compile as xq
from xq_compile.simulate import simulate_xquant

from conftest import tiny_llama, decode_inputs, max_error, run_calls


class Attention(nn.Module):
    def __init__(self, dim, heads, kv_heads, max_len, batch):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        shape = (batch, kv_heads, max_len, self.head_dim)
        self.register_buffer("k_cache", torch.zeros(shape), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape), persistent=False)

    def rope(self, x, cos, sin):  # x [B, H, S, D]; cos/sin [S, D] looked up at the token positions
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    def forward(self, x, cos, sin, mask, input_pos):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = self.rope(q, cos, sin), self.rope(k, cos, sin)
        self.k_cache[:, :, input_pos] = k
        self.v_cache[:, :, input_pos] = v
        keys, values = self.k_cache, self.v_cache
        if self.heads != self.kv_heads:
            group = self.heads // self.kv_heads
            keys = keys[:, :, None].expand(-1, -1, group, -1, -1).reshape(b, self.heads, -1, self.head_dim)
            values = values[:, :, None].expand(-1, -1, group, -1, -1).reshape(b, self.heads, -1, self.head_dim)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class GptFastStyle(nn.Module):
    """A hand-written decoder in the gpt-fast style: caches are buffers, positions come as input_pos."""

    def __init__(self, vocab=96, dim=64, heads=4, kv_heads=2, layers=2, max_len=32, batch=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.norms = nn.ModuleList(nn.RMSNorm(dim) for _ in range(layers))
        self.attn = nn.ModuleList(Attention(dim, heads, kv_heads, max_len, batch) for _ in range(layers))
        self.head = nn.Linear(dim, vocab, bias=False)
        head_dim = dim // heads
        inv = 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
        angles = torch.outer(torch.arange(max_len).float(), inv).repeat(1, 2)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)
        self.register_buffer("causal", torch.ones(max_len, max_len, dtype=torch.bool).tril(), persistent=False)

    def forward(self, idx, input_pos):
        x = self.embed(idx)
        cos, sin, mask = self.cos[input_pos], self.sin[input_pos], self.causal[None, None, input_pos]
        for norm, attn in zip(self.norms, self.attn):
            x = x + attn(norm(x), cos, sin, mask, input_pos)
        return self.head(x)


def steps(prompt=5, decode=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = [(torch.randint(0, 96, (2, prompt), generator=g), torch.arange(prompt))]
    out += [(torch.randint(0, 96, (2, 1), generator=g), torch.tensor([prompt + t])) for t in range(decode)]
    return out


def run(model, forward, calls):
    with torch.no_grad():
        return [forward(idx, pos) for idx, pos in calls]


def fresh_model(kv_heads):
    torch.manual_seed(0)
    model = GptFastStyle(kv_heads=kv_heads).eval()
    with torch.no_grad():
        for attn in model.attn:
            attn.k_proj.weight.mul_(4)
    return model


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_module_buffer_cache_is_rewritten_from_options_and_exact_unquantized(kv_heads):
    model, reference = fresh_model(kv_heads), fresh_model(kv_heads)
    calls = steps()
    forward = torch.compile(model, backend="xquant", options={"bits": None, "group_size": 16}, fullgraph=True)
    out = run(model, forward, calls)
    assert max_error(out, run(reference, reference, calls)) < 1e-4
    record = xq.COMPILE_LOG[-1]
    assert record.rewritten == 2
    assert all("state owned by the compiled model" in r.form for r in record.reports)


def test_options_quantized_matches_reference_and_release_frees_the_kv_buffers():
    model, reference = fresh_model(2), fresh_model(2)
    calls = steps(decode=8)
    options = {"bits": 4, "group_size": 16}
    forward = torch.compile(model, backend="xquant", options=options, fullgraph=True)
    out = run(model, forward, calls[:4])
    kv_bytes = sum(a.k_cache.untyped_storage().nbytes() + a.v_cache.untyped_storage().nbytes() for a in model.attn)
    assert xq.release_kv_buffers(model) == kv_bytes
    assert all(a.k_cache.untyped_storage().nbytes() == 4 for a in model.attn)
    out += run(model, forward, calls[4:])  # recompiles once against the released buffers
    with simulate_xquant(reference, xq.XQuantConfig(**options)):
        expected = run(reference, reference, calls)
    assert max_error(out, expected) < 2e-4


def test_module_buffers_without_options_are_left_alone():
    model, reference = fresh_model(2), fresh_model(2)
    calls = steps(decode=2)
    forward = torch.compile(model, backend=xq.make_xquant_backend("aot_eager"), fullgraph=True)
    with pytest.warns(UserWarning, match="not an XQuantCache"):
        out = run(model, forward, calls)
    assert max_error(out, run(reference, reference, calls)) < 1e-5


def test_dynamic_cache_is_reported_and_runs_unmodified():
    model = tiny_llama(num_kv_heads=2)
    calls = decode_inputs(steps=2)
    forward = torch.compile(model.forward, backend=xq.make_xquant_backend("aot_eager"), fullgraph=True)
    with pytest.warns(UserWarning, match="grows by torch.cat every step"):
        out = run_calls(forward, DynamicCache(config=model.config), calls)
    expected = run_calls(model.forward, DynamicCache(config=model.config), calls)
    assert max_error(out, expected) < 1e-5


def test_static_cache_with_options_is_rewritten_and_exact():
    from transformers import StaticCache

    from conftest import reference_logits

    model = tiny_llama(num_kv_heads=2)
    calls = decode_inputs(steps=3)
    cache = StaticCache(config=model.config, max_cache_len=32)
    cache.early_initialization(2, 2, 16, torch.float32, torch.device("cpu"))  # allocated before compiling
    forward = torch.compile(model.forward, backend="xquant", options={"bits": None, "group_size": 16}, fullgraph=True)
    out = run_calls(forward, cache, calls)
    assert max_error(out, reference_logits(model, calls, 32)) < 1e-4
    assert xq.COMPILE_LOG[-1].rewritten == 2
