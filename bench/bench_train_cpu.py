"""CPU training cost: backend "torch" (block-sparse torch, own backward) vs SDPA with a dense mask.

Each measurement runs in a fresh subprocess so that its peak resident memory
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`) belongs to that one configuration; the script
prints a Markdown table (the best wall-clock and the best process-CPU seconds of --reps runs,
after one warm-up run for backend "torch", whose first call builds the schedule; CPU seconds
with one thread measure the work and are what a loaded machine distorts least; peak RSS of
the process and its growth over the RSS after the inputs were made).

    flock /tmp/attncc-bench.lock python bench/bench_train_cpu.py               # default table
    python bench/bench_train_cpu.py --one torch,fwdbwd,sliding_window,16384    # one cell (JSON)

Shapes: B=1, H=4 (query and KV heads), D=64, float32. Patterns: `sliding_window` (W=256,
causal) and `causal`. "default" is `attncc.compile(spec)` without a backend (the per-call CPU
choice; the table shows the backend that ran forward / forward + backward). "sdpa" is `torch.nn.functional.scaled_dot_product_attention` with a
dense boolean [L, L] mask of the same pattern (the mask is built before timing).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

B, H, D = 1, 4, 64
WINDOW = 256


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _dense_mask(pattern: str, L: int) -> torch.Tensor:
    i = torch.arange(L)
    keep = i[:, None] >= i[None, :]
    if pattern == "sliding_window":
        keep &= (i[:, None] - i[None, :]) < WINDOW
    return keep


def one(impl: str, mode: str, pattern: str, L: int, reps: int, threads: int) -> dict:
    import attncc
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    grad = mode == "fwdbwd"
    q, k, v = (torch.randn(B, H, L, D, requires_grad=grad) for _ in range(3))
    dout = torch.randn(B, H, L, D)
    kern = None
    if impl in ("torch", "default"):
        spec = attncc.load(f"specs/{pattern}.attn", **({"window": WINDOW}
                                                        if pattern == "sliding_window" else {}))
        kern = attncc.compile(spec, backend="torch" if impl == "torch" else None)
        fn = lambda: kern(q, k, v)  # noqa: E731
    else:
        mask = _dense_mask(pattern, L)
        sdpa = torch.nn.functional.scaled_dot_product_attention
        fn = lambda: sdpa(q, k, v, attn_mask=mask)  # noqa: E731

    def step():
        if grad:
            q.grad = k.grad = v.grad = None
            fn().backward(dout)
        else:
            with torch.no_grad():
                fn()
    base = _rss_mb()
    times, cpu = [], []
    warm = impl != "sdpa"  # the first call builds the schedule (cached afterwards)
    for i in range(reps + warm):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        if i or not warm:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    return {"impl": impl, "mode": mode, "pattern": pattern, "L": L,
            "time_s": min(times), "cpu_s": min(cpu),
            "peak_rss_mb": _maxrss_mb(), "base_rss_mb": base, "threads": torch.get_num_threads(),
            "load": os.getloadavg()[0], "ran": kern.last_backend if kern is not None else "sdpa"}


def run_cell(impl, mode, pattern, L, reps, threads) -> dict:
    cmd = [sys.executable, __file__, "--one", f"{impl},{mode},{pattern},{L}", "--reps", str(reps),
           "--threads", str(threads)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        return {"impl": impl, "mode": mode, "pattern": pattern, "L": L,
                "error": (r.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])


DEFAULT = [
    # (pattern, L, impls); "default" is attncc.compile(spec) without a backend: the per-call
    # CPU choice (the table says which backend ran)
    ("sliding_window", 1024, ("default", "torch", "sdpa")),
    ("sliding_window", 4096, ("default", "torch", "sdpa")),
    ("sliding_window", 8192, ("default", "torch", "sdpa")),
    ("sliding_window", 16384, ("default", "torch", "sdpa")),
    ("causal", 1024, ("default", "torch", "sdpa")),
    ("causal", 4096, ("default", "torch", "sdpa")),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--one", help="impl,mode,pattern,L: measure one cell, print JSON")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 by default: CPU seconds then measure work, not the "
                         "spinning of idle threads on a loaded machine)")
    args = ap.parse_args()
    if args.one:
        impl, mode, pattern, L = args.one.split(",")
        print(json.dumps(one(impl, mode, pattern, int(L), args.reps, args.threads)))
        return
    cells = list(DEFAULT)
    print(f"torch {torch.__version__}, {args.threads} thread(s), B={B} H={H} D={D} "
          f"float32, window={WINDOW}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print("| pattern | L | impl | fwd wall / CPU (s) | fwd+bwd wall / CPU (s) | "
          "peak RSS fwd+bwd (MiB) | growth (MiB) | load avg |")
    print("|---|---|---|---|---|---|---|---|")
    for pattern, L, impls in cells:
        for impl in impls:
            reps = 1 if L >= 8192 and impl == "sdpa" else args.reps
            f = run_cell(impl, "fwd", pattern, L, reps, args.threads)
            fb = run_cell(impl, "fwdbwd", pattern, L, reps, args.threads)
            if "error" in f or "error" in fb:
                print(f"| {pattern} | {L} | {impl} | {f.get('error', '')} | "
                      f"{fb.get('error', '')} | | | |")
                continue
            label = impl if impl != "default" else f"default ({f['ran']} / {fb['ran']})"
            print(f"| {pattern} | {L} | {label} | {f['time_s']:.3f} / {f['cpu_s']:.3f} | "
                  f"{fb['time_s']:.3f} / {fb['cpu_s']:.3f} | {fb['peak_rss_mb']:.0f} | "
                  f"{fb['peak_rss_mb'] - fb['base_rss_mb']:.0f} | {fb['load']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
