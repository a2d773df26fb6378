"""Compose the XQuant rewrite with your own FX pass and compiler, in your own Dynamo backend.

    python examples/custom_pipeline.py      # tiny random Llama, a few seconds on CPU

``xq.rewrite_for_backend(gm, example_inputs)`` applies the XQuant graph rewrite to a copy of the Dynamo
graph and returns it with the example inputs it now takes (the original ones plus the X state).
Run any FX pass on ``rw.graph_module``, compile it with any compiler, and return ``rw.bind(compiled)``
to Dynamo: the bound callable takes Dynamo's original arguments and appends the X state of the cache
each call is made with.

(``xq.make_xquant_backend(inner)`` with a callable ``inner(gm, example_inputs)`` is the short form
when your passes only need to run after the rewrite.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

import xq_compile as xq
from xq_compile._torch_private import lookup_backend


def replace_silu(gm: torch.fx.GraphModule) -> int:
    """A user FX pass: rewrite silu(x) as x * sigmoid(x) (an equivalent). Returns how many it replaced."""
    replaced = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is F.silu:
            with gm.graph.inserting_before(node):  # both land before node, in order
                sigmoid = gm.graph.call_function(torch.sigmoid, (node.args[0],))
                product = gm.graph.call_function(torch.mul, (node.args[0], sigmoid))
            node.replace_all_uses_with(product)
            gm.graph.erase_node(node)
            replaced += 1
    gm.graph.lint()
    gm.recompile()
    return replaced


def make_backend(stats: dict) -> callable:
    """A Dynamo backend: XQuant rewrite -> replace_silu -> aot_eager. ``stats`` counts what each step did."""
    # torch has no public lookup of a backend by name: xq_compile._torch_private wraps the one that
    # torch.compile(backend="aot_eager") uses (in your own code: torch._dynamo.lookup_backend).
    aot_eager = lookup_backend("aot_eager")

    def backend(gm: torch.fx.GraphModule, example_inputs):
        rw = xq.rewrite_for_backend(gm, example_inputs)           # 1. XQuant: K/V cache -> X cache
        stats["sites_rewritten"] = stats.get("sites_rewritten", 0) + rw.record.rewritten
        stats["silu_replaced"] = stats.get("silu_replaced", 0) + replace_silu(rw.graph_module)  # 2. your pass
        compiled = aot_eager(rw.graph_module, rw.example_inputs)  # 3. any compiler
        return rw.bind(compiled)                                  # 4. feeds the X state on every call

    return backend


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).eval()


def run(model, forward, cache, steps: int = 4) -> list[torch.Tensor]:
    """Prefill a 6-token prompt (batch 2), then ``steps`` greedy decode steps; return every call's logits."""
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(1))
    batch = dict(input_ids=ids, position_ids=torch.arange(6).expand(2, 6), attention_mask=torch.ones_like(ids))
    out = []
    with torch.no_grad():
        for _ in range(steps + 1):
            logits = forward(**batch, **xq.cache_kwargs(forward, cache), use_cache=True).logits
            out.append(logits)
            batch = dict(input_ids=logits[:, -1:].argmax(-1), position_ids=batch["position_ids"][:, -1:] + 1,
                         attention_mask=torch.cat([batch["attention_mask"], torch.ones(2, 1, dtype=torch.long)], 1))
    return out


def main(bits: int | None = None) -> tuple[float, dict]:
    """Run the pipeline against the unmodified model; return the largest logit difference and the stats."""
    model = tiny_llama()
    reference = run(model, model.forward, StaticCache(config=model.config, max_cache_len=16))

    stats: dict = {}
    cache = xq.XQuantCache(model.config, max_batch_size=2, max_cache_len=16,
                           xquant=xq.XQuantConfig(bits=bits, group_size=16))
    forward = torch.compile(model.forward, backend=make_backend(stats), fullgraph=True)
    got = run(model, forward, cache)
    error = max((a - b).abs().max().item() for a, b in zip(got, reference))
    return error, stats


if __name__ == "__main__":
    for bits in (None, 4):
        error, stats = main(bits)
        label = "unquantized X" if bits is None else f"{bits}-bit X"
        print(f"{label}: max |logits - unmodified model| = {error:.2e}; "
              f"{stats['sites_rewritten']} attention sites rewritten, {stats['silu_replaced']} silu replaced "
              f"(over the prefill and decode graphs)")
