"""Helpers for the vLLM serving tests: run an engine on the 16 prompts, and the torch reference.

These tests run in the vLLM environment (``bash scripts/setup_vllm.sh``, then
``.venv-vllm/bin/python -m pytest -q tests/vllm_serving``). Nothing here imports vLLM at module level: in
the main environment the test modules skip themselves (``pytest.importorskip("vllm")``). The folder is not
called ``vllm``: on sys.path it would pass for the vllm package.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os

import torch

from prompts import PROMPTS

NEW_TOKENS = 12
WINDOW = 48  # the sliding window of the windowed test models: 10 of the 16 prompts are longer
# Small, and the same for every engine so that capacities compare: 1 GiB of cache space.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


@dataclasses.dataclass
class Served:
    tokens: list[list[int]]  # greedy continuation of each prompt
    prompt_nll: float  # mean negative log-likelihood of the prompts' own tokens (prompt_logprobs)
    capacity_tokens: int  # what vLLM reports as "KV cache size: N tokens" (blocks x block size)
    preemptions: int
    prefix_cache_hits: int  # prompt tokens whose cached rows were reused from another request


def prompt_ids(tokenizer) -> list[list[int]]:
    return [tokenizer(p).input_ids for p in PROMPTS]


def serve(variant: str, xquant=None, *, dtype: str = "float32", prompts: int = len(PROMPTS),
          new_tokens: int = NEW_TOKENS, prompt_logprobs: bool = True, decode_attention: dict | None = None,
          **engine: object) -> Served:
    """Start an engine on SmolLM2 (``"mha"`` or ``"gqa"``, or a model folder), stock or with the X cache,
    generate greedily for the first ``prompts`` prompts all submitted at once, shut the engine down.
    ``prompt_logprobs`` (the prompts' likelihood) makes vLLM compute every prompt token, so it turns off
    the reuse of cached prefixes."""
    from vllm import LLM, SamplingParams

    from xq_compile.models import smollm2_hf_dir
    from xq_compile.vllm import engine_args

    kwargs = dict(dtype=dtype, enforce_eager=True, max_model_len=512, max_num_seqs=16, seed=0,
                  max_num_batched_tokens=128,  # prompts longer than this are prefilled in chunks
                  disable_log_stats=False)
    kwargs.update(engine)
    model = str(smollm2_hf_dir(variant)) if variant in ("mha", "gqa") else variant
    if xquant is not None:
        kwargs.update(engine_args(xquant, model=model, decode_attention=decode_attention))
    llm = LLM(model, **kwargs)
    try:
        ids = prompt_ids(llm.get_tokenizer())[:prompts]
        params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True,
                                prompt_logprobs=0 if prompt_logprobs else None)
        outs = llm.generate([{"prompt_token_ids": i} for i in ids], params, use_tqdm=False)
        nll, count = 0.0, 0
        for out in outs if prompt_logprobs else ():
            for token, logprobs in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:]):
                nll -= logprobs[token].logprob
                count += 1
        config = llm.llm_engine.vllm_config.cache_config
        metrics = {m.name: m for m in llm.get_metrics()}
        return Served(tokens=[list(o.outputs[0].token_ids) for o in outs], prompt_nll=nll / max(count, 1),
                      capacity_tokens=config.num_gpu_blocks * config.block_size,
                      preemptions=int(metrics["vllm:num_preemptions"].value),
                      prefix_cache_hits=int(metrics["vllm:prefix_cache_hits"].value))
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


@dataclasses.dataclass
class Reference:
    logits: list[torch.Tensor]  # per prompt: [len(prompt) + len(continuation) - 1, vocab]
    prompt_nll: float


def reference(variant: str, xquant, continuations: list[list[int]]) -> Reference:
    """Teacher-forced logits of xq-compile's torch reference (:func:`xq_compile.simulate.simulate_xquant`:
    the same quantizer, packing and rotation as XQuantCache; K/V of every token from X̂) over each prompt
    followed by ``continuations``; one right-padded batch."""
    from xq_compile.models import load_model
    from xq_compile.simulate import simulate_xquant

    model, tokenizer = load_model(f"smollm2-{variant}" if variant in ("mha", "gqa") else variant)
    prompts = prompt_ids(tokenizer)[: len(continuations)]
    seqs = [p + c for p, c in zip(prompts, continuations)]
    width = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    served_form = xquant.form_of(model.config.hidden_size, model.config.num_key_value_heads * model.config.head_dim)
    simulation = per_token_latents if served_form == "latent" else simulate_xquant
    with torch.no_grad(), simulation(model, xquant):
        logits = model(input_ids=ids, attention_mask=mask).logits
    return _reference_from(logits, prompts, seqs)


def compiled_cache_reference(variant: str, xquant, continuations: list[list[int]]) -> Reference:
    """Teacher-forced logits of xq-compile's own serving path: the model compiled with
    ``backend="xquant"`` over a real :class:`~xq_compile.XQuantCache` (packed codes in memory), fed as
    the eval tool feeds it (a 64-token prefill, then 8 tokens per decode call). The 16 sequences are one
    batch, right-padded to one length: causal attention keeps the padding out of every earlier logit."""
    import xq_compile as xq
    from xq_compile.evaluate import chunks, compile_xquant, teacher_forced_logits
    from xq_compile.models import load_model

    model, tokenizer = load_model(f"smollm2-{variant}" if variant in ("mha", "gqa") else variant)
    prompts = prompt_ids(tokenizer)[: len(continuations)]
    seqs = [p + c for p, c in zip(prompts, continuations)]
    prefill, step = 64, 8
    width = prefill + step * -(-(max(map(len, seqs)) - prefill) // step)
    chunks(width, prefill, step)  # the tiling the eval tool accepts
    ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
    cache = xq.XQuantCache(model.config, max_batch_size=len(seqs), max_cache_len=width, xquant=xquant,
                           dtype=model.dtype)
    with torch.no_grad():
        logits = teacher_forced_logits(compile_xquant(model), ids, cache, prefill, step)
    return _reference_from(logits, prompts, seqs)


def _reference_from(logits: torch.Tensor, prompts: list[list[int]], seqs: list[list[int]]) -> Reference:
    """Per sequence its logits of every position that predicts a token, and the prompts' mean NLL."""
    nll, count = 0.0, 0
    for row, p in enumerate(prompts):
        logprobs = torch.log_softmax(logits[row, : len(p) - 1].double(), -1)
        nll -= logprobs.gather(1, torch.tensor(p[1:]).unsqueeze(1)).sum().item()
        count += len(p) - 1
    return Reference(logits=[logits[r, : len(s) - 1] for r, s in enumerate(seqs)], prompt_nll=nll / count)


