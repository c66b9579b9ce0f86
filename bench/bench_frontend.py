"""Front-end speed: parse + elaborate time of every library spec, and `dense_mask` time.

    python bench/bench_frontend.py

Prints a markdown table (warm timings: best of 5 rounds of 20 loads after one cold load).
"""
from __future__ import annotations

import glob
import os
import time

import torch

import attncc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def best_of(fn, rounds=5, reps=20) -> float:
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t0) / reps)
    return best


def main() -> None:
    print("| spec | cold load (ms) | warm parse + elaborate (ms) |")
    print("|---|---|---|")
    for path in sorted(glob.glob(os.path.join(ROOT, "specs", "*.attn"))):
        t0 = time.perf_counter()
        attncc.load(path)
        cold = time.perf_counter() - t0
        warm = best_of(lambda: attncc.load(path))
        print(f"| {os.path.basename(path)} | {cold * 1e3:.1f} | {warm * 1e3:.2f} |")
    p = attncc.load(os.path.join(ROOT, "specs", "natten2d.attn"), height=64, width=64, kernel=7)
    p.dense_mask(heads=8)
    t = best_of(lambda: p.dense_mask(heads=8), rounds=3, reps=1)
    print(f"\n`dense_mask` natten2d 64×64 (4096 tokens), kernel 7, 8 heads: {t * 1e3:.0f} ms "
          f"(torch {torch.__version__}, {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
