"""MoBA (specs/moba.attn) tile skipping: visited key tiles and kept pairs at long lengths.

    flock /tmp/attncc-bench.lock python bench/bench_moba.py
    python bench/bench_moba.py --tokens 8192 --block 512 --topk 3 --time

q, k, v standard normal (B=1, H=--heads, D=--head-dim), 64-token tiles; with `--data walk` the
queries are a random walk instead (q_t = Σ_{s<=t} noise_s / sqrt(L)), so neighbouring queries
are alike, as in text, where a query tile's tokens tend to pick the same blocks. The runtime
pre-pass (`attncc.runtime.prepass_kernel.runtime_classes`) selects each token's blocks and
classifies the (query tile, key tile) pairs as the union over the tile's 64 queries. Printed:
kept (query, key) pairs over all pairs (density) and over the causal pairs, visited tiles
(FULL + PARTIAL) over the causal tiles, and with --time the torch backend's forward time
(process CPU seconds, 1 thread) against plain causal.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import attncc  # noqa: E402
from attncc.runtime.options import CompileOptions  # noqa: E402
from attncc.runtime.prepass_kernel import runtime_classes  # noqa: E402

SPECS = os.path.join(os.path.dirname(HERE), "specs")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="8192,32768")
    ap.add_argument("--block", type=int, default=512)
    ap.add_argument("--topk", type=int, default=3)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--time", action="store_true")
    ap.add_argument("--data", choices=("normal", "walk"), default="normal")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    p = attncc.load(os.path.join(SPECS, "moba.attn"), block=args.block, topk=args.topk)
    opts = CompileOptions()
    print("| data | tokens | block | top-k | density (all pairs) | kept / causal pairs | visited tiles "
          "| causal tiles | visited / causal | torch CPU s (moba / causal) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for n in (int(t) for t in args.tokens.split(",")):
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, args.heads, n, args.head_dim, generator=gen) for _ in range(3))
        if args.data == "walk":
            q = q.cumsum(2) / n ** 0.5
        _, cls, sels = runtime_classes(p, q, k, {}, options=opts)
        sel = next(iter(sels.values()))[0]                      # [B, H, L, n_blocks]
        pos = torch.arange(n)
        own = pos // args.block
        j = torch.arange(sel.shape[-1])
        keys = torch.where(j[None] < own[:, None], args.block,
                           torch.where(j[None] == own[:, None], pos[:, None] - own[:, None] * args.block + 1, 0))
        kept = int((sel * keys).sum())
        causal_pairs = args.heads * n * (n + 1) // 2
        visited = int((cls > 0).sum())
        nt = -(-n // 64)
        causal_tiles = args.heads * nt * (nt + 1) // 2
        timing = ""
        if args.time:
            moba = attncc.compile(p, backend="torch")
            causal = attncc.compile(attncc.load(os.path.join(SPECS, "causal.attn")), backend="torch")
            out = []
            for kern in (moba, causal):
                with torch.no_grad():
                    c = time.process_time()
                    kern(q, k, v)
                    out.append(time.process_time() - c)
            timing = f"{out[0]:.1f} / {out[1]:.1f}"
        print(f"| {args.data} | {n} | {args.block} | {args.topk} | {kept / (args.heads * n * n):.4f} "
              f"| {kept / causal_pairs:.4f} | {visited} | {causal_tiles} "
              f"| {visited / causal_tiles:.4f} | {timing} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
