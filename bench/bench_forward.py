"""Forward-kernel benchmark suite: attncc versus SDPA (dense, dense bool mask) and compiled
FlexAttention (with its own create_block_mask), per library pattern.

    python bench/bench_forward.py                 # the suite for this machine (GPU if present)
    python bench/bench_forward.py --suite cpu     # small CPU sizes (attncc backend "flex")
    python bench/bench_forward.py --suite gpu --only causal natten2d

GPU suite (bf16, B=1, H=8, D=64 unless noted): causal and sliding window at 8K/16K/32K,
NATTEN 2-D on 64×64 and 128×128 maps, NATTEN 3-D on a 16×32×32 volume, GNA (strided
neighborhood, 2-D) on 128×128, packed documents at 16K. CPU suite: the same families at
sizes a 2-core machine runs in minutes, with attncc's "flex" backend (the Triton interpreter
is for verification only).

Prints one Markdown table; `--out FILE` also writes it.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import attncc  # noqa: E402
from attncc.runtime.bench import bench_forward  # noqa: E402

SPECS = os.path.join(os.path.dirname(HERE), "specs")

# (label, spec, params, bench_forward keyword arguments)
GPU_SUITE = [
    *[(f"causal {n // 1024}K", "causal", {}, dict(q_len=n)) for n in (8192, 16384, 32768)],
    *[(f"sliding_window 4096, {n // 1024}K", "sliding_window", {"window": 4096}, dict(q_len=n))
      for n in (8192, 16384, 32768)],
    ("natten2d 64×64 k7", "natten2d", {"height": 64, "width": 64, "kernel": 7}, {}),
    ("natten2d 128×128 k13", "natten2d", {"height": 128, "width": 128, "kernel": 13}, {}),
    ("natten3d 16×32×32 k(3,7,7)", "natten3d",
     {"depth": 16, "height": 32, "width": 32, "kernel_t": 3, "kernel": 7}, {}),
    ("gna 128×128 k16 s8", "gna", {"height": 128, "width": 128, "kernel": 16, "stride": 8}, {}),
    ("document 16K", "document", {}, dict(q_len=16384)),
]
CPU_SUITE = [
    ("causal 2K", "causal", {}, dict(q_len=2048)),
    ("sliding_window 256, 4K", "sliding_window", {"window": 256}, dict(q_len=4096)),
    ("natten2d 32×32 k7", "natten2d", {"height": 32, "width": 32, "kernel": 7}, {}),
    ("document 2K", "document", {}, dict(q_len=2048)),
]


def run(suite, *, heads: int, head_dim: int, only=None, reps=None):
    rows = ["| case | impl | ms | TFLOP/s (kept pairs) | time / attncc | note |",
            "|---|---|---|---|---|---|"]
    for label, spec, params, kw in suite:
        if only and spec not in only:
            continue
        p = attncc.load(os.path.join(SPECS, spec + ".attn"), **params)
        t0 = time.perf_counter()
        res = bench_forward(p, heads=heads, head_dim=head_dim, reps=reps, **kw)
        wall = time.perf_counter() - t0
        case = f"{label} (density {res.density:.3f})"
        for r in res.rows():
            rows.append(f"| {case} " + r)
            case = ""
        for key, val in res.extra.items():
            rows.append(f"| | ({key}: {val:.1f}) | | | | |")
        print(f"[{label}: {wall:.1f} s]", file=sys.stderr, flush=True)
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", choices=("cpu", "gpu"), default=None)
    ap.add_argument("--only", nargs="*", help="spec names to run")
    ap.add_argument("--heads", type=int, default=None)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    gpu = torch.cuda.is_available()
    suite = args.suite or ("gpu" if gpu else "cpu")
    if suite == "gpu" and not gpu:
        ap.error("the GPU suite needs a CUDA device")
    heads = args.heads or (8 if suite == "gpu" else 4)
    device = torch.cuda.get_device_name() if gpu else platform.processor() or platform.machine()
    header = (f"suite {suite}, {device}, torch {torch.__version__}, threads "
              f"{torch.get_num_threads()}, B=1, H={heads}, D={args.head_dim}")
    table = run(GPU_SUITE if suite == "gpu" else CPU_SUITE, heads=heads, head_dim=args.head_dim,
                only=args.only, reps=args.reps)
    text = header + "\n\n" + table + "\n"
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
