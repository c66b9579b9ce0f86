"""Decode-step benchmark: attncc `Kernel.decode` vs SDPA over the whole cache and compiled
FlexAttention, at several cache lengths and batch sizes (one new token per sequence).

    flock /tmp/attncc-bench.lock python3 bench/bench_decode.py [--quick] [--threads 1]
    python3 bench/bench_decode.py --aot      # decode kernels of the library, sm_80 / sm_90

Prints markdown tables (docs/BENCHMARKS.md, section "Decode"). On CPU attncc runs its torch
path (gather the kept key ranges, attend); on CUDA the generated split-KV kernel. Sizes are
trimmed to what a small CPU machine holds: Hq = 8 query heads, Hkv = 2 key heads, D = 128,
float32 (2 KiB of K+V per cached token).
"""
import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import attncc  # noqa: E402
from attncc.runtime.bench_decode import bench_decode  # noqa: E402

SPECS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "specs")

# (spec, params, batch, cache_len, page_size, baselines)
FULL = [
    ("sliding_window", {"window": 4096}, 1, 4096, None, ("sdpa", "flex")),
    ("sliding_window", {"window": 4096}, 1, 16384, None, ("sdpa",)),
    ("sliding_window", {"window": 4096}, 1, 65536, None, ("sdpa",)),
    ("sliding_window", {"window": 4096}, 1, 131072, None, ("sdpa", "flex")),
    ("sliding_window", {"window": 4096}, 1, 131072, 256, ("sdpa",)),
    ("sliding_window", {"window": 4096}, 8, 16384, None, ("sdpa",)),
    ("sliding_window", {"window": 4096}, 64, 4096, None, ("sdpa",)),
    ("streaming_sinks", {"sinks": 4, "window": 4096}, 1, 131072, None, ("sdpa",)),
    ("causal", {}, 1, 16384, None, ("sdpa",)),
]
QUICK = [FULL[0], FULL[3]]

AOT_SPECS = ("causal", "sliding_window", "streaming_sinks", "chunked", "prefix_lm", "document",
             "moa", "alibi", "softcap", "seer_gate", "moh")
# (head_dim, new tokens, page size or None for a contiguous cache)
AOT_SHAPES = ((128, 1, 256), (128, 7, None), (64, 2, 64), (64, 1, None))


def aot_sweep(workers: int = 2) -> int:
    """Compile every library pattern's decode kernel for sm_80 and sm_90 (bf16, the launch
    specialization of the runtime) and print registers and spills; exit 1 on a spill."""
    from attncc.runtime.aot import run_jobs
    jobs = [{"arch": arch, "sass": False, "entry": "attncc.runtime.decode_launch:decode_case",
             "kwargs": {"spec": os.path.join(SPECS, f"{s}.attn"), "head_dim": d, "lq": lq,
                        "page_size": ps}}
            for arch in (80, 90) for s in AOT_SPECS for d, lq, ps in AOT_SHAPES]
    bad = 0
    print("| spec | sm | D | Lq | cache | warps | stages | registers | spill bytes |")
    print("|---|---|---|---|---|---|---|---|---|")
    for job, reports in zip(jobs, run_jobs(jobs, workers=workers)):
        kw = job["kwargs"]
        for r in reports:
            spill = r.get("spill_bytes", -1)
            bad += (not r.get("ok")) or spill != 0
            cache = f"paged {kw['page_size']}" if kw["page_size"] else "contiguous"
            print(f"| {os.path.basename(kw['spec'])[:-5]} | {job['arch']} | {kw['head_dim']} | "
                  f"{kw['lq']} | {cache} | {r.get('num_warps')} | {r.get('num_stages')} | "
                  f"{r.get('registers')} | {spill if r.get('ok') else r.get('error', '')[:60]} |")
    print(f"{len(jobs)} kernels, {bad} failing")
    return 1 if bad else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads for every implementation (default 1)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--aot", action="store_true",
                    help="compile the library's decode kernels for sm_80/sm_90 instead")
    args = ap.parse_args()
    if args.aot:
        return aot_sweep()
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}")
    for spec, params, batch, cache_len, page, baselines in (QUICK if args.quick else FULL):
        p = attncc.load(os.path.join(SPECS, f"{spec}.attn"), **params)
        res = bench_decode(p, batch=batch, cache_len=cache_len, page_size=page, device=device,
                           baselines=baselines, reps=args.reps)
        print()
        print(res)
        for name in ("sdpa", "flex"):
            try:
                r = res.ratio(name)
            except StopIteration:
                continue
            if not math.isnan(r):
                print(f"{name} time / attncc time: {r:.2f}")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
