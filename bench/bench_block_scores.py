"""Overhead of `return_block_scores=β` (SeerAttention gate targets) on CPU: forward time with
and without the pooled block scores.

    flock /tmp/attncc-bench.lock python bench/bench_block_scores.py
    python bench/bench_block_scores.py --sizes 1024,2048 --block 64

Pattern: `specs/sliding_window.attn` (window 512) and `specs/causal.attn`; backend "torch"
(the default CPU choice for block scores), B=1, H=4, D=64, float32, `--threads` torch threads,
median of --reps calls after a warm-up; wall and process CPU milliseconds. The block scores
come from a second pass over the forward's kept tiles (QKᵀ and mask, no P·V;
`attncc.runtime.block_scores.pooled_scores`), max- and mean-pooled.
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
    """(median wall s, median CPU s) of `reps` calls after one warm-up."""
    fn()
    wall, cpu = [], []
    for _ in range(reps):
        t, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return statistics.median(wall), statistics.median(cpu)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1024,2048,4096")
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print("| pattern | tokens | forward ms (CPU ms) | + max scores ms (CPU ms) | overhead "
          "| + mean scores ms (CPU ms) | overhead |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, params in (("causal", {}), ("sliding_window", {"window": 512})):
        kern = attncc.compile(attncc.load(os.path.join(SPECS, name + ".attn"), **params),
                              backend="torch")
        label = name + (f" {params['window']}" if params else "")
        for n in (int(s) for s in args.sizes.split(",")):
            gen = torch.Generator().manual_seed(0)
            q, k, v = (torch.randn(1, 4, n, 64, generator=gen) for _ in range(3))
            with torch.no_grad():
                t0 = median_time(lambda: kern(q, k, v), args.reps)
                t1 = median_time(lambda: kern(q, k, v, return_block_scores=args.block), args.reps)
                t2 = median_time(lambda: kern(q, k, v, return_block_scores=args.block,
                                              block_scores_pool="mean"), args.reps)
            cells = [f"{t[0] * 1e3:.1f} ({t[1] * 1e3:.0f})" for t in (t0, t1, t2)]
            print(f"| {label} | {n} | {cells[0]} | {cells[1]} | {t1[1] / t0[1]:.2f}× | {cells[2]} "
                  f"| {t2[1] / t0[1]:.2f}× |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
