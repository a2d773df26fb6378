"""Requests served at a fixed cache budget: stock vLLM against the XQuant plugin at 4 and 2 bits.

    bash scripts/setup_vllm.sh
    .venv-vllm/bin/python benchmarks/vllm_serving.py                  # CPU defaults, ~10 min on 2 cores
    .venv-vllm/bin/python benchmarks/vllm_serving.py --budget-mib 256 --requests 32 --prompt-tokens 960

Every engine gets the same bytes of cache (``--budget-mib``): the number of blocks is the budget divided by
one block's bytes in that engine's format (stock: K and V in the model dtype; XQuant: packed X + fp16
scale/zero per token, :func:`xq_compile.vllm.bytes_per_token`), given to vLLM as ``num_gpu_blocks_override``.
The workload is long-context: ``--requests`` prompts of ``--prompt-tokens`` tokens each (consecutive
windows of the shipped text), ``--new-tokens`` greedy tokens each, all submitted at once. Where stock
vLLM's blocks cannot hold every request it must queue them (or preempt and recompute); the X cache holds
more of them at once. Reported per engine, with ratios against stock measured in the same run: the cache
capacity in tokens, how many whole requests fit at once, wall time, generated tokens/s, mean time a
request waited in the queue, and preemptions.

On CPU the plugin rebuilds K (and V for prompt chunks) in plain torch for every cached row at every step:
it serves more requests at once but each step costs more; on a GPU that rebuild belongs in the fused
decode kernel. Outputs under --out: vllm_serving.json and vllm_serving.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, md_table, write_json  # noqa: E402

BLOCK_SIZE = 32  # vLLM's CPU attention wants a multiple of 32


@dataclasses.dataclass
class Run:
    method: str
    bytes_per_token: int  # all layers
    blocks: int
    capacity_tokens: int
    requests_at_once: int  # whole requests (prompt + new tokens) the blocks hold together
    wall_s: float
    generated_tokens_per_s: float
    mean_queue_s: float
    preemptions: int


def stock_bytes_per_token(config, dtype_bytes: int) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim * dtype_bytes


def xquant_bytes_per_token(config, xquant, dtype) -> int:
    from xq_compile.vllm import bytes_per_token, token_state_layout

    return config.num_hidden_layers * bytes_per_token(token_state_layout(xquant, config.hidden_size, dtype))


def histogram_mean(metric) -> float:
    return metric.sum / metric.count if getattr(metric, "count", 0) else float("nan")


def serve_once(model: str, method: str, xquant, prompts: list[list[int]], args, per_token: int) -> Run:
    from vllm import LLM, SamplingParams

    from xq_compile.vllm import engine_args

    blocks = args.budget_mib * 2**20 // (per_token * BLOCK_SIZE)
    # vLLM's CPU backend reserves its cache space from this variable (else a fraction of all memory, which a
    # shared machine may not have free); the blocks used are num_gpu_blocks_override's, within it.
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, -(-args.budget_mib // 1024)))
    per_request = args.prompt_tokens + args.new_tokens
    kwargs = dict(dtype=args.dtype, enforce_eager=True, max_model_len=per_request, seed=0,
                  max_num_seqs=args.requests, block_size=BLOCK_SIZE, num_gpu_blocks_override=int(blocks),
                  disable_log_stats=False)
    if xquant is not None:
        kwargs.update(engine_args(xquant, model=model))
    llm = LLM(model, **kwargs)
    try:
        params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
        start = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        wall = time.perf_counter() - start
        metrics = {m.name: m for m in llm.get_metrics()}
        generated = sum(len(o.outputs[0].token_ids) for o in outs)
        capacity = int(blocks) * BLOCK_SIZE
        return Run(method=method, bytes_per_token=per_token, blocks=int(blocks), capacity_tokens=capacity,
                   requests_at_once=capacity // per_request, wall_s=wall, generated_tokens_per_s=generated / wall,
                   mean_queue_s=histogram_mean(metrics["vllm:request_queue_time_seconds"]),
                   preemptions=int(metrics["vllm:num_preemptions"].value))
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def workload(tokenizer, requests: int, prompt_tokens: int) -> list[list[int]]:
    """Consecutive windows of the shipped evaluation text (repeated if it is too short)."""
    from xq_compile.models import load_text

    ids = tokenizer(load_text("britannica")).input_ids
    need = requests * prompt_tokens
    ids = (ids * (need // len(ids) + 1))[:need]
    return [ids[i * prompt_tokens:(i + 1) * prompt_tokens] for i in range(requests)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="mha", choices=["mha", "gqa"])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--budget-mib", type=int, default=64)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=480)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 2])
    parser.add_argument("--out", type=Path,
                        default=Path("docs/benchmarks") / f"{datetime.date.today()}-cpu-vllm-serving")
    args = parser.parse_args()

    import torch
    from transformers import AutoConfig, AutoTokenizer

    from xq_compile import XQuantConfig
    from xq_compile.models import smollm2_hf_dir

    model = str(smollm2_hf_dir(args.variant))
    config = AutoConfig.from_pretrained(model)
    dtype = getattr(torch, args.dtype)
    prompts = workload(AutoTokenizer.from_pretrained(model), args.requests, args.prompt_tokens)
    methods = [("stock", None, stock_bytes_per_token(config, dtype.itemsize))]
    for bits in args.bits:
        xquant = XQuantConfig(bits=bits, form="x")
        methods.append((f"xquant:{bits}", xquant, xquant_bytes_per_token(config, xquant, dtype)))
    runs = []
    for method, xquant, per_token in methods:
        print(f"[{method}] {per_token} B/token, serving {args.requests} x ({args.prompt_tokens} + "
              f"{args.new_tokens}) tokens in {args.budget_mib} MiB", flush=True)
        runs.append(serve_once(model, method, xquant, prompts, args, per_token))
        print(f"[{method}] {runs[-1]}", flush=True)

    stock = runs[0]
    headers = ["method", "B/token", "capacity (tokens)", "requests at once", "wall (s)", "generated tok/s",
               "mean queue (s)", "preemptions", "capacity vs stock", "tok/s vs stock"]
    rows = [[r.method, r.bytes_per_token, r.capacity_tokens, r.requests_at_once, r.wall_s,
             r.generated_tokens_per_s, r.mean_queue_s, r.preemptions, r.capacity_tokens / stock.capacity_tokens,
             r.generated_tokens_per_s / stock.generated_tokens_per_s] for r in runs]
    table = md_table(headers, rows)
    setting = (f"SmolLM2-135M ({args.variant}, {args.dtype}); cache budget {args.budget_mib} MiB; "
               f"{args.requests} requests x ({args.prompt_tokens} prompt + {args.new_tokens} new) tokens, "
               f"submitted at once; block size {BLOCK_SIZE}; OMP threads {os.environ.get('OMP_NUM_THREADS', '-')}")
    print(setting + "\n\n" + table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vllm_serving.md").write_text(f"# vLLM serving at a fixed cache budget\n\n{setting}\n\n{table}\n")
    write_json(args.out / "vllm_serving.json", {"setting": setting, "args": {k: str(v) for k, v in vars(args).items()},
                                                "environment": environment("cpu"),
                                                "runs": [dataclasses.asdict(r) for r in runs]})


if __name__ == "__main__":
    main()
