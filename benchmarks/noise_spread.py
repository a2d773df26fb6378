"""How much of a perplexity change is the config, and how much the luck of its rounding edges.

The compiled path and the eager simulation compute X with different kernels; their last-digit
differences flip codes at rounding edges, and through 30 layers (XQuant-CL chains them) that moves a
score. This script makes such differences on purpose: it scales every layer's input RMSNorm weight by
(1 + eps), a change far below any accuracy the model has, and scores the same simulated config again.
The spread over a few eps is the band a single measurement of that config (real or simulated) falls in.

    python benchmarks/noise_spread.py --layer-bits 343432223333422223233223232233 --eps 0,1e-6,3e-6
"""

from __future__ import annotations

import argparse
import contextlib
import math

import torch

import xq_compile as xq
from xq_compile.simulate import simulate_xquant
from xq_compile import evaluate as ev
from xq_compile import models


def spread(model, windows, config: xq.XQuantConfig, eps: list[float]) -> list[float]:
    """Relative perplexity change against the unquantized model, one per eps (norm weights restored after)."""
    norms = [layer.input_layernorm.weight for layer in model.model.layers]
    original = [w.detach().clone() for w in norms]
    nll, n = ev.eval_simulated(model, windows, contextlib.nullcontext)
    reference = math.exp(nll / n)
    changes = []
    try:
        for e in eps:
            with torch.no_grad():
                for w, w0 in zip(norms, original):
                    w.copy_(w0 * (1 + e))
            nll, n = ev.eval_simulated(model, windows, lambda: simulate_xquant(model, config))
            changes.append(math.exp(nll / n) / reference - 1)
    finally:
        with torch.no_grad():
            for w, w0 in zip(norms, original):
                w.copy_(w0)
    return changes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-mha")
    p.add_argument("--text", default="britannica")
    p.add_argument("--windows", type=int, default=6)
    p.add_argument("--window-tokens", type=int, default=512)
    p.add_argument("--layer-bits", required=True, help="one digit per layer, layer 0 first (XQuant-CL, 1 base layer)")
    p.add_argument("--sink", type=int, default=0)
    p.add_argument("--eps", default="0,1e-6,3e-6")
    p.add_argument("--scale-format", default="fp16", choices=xq.config.SCALE_FORMATS,
                   help="XQuantConfig.scale_format (log8: the compact scales of xquant-auto:...:log8)")
    args = p.parse_args()
    model, tokenizer = models.load_model(args.model)
    ids = tokenizer(models.load_text(args.text), return_tensors="pt").input_ids[0]
    windows = ev.text_windows(ids, args.windows, args.window_tokens)
    config = xq.XQuantConfig(bits=3, cross_layer=True, base_layers=1, sink=args.sink,
                             layer_bits=tuple(int(c) for c in args.layer_bits), scale_format=args.scale_format)
    report = xq.memory_report(model.config, config, args.window_tokens)
    eps = [float(e) for e in args.eps.split(",")]
    changes = spread(model, windows, config, eps)
    for e, c in zip(eps, changes):
        print(f"eps {e:g}: {100 * c:+.2f}%")
    mean = sum(changes) / len(changes)
    print(f"{config.describe()}: {report.ratio_to_fp16(report.xquant):.2f}x, mean {100 * mean:+.2f}%, "
          f"range {100 * min(changes):+.2f}% .. {100 * max(changes):+.2f}%")


if __name__ == "__main__":
    main()
