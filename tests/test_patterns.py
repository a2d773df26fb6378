"""More model families: each rewritten and exact when unquantized, and matching the reference when quantized."""

import pytest
import torch
import transformers as tf

import xq_compile as xq
from xq_compile.simulate import simulate_xquant

from conftest import decode_inputs, max_error, prefix_reference, reference_logits, run_calls

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512)
GPT2 = "gpt2 (Conv1D: q/k/v fused in a weight stored transposed, learned positions)"
FALCON = "falcon-7b style (x @ W.T + b; multi-query: the one K/V head picked from the fused heads)"
STARCODER = "gpt_bigcode (StarCoder: multi-query, c_attn(x).unsqueeze(1) split into q, k, v; learned positions)"
PERSIMMON = "persimmon (q/k/v of each head picked by an integer index; per-head q/k LayerNorm; partial RoPE)"
FAMILIES = {
    "mistral": lambda: tf.MistralConfig(**COMMON, sliding_window=None),
    "qwen2 (q/k/v bias)": lambda: tf.Qwen2Config(**COMMON),
    "phi3 (fused qkv_proj)": lambda: tf.Phi3Config(**COMMON, pad_token_id=0),
    "qwen3 (per-head k_norm before RoPE)": lambda: tf.Qwen3Config(**COMMON, head_dim=16),
    "gemma": lambda: tf.GemmaConfig(**COMMON, head_dim=16),
    "olmo2 (k_norm over all heads before the split)": lambda: tf.Olmo2Config(**COMMON),
    "gpt_neox (q/k/v fused per head, partial RoPE)": lambda: tf.GPTNeoXConfig(
        **{k: v for k, v in COMMON.items() if k != "num_key_value_heads"}, rotary_pct=0.5),
    GPT2: lambda: tf.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=512),
    FALCON: lambda: tf.FalconConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    multi_query=True, bias=True),
    STARCODER: lambda: tf.GPTBigCodeConfig(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=512,
                                           multi_query=True),
    PERSIMMON: lambda: tf.PersimmonConfig(**{k: v for k, v in COMMON.items() if k != "num_key_value_heads"},
                                          partial_rotary_factor=0.5),
}
CODEGEN = "codegen (q/v/k fused per model-parallel block: every block's K rows, partial interleaved RoPE)"
# Families whose attention differs from Llama's in what the rewrite replays or reads (checked for exactness
# only; the quantized path is the one the families above check).
MORE_FAMILIES = {
    CODEGEN: lambda: tf.CodeGenConfig(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=512, rotary_dim=8),
    "cohere (interleaved RoPE, LayerNorm)": lambda: tf.CohereConfig(**COMMON),
    "gptj (partial interleaved RoPE from a sin/cos buffer)": lambda: tf.GPTJConfig(
        vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=512, rotary_dim=8),
    "glm4 (partial interleaved RoPE)": lambda: tf.Glm4Config(**COMMON, head_dim=16, pad_token_id=0),
    "falcon (one K/V head per query head: [q_h; k_h; v_h] picked per head)": lambda: tf.FalconConfig(
        vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, multi_query=False),
    "gpt_bigcode (one K/V head per query head: [q_h; k_h; v_h] split per head)": lambda: tf.GPTBigCodeConfig(
        vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=512, multi_query=False),
    "granite (attention and residual multipliers)": lambda: tf.GraniteConfig(
        **COMMON, attention_multiplier=0.3, residual_multiplier=0.5, embedding_multiplier=2.0, logits_scaling=3.0),
    "mixtral (mixture of experts)": lambda: tf.MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2,
                                                             sliding_window=None),
    "opt (learned positions, no RoPE)": lambda: tf.OPTConfig(
        vocab_size=128, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=512, word_embed_proj_dim=64),
    "phi (partial RoPE, dense)": lambda: tf.PhiConfig(**COMMON, partial_rotary_factor=0.5),
    "smollm3 (every 4th layer without RoPE)": lambda: tf.SmolLM3Config(**{**COMMON, "num_hidden_layers": 4},
                                                                       pad_token_id=0),
    "stablelm (partial RoPE, per-head q/k LayerNorm, qkv bias)": lambda: tf.StableLmConfig(
        **COMMON, partial_rotary_factor=0.25, qk_layernorm=True, use_qkv_bias=True),
    "starcoder2 (biases, LayerNorm)": lambda: tf.Starcoder2Config(**COMMON, sliding_window=None),
}
AOT_EAGER = xq.make_xquant_backend("aot_eager")