@contextlib.contextmanager
def per_token_latents(model, xquant):
    """The torch reference of the plugin's latent form: K and V rebuilt from the key and value latents
    (SVD factors, rotated), each fake-quantized per token. (XQuantCache's latent form quantizes the key
    latent per channel over token groups instead: vLLM's pages hold whole tokens.)"""
    from xq_compile import quant
    from xq_compile.forms.split_latent import latent_projection_hooks
    from xq_compile.rotation import rotation_of

    def per_token(latent):
        return quant.fake_quantize(latent, xquant.bits, xquant.group_size)

    rotated = (lambda x: rotation_of(xquant, x.device), per_token)
    hooks = [h for layer in model.model.layers
             for h in latent_projection_hooks(layer.self_attn.k_proj, layer.self_attn.v_proj, rotated, rotated)]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def disagreements(served: Served, ref: Reference, prompts: list[list[int]]) -> list[tuple[int, int, float]]:
    """(prompt, step, logit margin) where the served greedy token is not the reference's argmax, the margin
    being how far the reference's own choice was ahead of the served token."""
    out = []
    for r, (p, tokens) in enumerate(zip(prompts, served.tokens)):
        logits = ref.logits[r][len(p) - 1:]
        for step, token in enumerate(tokens):
            best = int(logits[step].argmax())
            if best != token:
                out.append((r, step, float(logits[step, best] - logits[step, token])))
    return out


def twelve_head_dir() -> str:
    """SmolLM2's MHA variant with 3 more attention heads whose weights are zero (their output is zero and
    o_proj ignores it): the same function, with a head count tensor parallelism 2 can split (9 cannot;
    transformers wants the hidden size 576 to be a multiple of the head count: 12 is the next)."""
    from transformers import AutoTokenizer

    from xq_compile.models import cache_dir, load_smollm2, smollm2_hf_dir

    path = cache_dir() / "models" / "smollm2-135m-mha-12-heads-v1"
    if (path / "config.json").is_file():
        return str(path)
    model, _ = load_smollm2("mha")
    head_dim, extra = model.config.head_dim, 3 * model.config.head_dim
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                zeros = proj.weight.new_zeros(extra, proj.in_features)
                proj.weight = torch.nn.Parameter(torch.cat([proj.weight, zeros]))
                proj.out_features += extra
            attn.o_proj.weight = torch.nn.Parameter(
                torch.cat([attn.o_proj.weight, attn.o_proj.weight.new_zeros(attn.o_proj.out_features, extra)], 1))
            attn.o_proj.in_features += extra
    model.config.num_attention_heads = model.config.num_key_value_heads = 12
    model.config.head_dim = head_dim
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(str(smollm2_hf_dir("mha"))).save_pretrained(tmp)
    tmp.rename(path)
    return str(path)


