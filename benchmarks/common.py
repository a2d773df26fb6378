"""Shared helpers of the benchmarks: the benchmark model, timing, environment description, output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def smollm2_like_config(layers: int, vocab: int = 49152):
    """SmolLM2-135M's shape (d 576, 9 heads of 64, MLP 1536, rope theta 1e5), MHA (9 KV heads), fewer layers."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=vocab, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
        num_attention_heads=9, num_key_value_heads=9, head_dim=64, max_position_embeddings=65536,
        rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, attention_bias=False,
    )
    config._attn_implementation = "sdpa"
    return config


def build_model(layers: int, dtype: torch.dtype, device: str, real: bool = False, seed: int = 0):
    """Random-weight SmolLM2-shaped MHA model, or (``real``) SmolLM2-135M itself in its MHA form."""
    if real:
        from xq_compile.models import load_smollm2

        model = load_smollm2("mha", dtype=dtype)
    else:
        from transformers import LlamaForCausalLM

        torch.manual_seed(seed)
        model = LlamaForCausalLM(smollm2_like_config(layers)).to(dtype)
    model.config._attn_implementation = "sdpa"
    return model.eval().to(device)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str) -> float:
    """Seconds one call of ``fn`` takes (synchronized on CUDA)."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def environment(device: str) -> dict:
    import transformers

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": platform.machine(),
        "processor": platform.processor() or "",
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:  # noqa: BLE001 - optional
        env["triton"] = None
    try:
        env["loadavg_at_start"] = os.getloadavg()
    except OSError:
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n")


def md_table(headers: list[str], rows: list[list]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
