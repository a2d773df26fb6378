"""What keeping the GQA key latent's open group at bits+4 (no fp16 window) costs in key error.

The latent form quantizes the key latent per channel over 64-token groups. The group still filling
(the open group) used to sit in fp16; now it is kept at ``open_bits`` (8 bits at 4-bit) per channel,
re-rounded on its grid whenever a new chunk widens a channel's range, and quantized at ``bits`` from
those codes when it completes. This script measures the rebuilt keys' squared error of both layouts
against the exact keys, on SmolLM2-GQA's real layer inputs, after every call of the eval tool's
schedule (a 64-token prefill, then 8 tokens per call): a deterministic number, unlike a perplexity.

    python benchmarks/open_key_group_error.py --windows 3
"""

from __future__ import annotations

import argparse

import torch

from xq_compile import quant
from xq_compile.evaluate import text_windows
from xq_compile.latent import ROW_DTYPE, fake_quantize_key_latent, svd_factors
from xq_compile.models import load_model, load_text


def fp16_open_group(latent: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """The earlier layout: every complete group quantized once from its fp16 rows, the open one exact."""
    out = latent.to(ROW_DTYPE).float().clone()
    for start in range(0, out.shape[0] // group_size * group_size, group_size):
        codes = quant.quantize_along_tokens(out[start:start + group_size], bits, group_size)
        out[start:start + group_size] = quant.dequantize_along_tokens(*codes, group_size)
    return out


def layer_inputs(model, windows) -> dict[int, list[torch.Tensor]]:
    """Each layer's K-projection input X [T, hidden] for every window."""
    xs: dict[int, list[torch.Tensor]] = {}
    hooks = [layer.self_attn.k_proj.register_forward_hook(
        lambda m, a, o, i=i: xs.setdefault(i, []).append(a[0][0].detach())) for i, layer in enumerate(model.model.layers)]
    try:
        with torch.no_grad():
            for w in windows:
                model(input_ids=w.reshape(1, -1))
    finally:
        for h in hooks:
            h.remove()
    return xs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-gqa")
    p.add_argument("--text", default="britannica")
    p.add_argument("--windows", type=int, default=3)
    p.add_argument("--window-len", type=int, default=512)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--prefill", type=int, default=64)
    p.add_argument("--step", type=int, default=8)
    args = p.parse_args()

    model, tokenizer = load_model(args.model)
    ids = torch.tensor(tokenizer(load_text(args.text))["input_ids"])
    xs = layer_inputs(model, text_windows(ids, args.windows, args.window_len))
    calls = [args.prefill] + [args.step] * ((args.window_len - args.prefill) // args.step)
    error = {"fp16 open group": 0.0, "open group at bits+4": 0.0}
    closed = dict.fromkeys(error, 0.0)
    reference = 0.0
    for i, layer in enumerate(model.model.layers):
        down, up = svd_factors(layer.self_attn.k_proj.weight.float())
        for x in xs[i]:
            latent = x.float() @ down.T
            keys = latent @ up.T
            for n_calls in range(1, len(calls) + 1):
                t = sum(calls[:n_calls])
                complete = t // args.group_size * args.group_size
                layouts = {"fp16 open group": fp16_open_group(latent[:t], args.bits, args.group_size),
                           "open group at bits+4": fake_quantize_key_latent(latent[:t], args.bits, args.group_size,
                                                                            chunks=calls[:n_calls])}
                for name, cached in layouts.items():
                    diff = cached @ up.T - keys[:t]
                    error[name] += diff.pow(2).sum().item()
                    closed[name] += diff[:complete].pow(2).sum().item()
                reference += keys[:t].pow(2).sum().item()
    print(f"{args.model}, {args.bits}-bit g{args.group_size}, {args.windows} x {args.window_len} tokens of {args.text}, "
          f"prefill {args.prefill} then {args.step} per call; keys' squared error summed over every call:")
    for name in error:
        print(f"  {name:>22}: relative error {(error[name] / reference) ** 0.5:.5f}")
    old, new = error.values()
    print(f"  squared-error ratio (bits+4 / fp16): all rows {new / old:.4f}, complete groups only "
          f"{closed['open group at bits+4'] / closed['fp16 open group']:.4f}")


if __name__ == "__main__":
    main()
