"""Gemma 3, Gemma 2 and GPT-OSS shapes (tests/test_hybrid.py has the hybrid cache itself): their global
layers rewritten, their sliding-window layers kept exact, across more tokens than the window.

Each family's own feature is set so that it visibly moves the logits (checked: the model without it
differs), so exactness shows the rewrite reproduces it:
  Gemma 3: one K/V head (MQA: the GQA latent form), per-head q/k RMS norms before RoPE (replayed on the
           rebuilt keys), query_pre_attn_scalar != head_dim, two RoPE bases (global layers' rebuilt keys
           at the global base), layer_types 5 local : 1 global as the real models.
  Gemma 2: query_pre_attn_scalar, attention-logit and final-logit soft-capping (eager attention; the tiny
           model's logits are ~0.3, so its final cap is 0.25).
  GPT-OSS: attention sinks (eager attention), YaRN RoPE, a mixture of experts.
  OLMo 3:  the keys' RMS norm over all heads at once, before the split into heads (as OLMo 2's).
  EXAONE 4: global layers without RoPE, their keys normed per head (the norm weights drawn N(0, 1)).
"""

import pytest
import torch
import transformers as tf

import xq_compile as xq
from xq_compile.backend import collect_records

from conftest import (compiled_run, decode_inputs, errors_against_simulation, generates_as_transformers, max_error,
                      prefix_reference, random_model, reference_logits, run_calls)

WINDOW = 8
CAPACITY = 32
COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_attention_heads=4, head_dim=16,
              max_position_embeddings=512, sliding_window=WINDOW)
ALTERNATING = ["sliding_attention", "full_attention"] * 2
GEMMA3_PATTERN = ["sliding_attention"] * 5 + ["full_attention"]  # Gemma 3's 5 local : 1 global
LOCAL_BASE, GLOBAL_BASE = 10.0, 1000.0  # far apart, so that a rebuilt key at the wrong base shows


def gemma3(layer_types=ALTERNATING, global_base=GLOBAL_BASE, query_pre_attn_scalar=24):
    rope = {"sliding_attention": {"rope_type": "default", "rope_theta": LOCAL_BASE},
            "full_attention": {"rope_type": "default", "rope_theta": global_base}}
    return tf.Gemma3TextConfig(**COMMON, num_hidden_layers=len(layer_types), layer_types=layer_types,
                               num_key_value_heads=1, query_pre_attn_scalar=query_pre_attn_scalar,
                               rope_parameters=rope)


def gemma2(query_pre_attn_scalar=24, attn_logit_softcapping=2.0, final_logit_softcapping=0.25):
    return tf.Gemma2Config(**COMMON, num_hidden_layers=4, layer_types=ALTERNATING, num_key_value_heads=2,
                           query_pre_attn_scalar=query_pre_attn_scalar, attn_logit_softcapping=attn_logit_softcapping,
                           final_logit_softcapping=final_logit_softcapping)


def gpt_oss():
    yarn = {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
            "truncate": False, "original_max_position_embeddings": 16}  # 16 x 32 = max_position_embeddings
    return tf.GptOssConfig(**COMMON, num_hidden_layers=4, layer_types=ALTERNATING, num_key_value_heads=2,
                           num_local_experts=4, num_experts_per_tok=2, rope_parameters=yarn)


def olmo3():
    return tf.Olmo3Config(**COMMON, num_hidden_layers=4, layer_types=ALTERNATING, num_key_value_heads=2)


def exaone4():
    return tf.Exaone4Config(**COMMON, num_hidden_layers=4, layer_types=ALTERNATING, num_key_value_heads=2)


# family: (config, attention implementation, the global layers' form as the site report names it,
#          variants without the family's features: each must change the reference logits)
FAMILIES = {
    "gemma3": (gemma3, "sdpa", "GQA latents", {
        "global layers at the local RoPE base": lambda: gemma3(global_base=LOCAL_BASE),
        "query_pre_attn_scalar = head_dim": lambda: gemma3(query_pre_attn_scalar=16)}),
    "gemma2": (gemma2, "eager", "X (", {
        "query_pre_attn_scalar = head_dim": lambda: gemma2(query_pre_attn_scalar=16),
        "no attention soft-capping": lambda: gemma2(attn_logit_softcapping=None),
        "no final soft-capping": lambda: gemma2(final_logit_softcapping=None)}),
    "gpt_oss": (gpt_oss, "eager", "X (", {}),  # the sinks are weights: test_gpt_oss_sinks_matter
    "olmo3": (olmo3, "sdpa", "X (", {}),  # the norm's weights are drawn: test_the_key_norms_matter
    "exaone4": (exaone4, "sdpa", "X (", {}),
}
AOT_EAGER = xq.make_xquant_backend("aot_eager")



def family_model(family, **variant):
    make, attention, _, _ = FAMILIES[family]
    return random_model(make(**variant), attention)


def compiled(model, xquant, calls):
    return compiled_run(model, calls, xquant, AOT_EAGER, CAPACITY)


KEPT = f"sliding-window layer (window {WINDOW}): K/V kept in the model's own window cache"


def expected_reports(layer_types, form):
    return [(i, "kept", KEPT) if kind == "sliding_attention" else (i, "rewritten", form)
            for i, kind in enumerate(layer_types)]


