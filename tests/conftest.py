"""Shared fixtures: tiny random-weight Llama models and a prefill + decode driver."""

from __future__ import annotations

import contextlib
import functools
from unittest import mock

import pytest
import torch
import torch._dynamo
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache
from xq_compile.cache import cache_kwargs
from xq_compile.forms import split_latent
from xq_compile.latent import fake_quantize_key_latent


def tiny_llama(num_kv_heads: int = 4, num_layers: int = 2, hidden: int = 64, heads: int = 4,
               bias: bool = False, seed: int = 0, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=num_layers, num_attention_heads=heads,
                         num_key_value_heads=num_kv_heads, max_position_embeddings=512,
                         attention_bias=bias)
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config).eval().to(dtype)
    # Random init gives near-uniform logits; scale up so that errors in K/V visibly move them.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4)
            layer.self_attn.k_proj.weight.mul_(4)
    return model


def random_model(config, attention: str = "sdpa", seed: int = 0):
    """A transformers causal LM of ``config`` with random weights (the same for the same seed whatever the
    variant), large enough that K/V errors, a window and the norms visibly move the logits: q/k projections
    x4, q/k norm weights and attention sinks (zeros or tiny at init) drawn N(0, 1)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config._attn_implementation = attention
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ("k_proj", "q_proj")):
                p.mul_(4)
            elif name.endswith(("q_norm.weight", "k_norm.weight", "sinks")):
                p.normal_(0, 1)
    return model


def decode_inputs(batch: int = 2, prompt: int = 6, steps: int = 16, pad: int = 2, seed: int = 1):
    """Prompt (row 1 left-padded by ``pad``) plus ``steps`` single-token decode steps."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (batch, prompt), generator=g)
    mask = torch.ones(batch, prompt, dtype=torch.long)
    if batch > 1:
        mask[1, :pad] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    calls = [dict(input_ids=ids, attention_mask=mask, position_ids=positions)]
    last = positions[:, -1:]
    for t in range(steps):
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=torch.long)], 1)
        calls.append(dict(input_ids=torch.randint(0, 128, (batch, 1), generator=g), attention_mask=mask,
                          position_ids=last + t + 1))
    return calls


def run_calls(forward, cache, calls) -> list[torch.Tensor]:
    with torch.no_grad():
        return [forward(**c, **cache_kwargs(forward, cache), use_cache=True).logits for c in calls]


def compiled_run(model, calls, config, backend="xquant", max_len: int = 32):
    """(logits of every call, the cache): ``model.forward`` compiled with ``backend`` and an XQuantCache."""
    import xq_compile as xq

    cache = xq.XQuantCache(model.config, max_batch_size=calls[0]["input_ids"].shape[0], max_cache_len=max_len,
                           xquant=config)
    forward = torch.compile(model.forward, backend=backend, fullgraph=True)
    return run_calls(forward, cache, calls), cache


def reference_logits(model, calls, max_cache_len: int) -> list[torch.Tensor]:
    """The unmodified eager model with transformers' StaticCache."""
    cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
    return run_calls(model.forward, cache, calls)


def errors_against_simulation(model, calls, config, backend, max_len: int = 32):
    """(max error of the compiled path against ``simulate_xquant``, max error of the simulation against the
    exact model, the cache): the first small and the second large say the compiled path quantizes as the
    reference does. Each call's reference is the eager model with transformers' StaticCache."""
    from xq_compile.simulate import simulate_xquant

    torch.compiler.reset()
    out, cache = compiled_run(model, calls, config, backend, max_len)
    with simulate_xquant(model, config):
        simulated = reference_logits(model, calls, max_len)
    return max_error(out, simulated), max_error(simulated, reference_logits(model, calls, max_len)), cache


def generates_as_transformers(model, max_new_tokens: int, max_cache_len: int, backend) -> bool:
    """Whether ``xq.compile_model`` (unquantized) generates the greedy tokens transformers' own generate does
    with its static cache, from a 6-token prompt."""
    import xq_compile as xq

    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(3))
    expected = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, cache_implementation="static",
                              disable_compile=True)
    torch.compiler.reset()
    xq.compile_model(model, xq.XQuantConfig(bits=None, group_size=16), max_cache_len=max_cache_len, backend=backend)
    return torch.equal(model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False), expected)


def prefix_reference(model, calls, config) -> list[torch.Tensor]:
    """Per call, ``simulate_xquant`` over the whole prefix up to it, cut to the call's tokens: K/V from the
    state as the cache holds it after that call (the latent form's complete key groups quantized and its
    open group at the open group's bits, requantized after each of the calls' chunks; an exact-rows window
    relative to the prefix's end, as the compiled rebuild places it).

    Exact only where a cached token's X does not depend on another rewritten layer's quantization: a
    one-layer model, or one rewritten layer whose inputs come from exact (e.g. sliding-window) layers.
    With more, a token's X in layer 2 depends on what layer 1 attended to when that token was written,
    which a one-pass recompute does not reproduce."""
    from xq_compile.simulate import simulate_xquant

    out = []
    with torch.no_grad(), simulate_xquant(model, config):
        for k, call in enumerate(calls):
            ids = torch.cat([c["input_ids"] for c in calls[:k + 1]], 1)
            positions = torch.cat([c["position_ids"] for c in calls[:k + 1]], 1)
            with key_latent_chunks(calls[:k + 1]):
                logits = model(input_ids=ids, attention_mask=call["attention_mask"], position_ids=positions,
                               use_cache=False).logits
            out.append(logits[:, -call["input_ids"].shape[1]:])
    return out


def max_error(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def pytest_addoption(parser):
    parser.addoption(
        "--shard", default=None, metavar="I/N",
        help="run only every N-th collected test, starting at the I-th (0 <= I < N). scripts/test.sh (the "
             "suite on CPU) and scripts/gpu_check.sh (the CUDA tests) run N shards as parallel processes: the "
             "tests spend most of their time compiling (Inductor, Triton), single-threaded per process")


def parse_shard(text: str) -> tuple[int, int]:
    index, sep, count = text.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        i, n = -1, 0
    if not sep or not 0 <= i < n:
        raise pytest.UsageError(f"--shard {text!r}: expected I/N with 0 <= I < N, e.g. --shard 0/4")
    return i, n


@pytest.hookimpl(trylast=True)  # after -k / -m deselection, so that the shards split what is selected
def pytest_collection_modifyitems(config, items):
    if config.getoption("--shard") is None:
        return
    i, n = parse_shard(config.getoption("--shard"))
    # Round-robin over the collection order: neighbouring parametrizations (similar compile cost) spread out.
    keep = [item for k, item in enumerate(items) if k % n == i]
    dropped = [item for k, item in enumerate(items) if k % n != i]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = keep


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch (no recompile limits or cached graphs carried over)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@contextlib.contextmanager
def key_latent_chunks(calls):
    """The GQA latent form's simulation told the chunks ``calls`` write: the cache requantizes its open
    key group after each chunk (see xq_compile.latent.fake_quantize_key_latent), a one-pass forward
    over the prefix cannot see them."""
    chunked = functools.partial(fake_quantize_key_latent, chunks=[c["input_ids"].shape[1] for c in calls])
    with mock.patch.object(split_latent, "fake_quantize_key_latent", chunked):
        yield