def family_dir(family: str) -> str:
    """SmolLM2 (GQA as shipped) written as another architecture the plugin serves, for the serving tests:
    ``"mistral-window"`` (the same weights under MistralForCausalLM with a sliding window of :data:`WINDOW`
    tokens),
    ``"qwen2"`` (Qwen2ForCausalLM, which has q/k/v biases: SmolLM2 has none, so they are drawn at random,
    seeded, large enough to move the model's likelihood), ``"qwen3"`` (Qwen3ForCausalLM: per-head q/k
    RMSNorms before RoPE, their weights drawn around 1 the same way), ``"phi3"`` (:func:`_as_phi3`),
    ``"gemma2"`` or ``"gemma3"`` (:func:`_as_gemma`)."""
    from transformers import (MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                              Qwen3ForCausalLM)

    from xq_compile.models import cache_dir, load_smollm2

    path = cache_dir() / "models" / f"smollm2-135m-as-{family}-v1"
    if (path / "config.json").is_file():
        return str(path)
    source, _ = load_smollm2("gqa")
    c = source.config
    shape = dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                 num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                 num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps,
                 max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=True,
                 rope_parameters=dict(c.rope_parameters), bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
                 pad_token_id=c.pad_token_id)
    if family == "mistral-window":  # most prompts are longer than the window
        model, drawn = MistralForCausalLM(MistralConfig(**shape, sliding_window=WINDOW)), ()
    elif family == "phi3":
        return _save(_as_phi3(source, shape), path)
    elif family in ("gemma2", "gemma3"):
        return _save(_as_gemma(source, shape, family), path)
    elif family == "qwen2":
        model, drawn = Qwen2ForCausalLM(Qwen2Config(**shape, use_sliding_window=False)), ("_proj.bias",)
    elif family == "qwen3":
        model, drawn = Qwen3ForCausalLM(Qwen3Config(**shape, use_sliding_window=False)), ("_norm.weight",)
    else:
        raise ValueError(family)
    missing, unexpected = model.load_state_dict(source.state_dict(), strict=False)
    assert not unexpected and all(name.endswith(drawn) for name in missing), (missing, unexpected)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in missing:
            p = model.get_parameter(name)
            noise = torch.randn(p.shape, generator=generator)
            p.copy_(noise * 0.1 if name.endswith("bias") else 1 + noise * 0.2)
    return _save(model, path)


def _save(model, path) -> str:
    from transformers import AutoTokenizer

    from xq_compile.models import smollm2_hf_dir

    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(str(smollm2_hf_dir("gqa"))).save_pretrained(tmp)
    tmp.rename(path)
    return str(path)


def _as_phi3(source, shape: dict):
    """SmolLM2 (GQA) as Phi3ForCausalLM, with Phi-4-mini's partial rotary (3/4 of each head) and the long-context
    LongRoPE of Phi-3-128k (per-frequency factors; vLLM takes the long ones, its ``max_model_len`` being
    over ``original_max_position_embeddings``): fused ``qkv_proj`` and ``gate_up_proj`` in the checkpoint."""
    import transformers as tf

    shape = {k: v for k, v in shape.items() if k not in ("head_dim", "rope_parameters")}
    rotary_half = int(source.config.head_dim * 0.75) // 2
    generator = torch.Generator().manual_seed(0)
    rope = {"rope_type": "longrope", "rope_theta": source.config.rope_parameters["rope_theta"],
            "partial_rotary_factor": 0.75,
            "short_factor": (1 + 0.1 * torch.rand(rotary_half, generator=generator)).tolist(),
            "long_factor": (1 + 3 * torch.rand(rotary_half, generator=generator)).sort().values.tolist()}
    config = tf.Phi3Config(**{**shape, "max_position_embeddings": 8192}, original_max_position_embeddings=256,
                           rope_parameters=rope)
    model = tf.Phi3ForCausalLM(config)
    weights = dict(source.state_dict())
    for i in range(config.num_hidden_layers):
        attn, mlp = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        weights[attn + "qkv_proj.weight"] = torch.cat([weights.pop(attn + f"{n}_proj.weight") for n in "qkv"])
        weights[mlp + "gate_up_proj.weight"] = torch.cat([weights.pop(mlp + f"{n}_proj.weight") for n in ("gate", "up")])
    model.load_state_dict(weights, strict=True)
    return model


GEMMA2_SOFT_CAP = 2.0  # the Gemma 2 test model's attention-logit cap: low enough to change many scores


