"""The vLLM plugin's decode step on a GPU: ``paged.fused_decode`` (``xq_compile::decode_attention`` reading
the pages through the block table) against the torch path it replaces (``paged.gather(static=True)`` +
``paged.attend``, what CUDA decode steps ran before) and the dense op over the same rows in a contiguous
cache (what reading pages costs), plus the fused step captured in a CUDA graph and replayed.

    python benchmarks/paged_decode.py --device cuda                        # H200
    python benchmarks/paged_decode.py --device cpu --lengths 64 --requests 2 --iters 1 --repeats 1   # smoke
    python benchmarks/paged_decode.py --config gluon=auto    # the fused step on the opt-in Gluon scores kernel
    python benchmarks/paged_decode.py --window 512           # a sliding-window layer (Gemma 3's local layers)

Shapes (``--shape``): ``smollm2`` the X form (d 576, 9 heads of 64); ``gqa`` the GQA latent form (8 KV heads
of 128, 32 query heads, key and value latents of 1024 per token). Each of ``--requests`` requests holds
``n`` rows in shuffled pages of ``--page-size`` tokens, one new token each. Times are medians of
``--repeats`` rounds of ``--iters`` calls (CUDA events on a GPU); ``err`` is the fused output's largest
deviation from the torch path's, relative to its largest magnitude. ``--window W``: each request attends
over its last W rows only (all three paths; the fused kernels skip the row blocks behind the window).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from decode_attention import DTYPES, parse_config, rel_err, time_ms  # noqa: E402  (benchmarks/ is this folder)

SHAPES = {
    "smollm2": dict(heads=9, kv_heads=9, head_dim=64, d=576, group=64, latent=None),
    "gqa": dict(heads=32, kv_heads=8, head_dim=128, d=4096, group=128, latent=1024),
}


def decode_step(shape: dict, requests: int, n: int, bits: int, page_size: int, dtype, dev: str):
    """Pages holding ``requests`` x ``n`` stored rows, a decode batch over them, and the layer's weights."""
    from xq_compile import XQuantConfig
    from xq_compile.vllm import paged
    from xq_compile.vllm.layout import bytes_per_token, token_state_layout

    g = torch.Generator(device=dev).manual_seed(0)
    heads, kv_heads, head_dim, d, latent = (shape[k] for k in ("heads", "kv_heads", "head_dim", "d", "latent"))
    rand = lambda *size: torch.randn(*size, device=dev, generator=g)  # noqa: E731
    width = d if latent is None else latent
    proj = paged.Projection(
        k_weight=(rand(kv_heads * head_dim, width) / math.sqrt(width)).to(dtype),
        v_weight=(rand(kv_heads * head_dim, width) / math.sqrt(width)).to(dtype), k_bias=None, v_bias=None,
        num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, scale=head_dim ** -0.5,
        down=None if latent is None else (rand(2 * latent, d) / math.sqrt(d)).to(dtype),
        key_width=latent)
    xquant = XQuantConfig(bits=bits, group_size=shape["group"])
    layout = token_state_layout(xquant, width if latent is None else 2 * latent, dtype)
    blocks = -(-n // page_size)
    num_blocks = requests * blocks + 1  # block 0: vLLM's null block
    pages = torch.zeros(num_blocks, 1, page_size, bytes_per_token(layout), dtype=torch.uint8, device=dev)
    table = 1 + torch.randperm(num_blocks - 1, device=dev, generator=g).view(requests, blocks)
    positions = torch.arange(n, device=dev)
    slots = (table[:, positions // page_size] * page_size + positions % page_size).reshape(-1)
    paged.store(pages, slots, proj.row_source(rand(requests * n, d).to(dtype)), layout, xquant, None)
    batch = paged.PagedBatch(query_start_loc=torch.arange(requests + 1, device=dev, dtype=torch.int32),
                             seq_lens=torch.full((requests,), n, device=dev, dtype=torch.int32),
                             block_table=table.int(), slot_mapping=slots[:requests], max_query_len=1,
                             max_seq_len=n)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, device=dev, dtype=torch.float32) / head_dim))
    return pages, batch, layout, xquant, proj, rand(requests, heads * head_dim).to(dtype), inv_freq


