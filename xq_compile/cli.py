"""The ``xq-compile`` command line: ``xq-compile demo`` (more subcommands register in SUBCOMMANDS)."""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch

PROMPTS = [
    "Shakespeare, William (1564-1616), English poet, player and playwright, was",
    "The first folio of Shakespeare's plays was published in",
]


def demo(args: argparse.Namespace) -> None:
    """Generate with the real SmolLM2 (MHA variant) through the xquant backend; print bytes vs fp16 KV."""
    import xq_compile as xq

    model, tok = xq.models.load_smollm2(args.variant)
    tok.padding_side = "left"  # rows end together; the cache keeps each token's own position
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    batch_size, prompt_len = batch["input_ids"].shape
    max_len = prompt_len + args.max_new_tokens
    config = xq.XQuantConfig(bits=None if args.bits == 16 else args.bits, group_size=args.group_size,
                             rotation=args.rotation)
    model = xq.compile_model(model, config, max_cache_len=max_len, max_batch_size=batch_size)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=args.max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    elapsed = time.perf_counter() - start
    cache = model.xquant_cache
    for prompt, text in zip(PROMPTS, tok.batch_decode(out[:, prompt_len:], skip_special_tokens=True)):
        print(f"--- {prompt}\n{text.strip()}\n")
    record = xq.COMPILE_LOG[-1]
    x_bytes = cache.nbytes()
    kv_bytes = xq.fp16_kv_cache_bytes(model.config, batch_size, max_len)
    print(f"{config.describe()}: {record.rewritten}/{len(record.reports)} attention layers rewritten")
    print(f"X cache, {batch_size} x {max_len} tokens (measured): {x_bytes / 2**20:8.3f} MiB")
    print(f"fp16 K+V cache of the same model and length:  {kv_bytes / 2**20:8.3f} MiB")
    print(f"-> {kv_bytes / x_bytes:.2f}x smaller  (generation incl. compile: {elapsed:.0f} s)")


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help=demo.__doc__)
    p.add_argument("--bits", type=int, default=4, choices=[2, 3, 4, 8, 16], help="16 = unquantized X")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--rotation", default="hadamard", choices=["hadamard", "none"])
    p.add_argument("--variant", default="mha", choices=["mha", "gqa"])
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.set_defaults(func=demo)


# Each entry adds one subcommand parser; other modules append to it (e.g. the eval tool).
SUBCOMMANDS: list[Callable] = [_add_demo]


def _add_eval(sub) -> None:
    from .evaluate import add_eval_parser  # the logic lives in evaluate.py

    add_eval_parser(sub)


SUBCOMMANDS.append(_add_eval)


def _add_explain(sub) -> None:
    from .explanation import add_explain_parser  # the logic lives in explanation.py

    add_explain_parser(sub)


SUBCOMMANDS.append(_add_explain)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="xq-compile", description="XQuant for torch.compile")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()

