"""Context-parallel plans in simulation (no processes): bytes moved and load balance at 8 to
1024 ranks for library patterns at 128K to 1M tokens, versus all-gather CP and ring attention.

    python bench/bench_cp_plan.py                                   # the table in BENCHMARKS.md
    python bench/bench_cp_plan.py --patterns causal,sliding_window --tokens 131072 --ranks 8,64

For each (pattern, tokens, ranks) `attncc.distributed.make_plan` plans with balance="auto"
(every applicable layout compared; the chosen one is reported) for one call of batch 1,
8 KV heads, head_dim 128 in bfloat16 (4 KiB of K+V per token). All-gather CP and ring
attention move every other rank's K/V to each rank: (W-1)/W · L · 4 KiB per rank per call
(forward; the backward pass of each moves as much again). "imbalance" is max/mean load over
ranks (kept pairs where affordable, else pairs in visited tiles — the `load` column says
which); "contiguous" is the imbalance of plain contiguous shards (what all-gather CP and ring
attention without load balancing compute). Times are the plan alone (the schedule, built once
per pattern and length, is timed separately).

Patterns: causal; sliding_window (4096); chunked (8192, causal inside chunks); streaming_sinks
(4 sinks + 4096 window); document (packed documents of lengths uniform in [1K, 64K] tokens,
seed 0); natten2d (13×13 on a 256×512 / 1024×1024 grid); natten3d (3×7×7 on 32×64×64 /
64×128×128).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

import attncc
from attncc.distributed import make_plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATTERNS = ("causal", "sliding_window", "chunked", "streaming_sinks", "document", "natten2d",
            "natten3d")
GRIDS = {"natten2d": {131072: (256, 512), 1048576: (1024, 1024)},
         "natten3d": {131072: (32, 64, 64), 1048576: (64, 128, 128)}}
PARAMS = {"sliding_window": {"window": 4096}, "chunked": {"chunk": 8192},
          "streaming_sinks": {"sinks": 4, "window": 4096}}
KV_HEADS, HEAD_DIM = 8, 128


def kernel(name: str, tokens: int):
    spec = os.path.join(ROOT, "specs", name + ".attn")
    block = 128 if tokens <= 131072 else 256
    params = dict(PARAMS.get(name, {}))
    if name == "natten2d":
        h, w = GRIDS[name][tokens]
        params.update(height=h, width=w, kernel=13)
        return attncc.compile(spec, params=params, backend="reference")
    if name == "natten3d":
        d, h, w = GRIDS[name][tokens]
        params.update(depth=d, height=h, width=w, kernel_t=3, kernel=7)
        return attncc.compile(spec, params=params, backend="reference")
    return attncc.compile(spec, params=params or None, backend="reference", block_m=block,
                          block_n=block)


def documents(tokens: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    ids = torch.empty(1, tokens, dtype=torch.int64)
    pos, d = 0, 0
    while pos < tokens:
        n = int(torch.randint(1024, 65537, (1,), generator=g))
        ids[0, pos:pos + n] = d
        pos, d = pos + n, d + 1
    return ids


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--patterns", default=",".join(PATTERNS))
    ap.add_argument("--tokens", default="131072,1048576")
    ap.add_argument("--ranks", default="8,64,256,1024")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print("| pattern | tokens | ranks | balance | attncc MiB/rank max | mean | all-gather / ring "
          "MiB/rank | ratio (mean) | imbalance | contiguous | load | granularity | plan s |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---|---|---:|")
    for name in args.patterns.split(","):
        for tokens in map(int, args.tokens.split(",")):
            kern = kernel(name, tokens)
            inputs = {"doc": documents(tokens)} if name == "document" else None
            t0 = time.perf_counter()
            kern.schedule(tokens, tokens)
            t_sched = time.perf_counter() - t0
            print(f"<!-- {name} {tokens}: schedule {t_sched:.1f} s -->", file=sys.stderr)
            for world in map(int, args.ranks.split(",")):
                t0 = time.perf_counter()
                plan = make_plan(kern, tokens, world=world, kv_heads=KV_HEADS,
                                 head_dim=HEAD_DIM, dtype=torch.bfloat16, inputs=inputs)
                dt = time.perf_counter() - t0
                ag = plan.allgather_bytes() / world
                mx = plan.max_recv_bytes
                cont = plan.candidates.get("contiguous", (plan.imbalance,))[0]
                mean = plan.total_bytes / world
                ratio = f"{ag / mean:,.1f}×" if mean else "∞"
                bal = plan.balance + (f" {plan.q_layout.detail}" if plan.q_layout.detail else "")
                print(f"| {name} | {tokens:,} | {world} | {bal} | {mib(mx)} | {mib(mean)} "
                      f"| {mib(ag)} | {ratio} | {plan.imbalance:.3f} "
                      f"| {cont:.3f} | {plan.load_kind} | {plan.granularity} | {dt:.1f} |",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
