"""Overhead of `return_block_scores=β` (SeerAttention gate targets) on CPU: forward time with
and without the pooled block scores.

    flock /tmp/attncc-bench.lock python bench/bench_block_scores.py
    python bench/bench_block_scores.py --sizes 1024,2048 --block 64

Pattern: `specs/sliding_window.attn` (window 512) and `specs/causal.attn`; backend "torch",
B=1, H=4, D=64, float32, `--threads` torch threads, median of --reps calls after a warm-up.
The block scores are computed by `attncc.runtime.block_scores` (torch, dense over each β-row
query block), not inside the forward kernel.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import attncc  # noqa: E402

SPECS = os.path.join(os.path.dirname(HERE), "specs")


def median_time(fn, reps):
    fn()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1024,2048,4096")
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print("| pattern | tokens | forward ms | forward + block scores ms | overhead |")
    print("|---|---:|---:|---:|---:|")
    for name, params in (("causal", {}), ("sliding_window", {"window": 512})):
        kern = attncc.compile(attncc.load(os.path.join(SPECS, name + ".attn"), **params),
                              backend="torch")
        for n in (int(s) for s in args.sizes.split(",")):
            gen = torch.Generator().manual_seed(0)
            q, k, v = (torch.randn(1, 4, n, 64, generator=gen) for _ in range(3))
            with torch.no_grad():
                t0 = median_time(lambda: kern(q, k, v), args.reps)
                t1 = median_time(lambda: kern(q, k, v, return_block_scores=args.block), args.reps)
            print(f"| {name} | {n} | {t0 * 1e3:.1f} | {t1 * 1e3:.1f} | {t1 / t0:.2f}× |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
