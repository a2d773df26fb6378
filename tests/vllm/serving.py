"""Helpers for the vLLM serving tests: run an engine on the 16 prompts, and the torch reference.

These tests run in the vLLM environment (``bash scripts/setup_vllm.sh``, then
``.venv-vllm/bin/python -m pytest -q tests/vllm``). Nothing here imports vLLM at module level: in the
main environment the test modules skip themselves (``pytest.importorskip("vllm")``).
"""

from __future__ import annotations

import dataclasses
import gc
import os

import torch

from prompts import PROMPTS

NEW_TOKENS = 12
# Small, and the same for every engine so that capacities compare: 1 GiB of cache space.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


@dataclasses.dataclass
class Served:
    tokens: list[list[int]]  # greedy continuation of each prompt
    prompt_nll: float  # mean negative log-likelihood of the prompts' own tokens (prompt_logprobs)
    capacity_tokens: int  # what vLLM reports as "KV cache size: N tokens" (blocks x block size)
    preemptions: int


def prompt_ids(tokenizer) -> list[list[int]]:
    return [tokenizer(p).input_ids for p in PROMPTS]


def serve(variant: str, xquant=None, *, dtype: str = "float32", prompts: int = len(PROMPTS), **engine: object) -> Served:
    """Start an engine on SmolLM2 (``"mha"`` or ``"gqa"``), stock or with the X cache, generate greedily for
    the first ``prompts`` prompts all submitted at once, shut the engine down."""
    from vllm import LLM, SamplingParams

    from xq_compile.models import smollm2_hf_dir
    from xq_compile.vllm import engine_args

    kwargs = dict(dtype=dtype, enforce_eager=True, max_model_len=512, max_num_seqs=16, seed=0,
                  max_num_batched_tokens=128,  # prompts longer than this are prefilled in chunks
                  disable_log_stats=False)
    kwargs.update(engine)
    if xquant is not None:
        kwargs.update(engine_args(xquant))
    llm = LLM(str(smollm2_hf_dir(variant)), **kwargs)
    try:
        ids = prompt_ids(llm.get_tokenizer())[:prompts]
        params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, prompt_logprobs=0)
        outs = llm.generate([{"prompt_token_ids": i} for i in ids], params, use_tqdm=False)
        nll, count = 0.0, 0
        for out in outs:
            for token, logprobs in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:]):
                nll -= logprobs[token].logprob
                count += 1
        config = llm.llm_engine.vllm_config.cache_config
        preemptions = sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")
        return Served(tokens=[list(o.outputs[0].token_ids) for o in outs], prompt_nll=nll / count,
                      capacity_tokens=config.num_gpu_blocks * config.block_size, preemptions=int(preemptions))
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
    from xq_compile.models import load_smollm2
    from xq_compile.simulate import simulate_xquant

    model, tokenizer = load_smollm2(variant)
    prompts = prompt_ids(tokenizer)[: len(continuations)]
    seqs = [p + c for p, c in zip(prompts, continuations)]
    width = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    with torch.no_grad(), simulate_xquant(model, xquant):
        logits = model(input_ids=ids, attention_mask=mask).logits
    nll, count = 0.0, 0
    for row, p in enumerate(prompts):
        logprobs = torch.log_softmax(logits[row, : len(p) - 1].double(), -1)
        nll -= logprobs.gather(1, torch.tensor(p[1:]).unsqueeze(1)).sum().item()
        count += len(p) - 1
    return Reference(logits=[logits[r, : len(s) - 1] for r, s in enumerate(seqs)], prompt_nll=nll / count)


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
