"""Default CPU backend: time the "dense" (SDPA over the dense mask) and "flex" backends on the
same calls and print what the cost rule (`attncc.runtime.choose`) picks for each; with
--train, time training steps (forward + backward into q, k, v) of "dense" (autograd through
SDPA) and "torch" (block-sparse with its own backward) and print the default's pick.

    flock /tmp/attncc-bench.lock python bench/bench_choose.py [--reps 5] [--only causal]
    flock /tmp/attncc-bench.lock python bench/bench_choose.py --train

float32, B=1, H=4, D=64; medians of `--reps` calls after one warm-up call (FlexAttention's
compilation excluded). `visited` is the fraction of 128×128 blocks FlexAttention visits, or
with --train of the torch backend's 64×64 tiles ("-" where the rule did not need it: small
shapes, masks that read runtime data).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import attncc  # noqa: E402
from attncc.runtime.bench import time_fn  # noqa: E402
from attncc.runtime.choose import visited_fraction  # noqa: E402
from attncc.runtime.verify import random_inputs  # noqa: E402

SPECS = os.path.join(os.path.dirname(HERE), "specs")
CASES = [
    ("causal", {}, 1024), ("causal", {}, 2048), ("causal", {}, 4096),
    ("sliding_window", {"window": 256}, 1024), ("sliding_window", {"window": 256}, 2048),
    ("sliding_window", {"window": 256}, 4096),
    ("natten2d", {"height": 16, "width": 16, "kernel": 7}, None),
    ("natten2d", {"height": 32, "width": 32, "kernel": 7}, None),
    ("natten2d", {"height": 48, "width": 48, "kernel": 7}, None),
    ("natten2d", {"height": 64, "width": 64, "kernel": 7}, None),
    ("document", {}, 2048),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--train", action="store_true", help="training steps: dense vs torch")
    args = ap.parse_args(argv)
    H, D = args.heads, args.head_dim
    if args.train:
        return train(args)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, H={H}, D={D}, float32")
    print("| case | L | visited | dense ms | flex ms | faster | rule picks | rule's reason |")
    print("|---|---|---|---|---|---|---|---|")
    for spec, params, L in CASES:
        if args.only and spec not in args.only:
            continue
        p = attncc.load(os.path.join(SPECS, spec + ".attn"), **params)
        L = L or p.layout.numel
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, H, L, D, generator=g) for _ in range(3))
        inputs = random_inputs(p, batch=1, heads=H, q_len=L, kv_len=L, generator=g)
        ms = {}
        with torch.no_grad():
            for b in ("dense", "flex"):
                kern = attncc.compile(p, backend=b)
                ms[b] = time_fn(lambda: kern(q, k, v, **inputs), "cpu", warmup=1, reps=args.reps)
        auto = attncc.compile(p)
        choice = auto.choose(L, L, H)
        visited = auto._flex_visited.get((L, L, H))
        label = spec + (" " + ",".join(f"{a}={b}" for a, b in params.items()) if params else "")
        shown = "-" if visited is None else f"{visited:.3f}"  # "-": not needed by the rule
        print(f"| {label} | {L} | {shown} | "
              f"{ms['dense']:.1f} | {ms['flex']:.1f} | {min(ms, key=ms.get)} | "
              f"{choice.backend} | {choice.reason} |", flush=True)
    return 0


def train(args) -> int:
    H, D = args.heads, args.head_dim
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, H={H}, D={D}, float32, "
          "forward + backward")
    print("| case | L | visited | dense ms | torch ms | faster | rule picks | rule's reason |")
    print("|---|---|---|---|---|---|---|---|")
    for spec, params, L in CASES + TRAIN_CASES:
        if args.only and spec not in args.only:
            continue
        p = attncc.load(os.path.join(SPECS, spec + ".attn"), **params)
        L = L or p.layout.numel
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, H, L, D, generator=g).requires_grad_() for _ in range(3))
        dout = torch.randn(1, H, L, D, generator=g)
        inputs = random_inputs(p, batch=1, heads=H, q_len=L, kv_len=L, generator=g)
        ms = {}
        for b in ("dense", "torch"):
            kern = attncc.compile(p, backend=b)

            def step():
                q.grad = k.grad = v.grad = None
                kern(q, k, v, **inputs).backward(dout)
            ms[b] = time_fn(step, "cpu", warmup=1, reps=args.reps)
        auto = attncc.compile(p)
        choice = auto.choose(L, L, H, grad=True)
        visited = visited_fraction(auto.schedule(L, L, H))  # the torch backend's tiles
        label = spec + (" " + ",".join(f"{a}={b}" for a, b in params.items()) if params else "")
        shown = "-" if visited is None else f"{visited:.3f}"
        print(f"| {label} | {L} | {shown} | {ms['dense']:.1f} | {ms['torch']:.1f} | "
              f"{min(ms, key=ms.get)} | {choice.backend} | {choice.reason} |", flush=True)
    return 0


# Training cases beyond the forward ones: shorter and longer sequences.
TRAIN_CASES = [
    ("causal", {}, 512), ("sliding_window", {"window": 256}, 512),
    ("sliding_window", {"window": 128}, 8192), ("causal", {}, 8192),
]


if __name__ == "__main__":
    sys.exit(main())
