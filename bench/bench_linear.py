"""Linear attention (`normalize none`) on CPU: time per token of the chunked linear-time
algorithm versus the quadratic block-sparse path, from 1K to 64K tokens.

    flock /tmp/attncc-bench.lock python bench/bench_linear.py
    python bench/bench_linear.py --sizes 1024,4096 --quadratic-max 4096 --heads 2

The pattern is the library's `lightning` spec (causal, per-head decay, no softmax).
Columns:
  linear fwd       `attncc.compile(lightning, backend="torch")` forward: the torch chunked
                   algorithm (Lightning Attention-2) the runtime picks for a separable spec
  linear fwd+bwd   forward plus backward (autograd through the blockwise torch ops)
  quadratic fwd    the same spec on the quadratic block-sparse path in torch
                   (`runtime.linear.quadratic_none` over the causal schedule: every kept tile
                   computed, no softmax), run up to --quadratic-max tokens
Times are the median of --reps calls after one warm-up, divided by the number of tokens
(µs/token, batch 1); float32, head dim 64, `--threads` torch threads.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import attncc  # noqa: E402
from attncc.runtime.linear import quadratic_none  # noqa: E402

SPEC = os.path.join(os.path.dirname(HERE), "specs", "lightning.attn")


def median_time(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1024,2048,4096,8192,16384,32768,65536")
    ap.add_argument("--quadratic-max", type=int, default=16384,
                    help="largest length run on the quadratic path (default 16384)")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--block", type=int, default=64, help="tokens per chunk (block_m)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-backward", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    H, D = args.heads, args.dim
    pattern = attncc.load(SPEC, heads=H)
    kern = attncc.compile(pattern, backend="torch", block_m=args.block)
    quad = attncc.compile(pattern, backend="torch", block_m=64, block_n=64)
    rows = []
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} threads, B=1 H={H} D={D} float32, chunk {args.block}", flush=True)
    print("| tokens | linear fwd µs/token | linear fwd+bwd µs/token | quadratic fwd µs/token | "
          "quadratic / linear |")
    print("|---:|---:|---:|---:|---:|")
    for n in (int(s) for s in args.sizes.split(",")):
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, H, n, D, generator=gen) for _ in range(3))
        with torch.no_grad():
            t_lin = median_time(lambda: kern(q, k, v), args.reps)
        assert kern.last_algorithm.linear
        t_bwd = None
        if not args.no_backward:
            qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))

            def fwd_bwd():
                kern(qg, kg, vg).sum().backward()
            t_bwd = median_time(fwd_bwd, args.reps)
        t_quad = None
        if n <= args.quadratic_max:
            sched = quad.schedule(n, n, H)
            with torch.no_grad():
                t_quad = median_time(lambda: quadratic_none(pattern, sched, q, k, v, {}, D ** -0.5),
                                     max(1, min(args.reps, 2 if n > 4096 else args.reps)))
        us = lambda t: "–" if t is None else f"{t / n * 1e6:.2f}"  # noqa: E731
        ratio = "–" if t_quad is None else f"{t_quad / t_lin:.1f}×"
        line = f"| {n} | {us(t_lin)} | {us(t_bwd)} | {us(t_quad)} | {ratio} |"
        rows.append(line)
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