def _as_gemma(source, shape: dict, family: str):
    """SmolLM2 (GQA) in Gemma 2's or Gemma 3's (text) architecture, kept close to SmolLM2's function so that
    its greedy tokens are decisive: Gemma's norms scale by 1 + w; its embedding is multiplied by
    sqrt(hidden) (stored divided by it; the tied output head gets it back through the final norm); its
    post-attention and post-MLP norms (SmolLM2 has none) scale to the typical RMS of SmolLM2's attention and
    MLP outputs on the prompts; its MLP's GELU (tanh) stands in for SiLU. The families' own features are
    on: sliding windows of :data:`WINDOW` tokens (Gemma 2: every other layer; Gemma 3: 5 of 6 layers, at
    RoPE base 10^4), Gemma 2's attention-logit cap (:data:`GEMMA2_SOFT_CAP`), Gemma 3's q/k norms (scaled to
    SmolLM2's typical query and key RMS, the keys' drawn 1 ± 0.2 around it per channel, so that a rebuild
    without them shows)."""
    import transformers as tf

    from xq_compile.models import smollm2_hf_dir

    c = source.config
    layers = c.num_hidden_layers
    every = 2 if family == "gemma2" else 6  # one global layer in every 2 (Gemma 2) or 6 (Gemma 3)
    shape = {**{k: v for k, v in shape.items() if k != "rope_parameters"}, "hidden_activation": "gelu_pytorch_tanh",
             "query_pre_attn_scalar": c.head_dim, "sliding_window": WINDOW,
             "layer_types": [("full_attention" if (i + 1) % every == 0 else "sliding_attention") for i in range(layers)]}
    global_rope = {"rope_type": "default", "rope_theta": c.rope_parameters["rope_theta"]}
    if family == "gemma2":
        config = tf.Gemma2Config(**shape, attn_logit_softcapping=GEMMA2_SOFT_CAP, rope_parameters=global_rope)
        model = tf.Gemma2ForCausalLM(config).eval()
    else:
        config = tf.Gemma3TextConfig(**shape, rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}, "full_attention": global_rope})
        model = tf.Gemma3ForCausalLM(config).eval()

    # What a norm after them loses is each vector's own length: the norms scale to the median length
    # (RMS) that SmolLM2's attention and MLP outputs (per token) and queries and keys (per token and head)
    # have on the test prompts. (The median, not the mean: a few tokens' outputs are 100x the others'.)
    lengths: dict[str, list[torch.Tensor]] = {}

    def record(name, per_head):
        def hook(module, args, out):
            out = out[0] if isinstance(out, tuple) else out
            if per_head:
                out = out.unflatten(-1, (-1, c.head_dim))
            lengths.setdefault(name, []).append(out.double().pow(2).mean(-1).sqrt().flatten())
        return hook

    hooks = []
    for i, layer in enumerate(source.model.layers):
        hooks += [layer.self_attn.register_forward_hook(record(f"{i}.attn", False)),
                  layer.mlp.register_forward_hook(record(f"{i}.mlp", False)),
                  layer.self_attn.q_proj.register_forward_hook(record(f"{i}.q", True)),
                  layer.self_attn.k_proj.register_forward_hook(record(f"{i}.k", True))]
    tokenizer = tf.AutoTokenizer.from_pretrained(str(smollm2_hf_dir("gqa")))
    with torch.no_grad():
        for ids in prompt_ids(tokenizer):
            source(input_ids=torch.tensor([ids]))
    for h in hooks:
        h.remove()
    rms = {name: torch.cat(v).median().float() for name, v in lengths.items()}

    scale = c.hidden_size ** 0.5  # Gemma's embedding normalizer
    weights = dict(source.state_dict())
    weights.pop("lm_head.weight", None)
    weights["model.embed_tokens.weight"] = weights["model.embed_tokens.weight"] / scale
    weights["model.norm.weight"] = weights["model.norm.weight"] * scale
    for name in list(weights):
        if name.endswith("norm.weight"):
            weights[name] = weights[name] - 1
    generator = torch.Generator().manual_seed(0)
    for i in range(layers):
        prefix = f"model.layers.{i}."
        weights[prefix + "pre_feedforward_layernorm.weight"] = weights.pop(prefix + "post_attention_layernorm.weight")
        weights[prefix + "post_attention_layernorm.weight"] = rms[f"{i}.attn"].expand(c.hidden_size) - 1
        weights[prefix + "post_feedforward_layernorm.weight"] = rms[f"{i}.mlp"].expand(c.hidden_size) - 1
        if family == "gemma3":
            weights[prefix + "self_attn.q_norm.weight"] = rms[f"{i}.q"].expand(c.head_dim) - 1
            noise = 1 + 0.2 * torch.randn(c.head_dim, generator=generator)
            weights[prefix + "self_attn.k_norm.weight"] = rms[f"{i}.k"] * noise - 1
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected, (missing, unexpected)  # tied
    return model