def neox_rope(inv_freq: torch.Tensor, head_dim: int):
    """RoPE of keys [T, heads * head_dim] at positions [T] (plain neox, fp32 angles), as the torch path's."""
    def rope(positions, keys):
        angles = positions.float()[:, None] * inv_freq
        cos, sin = angles.cos()[:, None].to(keys.dtype), angles.sin()[:, None].to(keys.dtype)
        k = keys.view(keys.shape[0], -1, head_dim)
        a, b = k[..., : head_dim // 2], k[..., head_dim // 2:]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], -1).flatten(1)
    return rope


def dense_arguments(args: dict, n: int) -> dict:
    """The op's arguments over the same rows gathered into a contiguous [R, n, ...] cache (no table)."""
    table, page_size = args["block_table"].long(), args["k_packed"].shape[1]
    rows = torch.arange(n, device=table.device)
    pages, slots = table[:, rows // page_size], rows % page_size
    dense = {k: (v[pages, slots].contiguous() if k in ("k_packed", "k_scale", "k_zero", "v_packed", "v_scale", "v_zero")
                 and v is not None else v) for k, v in args.items()}
    return dict(dense, block_table=None, positions=args["positions"][:, :n])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--shape", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 8192])
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--bits", type=int, default=4, choices=[2, 3, 4, 8])
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--config", nargs="*", default=[], metavar="KEY=VALUE",
                   help="decode_attention config overrides of the fused step's launches (what engine_args' "
                        "decode_attention gives a served layer), e.g. gluon=auto; the dense op runs the default")
    p.add_argument("--window", type=int, default=None, help="a sliding window of this many rows")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    config = parse_config(args.config)
    from xq_compile.vllm import paged

    dtype, dev, results = DTYPES[args.dtype], args.device, []
    print("shape    n      requests | fused ms | graph ms | dense op ms | torch path ms | err", flush=True)
    for name in args.shape:
        for n in args.lengths:
            step = decode_step(SHAPES[name], args.requests, n, args.bits, args.page_size, dtype, dev)
            pages, batch, layout, xquant, proj, query, inv_freq = step
            window = args.window
            dense = dense_arguments(paged.decode_arguments(query, pages, batch, layout, xquant, proj, inv_freq,
                                                           window), n)
            rope = neox_rope(inv_freq, proj.head_dim)

            def fused():
                return paged.fused_decode(query, pages, batch, layout, xquant, proj, inv_freq, config, window)

            def torch_path():
                rows, valid = paged.gather(pages, batch, layout, xquant, dtype, static=True, window=window)
                return paged.attend(query, rows, valid, batch, proj, rope, True, window=window)

            def dense_op():
                return torch.ops.xq_compile.decode_attention.default(**dense)

            row = dict(shape=name, n=n, requests=args.requests, bits=args.bits, page_size=args.page_size,
                       window=window, config=config, err=rel_err(fused(), torch_path().float()))
            for what, fn in (("fused", fused), ("dense_op", dense_op), ("torch_path", torch_path)):
                row[f"{what}_ms"] = time_ms(fn, dev, args.iters, args.repeats, max_round_ms=100.0)
            row["graph_ms"] = None
            if dev == "cuda":  # one captured step: no host sync inside, static shapes
                fused()
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    fused()
                row["graph_ms"] = time_ms(graph.replay, dev, args.iters, args.repeats, max_round_ms=100.0)
            results.append(row)
            graph = "-" if row["graph_ms"] is None else f"{row['graph_ms']:.3f}"
            print(f"{name:8s} {n:6d} {args.requests:8d} | {row['fused_ms']:8.3f} | {graph:>8s} | "
                  f"{row['dense_op_ms']:11.3f} | {row['torch_path_ms']:13.3f} | {row['err']:.1e}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