def reports_of(record, form):
    """(layer, status, why) per layer: a kept layer's reason (without the bytes per row it compares), a
    rewritten layer's form cut to ``form``'s length."""
    return [(r.layer, r.status, r.reason[:len(KEPT)] if r.status == "kept" else r.form[:len(form)])
            for r in record.reports]


@pytest.mark.parametrize("family", FAMILIES)
def test_unquantized_is_exact_past_the_window(family):
    _, attention, form, variants = FAMILIES[family]
    model = family_model(family)
    calls = decode_inputs(steps=12)  # 6-token prompt (one row left-padded) + 12 decode steps > window 8
    torch.compiler.reset()
    with collect_records() as records:
        out, cache = compiled(model, xq.XQuantConfig(bits=None, group_size=16), calls)
    reference = reference_logits(model, calls, CAPACITY)  # transformers' StaticCache, windows on sliding layers
    assert max_error(out, reference) < 1e-4
    layer_types = model.config.layer_types
    for record in records:  # prefill, decode before and after the window fills
        assert reports_of(record, form) == expected_reports(layer_types, form)
    assert cache.layers[1].form.name == ("latent" if family == "gemma3" else "x")
    for name, variant in variants.items():
        assert max_error(reference_logits(random_model(variant(), attention), calls, CAPACITY), reference) > 1e-2, name


def test_gemma3_with_inductor():
    """backend="xquant" itself: Inductor compiles the latent rebuild with the q/k norm and the global RoPE."""
    model = family_model("gemma3")
    calls = decode_inputs(steps=4)  # 6 + 4 tokens: past the window of 8
    torch.compiler.reset()
    cache = xq.XQuantCache(model.config, max_batch_size=2, max_cache_len=CAPACITY,
                           xquant=xq.XQuantConfig(bits=None, group_size=16))
    out = run_calls(torch.compile(model.forward, backend="xquant", fullgraph=True), cache, calls)
    assert max_error(out, reference_logits(model, calls, CAPACITY)) < 1e-4
    assert xq.COMPILE_LOG[-1].rewritten == 2 and xq.COMPILE_LOG[-1].kept == 2


def test_gemma3_mqa_quantized_matches_the_reference():
    """Gemma 3's own 5:1 pattern: the one global layer caches the 4-bit GQA latents of its one K/V head.
    Its inputs come from exact sliding layers, so the per-prefix simulation is its exact reference."""
    model = random_model(gemma3(GEMMA3_PATTERN), "sdpa")
    # no left padding: transformers' sliding mask over a padded StaticCache differs from the one-pass
    # recompute the reference runs (the unpadded rows agree to 1e-6)
    calls = decode_inputs(steps=12, pad=0)
    # 8 bits on the sliding layers: their X window (80 B/row) is larger than the model's K/V window of one
    # 16-wide head (64 B/row), so they keep the model's exact window (at 4 bits they would hold X windows:
    # tests/test_x_window.py)
    config = xq.XQuantConfig(bits=4, group_size=16, layer_bits=[8] * 5 + [4])
    torch.compiler.reset()
    out, cache = compiled(model, config, calls)
    form = "GQA latent X·U_k (4-bit"
    assert reports_of(xq.COMPILE_LOG[-1], form) == expected_reports(GEMMA3_PATTERN, form)
    assert max_error(out, prefix_reference(model, calls, config)) < 2e-4
    assert max_error(out, reference_logits(model, calls, CAPACITY)) > 1e-3  # really quantized
    assert cache.layers[5].form.width == 16  # one K/V head of 16: a latent of 16 channels, X has 64


@pytest.mark.parametrize("family", ["olmo3", "exaone4"])
def test_the_key_norms_matter(family):
    """The rewritten layers replay the model's own k_norm on the rebuilt keys (exact above); here, that the
    norm's weights change the result, so a rebuild that skipped it would show."""
    model = family_model(family)
    calls = decode_inputs(steps=2)
    reference = reference_logits(model, calls, CAPACITY)
    with torch.no_grad():
        for layer in model.model.layers[1::2]:  # the full-attention layers
            layer.self_attn.k_norm.weight.fill_(1.0)
    assert max_error(reference_logits(model, calls, CAPACITY), reference) > 1e-2


@pytest.mark.parametrize("family", ["gemma2", "gpt_oss", "olmo3", "exaone4"])
def test_quantized_matches_the_simulation(family):
    error, quantization, _ = errors_against_simulation(family_model(family), decode_inputs(steps=12),
                                                       xq.XQuantConfig(bits=4, group_size=16), AOT_EAGER, CAPACITY)
    assert error < 2e-4 < quantization


def test_gpt_oss_sinks_matter():
    """The sinks are a per-head logit in the softmax's denominator: the compiled path leaves attention as the
    model wrote it, so the unquantized test above is exact with them; here, that they change the result."""
    model = family_model("gpt_oss")
    calls = decode_inputs(steps=2)
    reference = reference_logits(model, calls, CAPACITY)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.fill_(-1e4)  # a sink no query attends to
    assert max_error(reference_logits(model, calls, CAPACITY), reference) > 1e-2


@pytest.mark.parametrize("family", ["gemma3", "gpt_oss"])
def test_compile_model_generates_as_transformers_does(family):
    assert generates_as_transformers(family_model(family), 14, CAPACITY, AOT_EAGER)  # 20 tokens, window 8
    assert xq.COMPILE_LOG[-1].kept == 2 and xq.COMPILE_LOG[-1].rewritten == 2