def build(family, layers: int | None = None):
    torch.manual_seed(0)
    config = {**FAMILIES, **MORE_FAMILIES}[family]()
    config.num_hidden_layers = layers or config.num_hidden_layers
    config._attn_implementation = "sdpa"
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # random q/k/v biases and weights large enough that K/V errors show
        for name, p in model.named_parameters():
            if any(k in name for k in ("k_proj", "qkv_proj", "q_proj", "query_key_value", "c_attn")):
                p.mul_(4)
    return model


def run(model, config, calls, backend=AOT_EAGER):
    cache = xq.XQuantCache(model.config, max_batch_size=2, max_cache_len=32, xquant=config)
    return run_calls(torch.compile(model.forward, backend=backend, fullgraph=True), cache, calls)


@pytest.mark.parametrize("family", [*FAMILIES, *MORE_FAMILIES])
def test_family_is_rewritten_and_exact_unquantized(family):
    model = build(family)
    calls = decode_inputs(steps=4)
    out = run(model, xq.XQuantConfig(bits=None, group_size=16), calls)
    assert max_error(out, reference_logits(model, calls, 32)) < 1e-4
    record = xq.COMPILE_LOG[-1]
    assert record.rewritten == len(record.reports) == model.config.num_hidden_layers


@pytest.mark.parametrize("family", ["phi3 (fused qkv_proj)", "qwen3 (per-head k_norm before RoPE)",
                                    "olmo2 (k_norm over all heads before the split)",
                                    "gpt_neox (q/k/v fused per head, partial RoPE)", CODEGEN, GPT2, PERSIMMON])
def test_family_quantized_matches_the_reference(family):
    model = build(family)
    calls = decode_inputs(steps=4)
    config = xq.XQuantConfig(bits=4, group_size=16)
    out = run(model, config, calls)
    with simulate_xquant(model, config):
        simulated = reference_logits(model, calls, 32)
    exact = reference_logits(model, calls, 32)
    assert max_error(out, simulated) < 2e-4 < max_error(simulated, exact)


@pytest.mark.parametrize("family", ["phi3 (fused qkv_proj)", "gpt_neox (q/k/v fused per head, partial RoPE)",
                                    GPT2, FALCON, STARCODER])
def test_fused_projection_latents_quantized_match_the_reference(family):
    """The latents of a fused projection's K and V rows (one block each; one block in every head; Falcon-7B's
    and StarCoder's one K/V head, the form they get by default: X is wider than K+V). One layer, so that the
    per-prefix simulation is exact (the key latent is quantized along the tokens)."""
    model = build(family, layers=1)
    calls = decode_inputs(steps=20)  # 26 tokens: groups of 16 complete mid-decode
    config = xq.XQuantConfig(bits=4, group_size=16, form="latent")
    out = run(model, config, calls)
    assert xq.COMPILE_LOG[-1].reports[0].form.startswith("GQA latent X·U_k (4-bit")
    assert max_error(out, prefix_reference(model, calls, config)) < 2e-4
    assert max_error(out, reference_logits(model, calls, 32)) > 1e-3  # really quantized


def test_qwen2_with_inductor():
    model = build("qwen2 (q/k/v bias)")
    calls = decode_inputs(steps=3)
    out = run(model, xq.XQuantConfig(bits=None, group_size=16), calls, backend="xquant")
    assert max_error(out, reference_logits(model, calls, 32)) < 1e-4


def test_gpt2_quantized_with_inductor():
    """GPT-2's K/V weight rows are the columns of a weight stored [in, out]: strided views (and their
    Hadamard-folded copies) that Inductor's generated code and the dequantize-and-project op read."""
    model = build(GPT2)
    calls = decode_inputs(steps=3)
    config = xq.XQuantConfig(bits=4, group_size=16)
    out = run(model, config, calls, backend="xquant")
    with simulate_xquant(model, config):
        simulated = reference_logits(model, calls, 32)
    assert max_error(out, simulated) < 2e-4 < max_error(simulated, reference_logits(model, calls, 32))


@pytest.mark.parametrize("family", ["olmo2 (k_norm over all heads before the split)",
                                    "gpt_neox (q/k/v fused per head, partial RoPE)"])
def test_latent_form_with_inductor(family):
    """Inductor, keys rebuilt from the latents: OLMo 2's norm over all heads replayed on them (the rebuilt
    rows are [B, n, H·D] there, split into heads by the model's own view over the n cached rows); GPT-NeoX's
    latents factor every head's K (V) rows of the fused projection."""
    model = build(family)
    calls = decode_inputs(steps=3)
    out = run(model, xq.XQuantConfig(bits=None, group_size=16, form="latent"), calls, backend="xquant")
    assert max_error(out, reference_logits(model, calls, 32)) < 1e-4
    assert [r.form[:11] for r in xq.COMPILE_LOG[-1].reports] == ["GQA latents"] * 2


