"""Tile-analysis benchmark: `build_schedule` time / peak memory across sequence lengths, and
tile efficiency of multi-dimensional versus 1-D tiles on neighborhood patterns.

    python bench/bench_tiles.py                      # both tables
    python bench/bench_tiles.py --sizes 1024,4096    # fewer lengths
    python bench/bench_tiles.py --only efficiency

Build table: default `CompileOptions` (64-token tiles; the tile-shape cost model runs on
grid layouts). Patterns
    window4096   causal & q - k < 4096            (specs/sliding_window.attn, window = 4096)
    chunked      causal & q // 8192 == k // 8192  (specs/chunked.attn, chunk = 8192)
    natten2d     NATTEN 2-D, kernel 7, square map of side ⌊√L⌋ (so 362² = 131044 at 128K)
Each (pattern, length) runs in a fresh subprocess: time is one cold `build_schedule` call;
peak memory is the growth of the process's maximum resident set over the call
(`ru_maxrss`, which includes torch's allocations).

Efficiency table: kept pairs / pairs computed in visited tiles, for the cost model's choice,
for plain 1-D tiles and for fixed boxes, at 64-token tiles.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

_CHILD = r"""
import json, math, resource, sys, time
import attncc
from attncc.schedule.build import build_schedule
name, n = sys.argv[1], int(sys.argv[2])
if name == "window4096":
    p, args = attncc.load("specs/sliding_window.attn", window=4096), (n, n)
elif name == "chunked":
    p, args = attncc.load("specs/chunked.attn", chunk=8192), (n, n)
else:
    side = math.isqrt(n)
    p, args = attncc.load("specs/natten2d.attn", height=side, width=side, kernel=7), (None, None)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
s = build_schedule(p, *args)
dt = time.perf_counter() - t0
peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024
print(json.dumps({"tokens": s.q_len, "time_s": dt, "peak_bytes": peak,
                  "tiles": f"{s.n_q_tiles}x{s.n_kv_tiles}", "tile": s.stats["q_tile"],
                  "fallback": s.stats["fallback_tiles"], "closed_form": s.classes[0].bounds is not None,
                  "density": s.density()}))
"""


def build_table(sizes, patterns):
    print("| pattern | tokens | tiles (q×kv) | tile | build time (s) | peak RSS growth (MiB) | fallback tiles | closed form | density |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in patterns:
        for n in sizes:
            out = subprocess.run([sys.executable, "-c", _CHILD, name, str(n)], cwd=ROOT,
                                 capture_output=True, text=True)
            if out.returncode:
                print(f"| {name} | {n} | failed: {out.stderr.strip().splitlines()[-1]} |")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {name} | {r['tokens']} | {r['tiles']} | {r['tile']} | {r['time_s']:.3f} | "
                  f"{r['peak_bytes'] / 2 ** 20:.1f} | {r['fallback']} | {r['closed_form']} | "
                  f"{r['density']:.5f} |", flush=True)


def efficiency_table():
    import attncc
    from attncc.runtime.options import CompileOptions
    from attncc.schedule.build import build_schedule
    cases = [
        ("natten2d 64×64 k7", "natten2d", dict(height=64, width=64, kernel=7), [(8, 8), (4, 16)]),
        ("natten2d 128×128 k7", "natten2d", dict(height=128, width=128, kernel=7), [(8, 8), (4, 16)]),
        ("natten2d 128×128 k13", "natten2d", dict(height=128, width=128, kernel=13), [(8, 8), (4, 16)]),
        ("natten2d 96×96 k7 d2", "natten2d", dict(height=96, width=96, kernel=7, dilation=2), [(8, 8)]),
        ("natten3d 16×32×32 k(3,7)", "natten3d", dict(depth=16, height=32, width=32, kernel_t=3, kernel=7),
         [(4, 4, 4), (2, 8, 4), (1, 8, 8)]),
        ("gna 128×128 k16 s8", "gna", dict(height=128, width=128, kernel=16, stride=8), [(8, 8)]),
    ]
    print("| pattern | chosen tile | efficiency (chosen) | efficiency (1-D 64) | fixed boxes |")
    print("|---|---|---|---|---|")
    for label, spec, params, boxes in cases:
        p = attncc.load(f"specs/{spec}.attn", **params)
        s = build_schedule(p)
        fixed = []
        for b in boxes:
            sb = build_schedule(p, options=CompileOptions(q_tile=b, kv_tile=b))
            fixed.append(f"{'×'.join(map(str, b))}: {sb.efficiency():.3f}")
        print(f"| {label} | {s.stats['q_tile']} | {s.efficiency():.3f} | "
              f"{s.stats['efficiency_1d']:.3f} | {', '.join(fixed)} |", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1024,4096,16384,65536,131072")
    ap.add_argument("--patterns", default="window4096,chunked,natten2d")
    ap.add_argument("--only", choices=("build", "efficiency"))
    a = ap.parse_args(argv)
    if a.only != "efficiency":
        build_table([int(x) for x in a.sizes.split(",")], a.patterns.split(","))
        print()
    if a.only != "build":
        efficiency_table()


if __name__ == "__main__":
    main()
