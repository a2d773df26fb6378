"""generate() through the xquant backend on every supported transformers release.

scripts/check_versions.sh runs this file (with a few other tests) under the lowest, the
vLLM-pinned and the highest supported transformers; the main test run covers the pinned one.
"""

from __future__ import annotations

import torch
import transformers

import xq_compile as xq
from xq_compile.backend import collect_records
from xq_compile.cache import cache_kwargs

from conftest import tiny_llama

AOT_EAGER = xq.make_xquant_backend("aot_eager")


def test_generate_without_padding_compiles_one_prefill_and_one_decode_graph_and_continues_the_cache():
    # No padding: generate() drops the all-ones mask, which on transformers 5.18/5.19 made the prefill's
    # mask code branch on the cache's length tensor (see xq_compile/_transformers_compat.py).
    model = tiny_llama(num_kv_heads=4)
    prompt = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(5))
    settings = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)

    def generate(ids, **cache):
        with torch.no_grad():
            return model.generate(ids, attention_mask=torch.ones_like(ids), **settings, **cache)

    first_turn = generate(prompt)
    # a second turn: the first one's output plus 3 new tokens
    follow_up = torch.cat([first_turn, torch.randint(0, 128, (2, 3), generator=torch.Generator().manual_seed(6))], 1)
    second_turn = generate(follow_up)

    cache = xq.XQuantCache(model.config, max_batch_size=2, max_cache_len=24,
                           xquant=xq.XQuantConfig(bits=None, group_size=16))
    model.forward = torch.compile(model.forward, backend=AOT_EAGER, fullgraph=True)
    with collect_records() as records:
        got = generate(prompt, **cache_kwargs(model, cache), disable_compile=True)
    assert torch.equal(got, first_turn), transformers.__version__
    assert len(records) == 2 and all(r.rewritten == 2 for r in records)  # prefill, then every decode step
    # The same cache continues: the second prefill starts at the cached length, not at 0.
    assert torch.equal(generate(follow_up, **cache_kwargs(model, cache), disable_compile=True), second_turn)