def test_states_clipped_in_place_are_refused_not_rebuilt_without_the_clip():
    """OLMo's clip_qkv clamps q, k and v in place after the projections; Dynamo keeps the clamp_ as a side
    effect off the path to the cache, so a rebuild from X would silently skip it (logits off by 3e-2
    here): every layer is refused with the reason instead."""
    torch.manual_seed(0)
    config = tf.OlmoConfig(**COMMON, clip_qkv=0.5)
    config._attn_implementation = "sdpa"
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(Exception, match="xquant could not rewrite") as error:
        run(model, xq.XQuantConfig(bits=None, group_size=16), decode_inputs(steps=1))
    why = ("skipped: the projected states are modified in place on their way to the cache (clamp_, e.g. OLMo's "
           "clip_qkv): a rebuild from X would miss it")
    assert f"(layer 0: {why}; layer 1: {why})" in str(error.value)


def test_heads_repeated_before_the_cache_are_refused():
    """Falcon's new decoder architecture broadcasts each K/V head to its query heads before the cache (which then
    holds copies): every layer is refused with that reason, and the torch reference says so too."""
    torch.manual_seed(0)
    config = tf.FalconConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             new_decoder_architecture=True, num_kv_heads=2)
    config._attn_implementation = "sdpa"
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(Exception, match="xquant could not rewrite") as error:
        run(model, xq.XQuantConfig(bits=None, group_size=16), decode_inputs(steps=1))
    assert "layer 0: skipped: the K/V heads are repeated for the query heads before the cache" in str(error.value)
    with pytest.raises(ValueError, match="new_decoder_architecture"), simulate_xquant(model, xq.XQuantConfig()):
        pass


@pytest.mark.parametrize("config, says", [
    (lambda: tf.LlamaConfig(**COMMON, layer_types=["full_attention", "chunked_attention"], attention_chunk_size=8),
     "this model also has layer types ['chunked_attention']"),
    (lambda: tf.Qwen3NextConfig(**{**COMMON, "num_hidden_layers": 4}, head_dim=16),  # 3 linear : 1 full
     "this model also has layer types ['linear_attention']"),
    (lambda: tf.DeepseekV3Config(**COMMON, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                 v_head_dim=16), "multi-head latent attention (kv_lora_rank=16, as DeepSeek V2/V3)"),
], ids=["chunked attention", "linear attention", "multi-head latent attention"])
def test_attention_that_caches_no_plain_k_v_is_refused_by_the_cache(config, says):
    with pytest.raises(ValueError, match="use transformers' own cache for it") as error:
        xq.XQuantCache(config(), max_batch_size=1, max_cache_len=16)
    assert says in str(error.value)


def test_a_model_of_sliding_window_layers_only_gets_window_layers():
    """Every layer slides: each keeps a window (an X window at 4 bits, the model's K/V window unquantized
    where X rows are no smaller); tests/test_x_window.py runs such models."""
    from xq_compile.cache import ModelWindowLayer, XWindowLayer

    config = tf.MistralConfig(**COMMON, sliding_window=8)
    for bits, kind in ((4, XWindowLayer), (None, ModelWindowLayer)):
        cache = xq.XQuantCache(config, max_batch_size=1, max_cache_len=16, xquant=xq.XQuantConfig(bits=bits,
                                                                                               group_size=16))
        assert {type(layer) for layer in cache.layers} == {kind}


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_form_where_the_rope_is_plain_and_the_op_form_elsewhere(family):
    """rebuild="fused" (CUDA's decode form, run here through the op's CPU kernel) takes the fused
    decode-attention op only where the keys' region is exactly k·cos + rotate_half(k)·sin (Falcon-7B's too, in
    the latent form: one K/V head), or a per-head RMSNorm before it (Qwen3's k_norm, applied in the kernel):
    Phi-3's partial-rotary form (rotated slice + pass-through, concatenated) and OLMo 2's norm over all
    heads keep the unfused form. Either way the result is exact when unquantized."""
    model = build(family)
    calls = decode_inputs(steps=3)
    config = xq.XQuantConfig(bits=None, group_size=16)
    unquantized = run(model, config, calls, backend=xq.make_xquant_backend("aot_eager", rebuild="fused"))
    assert max_error(unquantized, reference_logits(model, calls, 32)) < 1e-4
    torch._dynamo.reset()
    run(model, xq.XQuantConfig(bits=4, group_size=16), calls, backend=xq.make_xquant_backend("aot_eager", rebuild="fused"))
    fused = "decode_attention" in xq.COMPILE_LOG[-1].code_after
    assert fused == (family.split()[0] in ("mistral", "qwen2", "qwen3", "gemma", "falcon-7b")), family
