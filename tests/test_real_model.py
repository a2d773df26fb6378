"""The real SmolLM2-135M (exact MHA variant): 4-bit XQuant generation stays coherent, cache >= 7x smaller."""

import pytest
import torch

import xq_compile as xq
from xq_compile import models
from xq_compile.cache import cache_kwargs

pytestmark = pytest.mark.real_model

PROMPT = "The Britannica of 1911 describes William Shakespeare as"


@pytest.fixture(scope="module")
def smollm2():
    try:
        model, tok = models.load_smollm2("mha")
    except models.MissingResourceError as err:
        pytest.skip(str(err))
    return model, tok


def continuation_nll(model, ids, prompt_len):
    """Mean NLL the unmodified model assigns to the generated tokens: low means fluent, on-topic text."""
    with torch.no_grad():
        logits = model(ids).logits[0, prompt_len - 1:-1]
    return torch.nn.functional.cross_entropy(logits, ids[0, prompt_len:]).item()


def test_4bit_generation_is_coherent_and_cache_is_7x_smaller(smollm2):
    model, tok = smollm2
    batch = tok(PROMPT, return_tensors="pt")
    prompt_len, new_tokens = batch["input_ids"].shape[1], 24
    max_len = 256
    with torch.no_grad():
        reference = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False)
    cache = xq.XQuantCache(model.config, max_batch_size=1, max_cache_len=max_len,
                           xquant=xq.XQuantConfig(bits=4), dtype=torch.float32)
    forward = model.forward
    model.forward = torch.compile(model.forward, backend="xquant", fullgraph=True)
    try:
        with torch.no_grad():
            out = model.generate(**batch, **cache_kwargs(model, cache), max_new_tokens=new_tokens, do_sample=False,
                                 disable_compile=True)
    finally:
        model.forward = forward
    assert xq.COMPILE_LOG[-1].rewritten == model.config.num_hidden_layers == 30
    text = tok.decode(out[0, prompt_len:], skip_special_tokens=True)
    nll = continuation_nll(model, out, prompt_len)
    reference_nll = continuation_nll(model, reference, prompt_len)
    # Greedy fp32 text scores ~1 nat/token under its own model; random tokens score ~10.
    assert nll < reference_nll + 1.0, f"incoherent 4-bit continuation (nll {nll:.2f}): {text!r}"
    assert len(set(text.split())) >= 8, text
    ratio = xq.fp16_kv_cache_bytes(model.config, 1, max_len) / cache.nbytes()
    assert ratio >= 7.0, ratio


def test_demo_the_main_job_generates_through_compile_model(capsys):
    """`xq-compile demo` (the README's first command): every layer rewritten, the X cache
    about 7x smaller than fp16 K/V."""
    from xq_compile.cli import main

    try:
        main(["demo", "--max-new-tokens", "8"])
    except models.MissingResourceError as err:
        pytest.skip(str(err))
    out = capsys.readouterr().out
    assert "XQuant 4-bit g64, rotation=hadamard: 30/30 attention layers rewritten" in out
    ratio = float(out.rsplit("-> ", 1)[1].split("x smaller")[0])
    # 4-bit g64 caps the ratio at 32 / (4 + 0.5) = 7.11 (less the int64 position of each token); at this
    # 2 x ~25-token cache the fixed bytes (the 64x64 rotation, the length counters) cost a little more
    assert 6.8 <= ratio < 7.11
