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

Segments table (`--only segments`): segmented and separate query/key layouts
(mmdit_natten at its default 77 + 16·32·32 = 16,461 tokens with 64- and 128-slot tiles and
with kernel 13, vit_cls_natten at 1 + 4 + 14·14, hilo at its defaults, a 64×64 query grid
over a 32×32 key grid with `neighborhood(7)`): the tiles the cost
model picks (token runs 1-D, grid boxes), and with `tile_1d` (plain 1-D tiles over the flat
sequence). Each row runs in a
fresh subprocess with one torch thread: a cold `build_schedule` call, wall and CPU seconds,
the tiles, efficiency and the tiles decided by exact evaluation. `--tree DIR` runs the
children against another checkout of attncc (e.g. an older commit, for before/after).
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


_SEG_CHILD = r"""
import json, sys, time, torch
torch.set_num_threads(1)
import attncc
from attncc.schedule.build import build_schedule
from attncc.runtime.options import CompileOptions
spec, flat, params, block = sys.argv[1], sys.argv[2] == "1d", json.loads(sys.argv[3]), int(sys.argv[4])
p = attncc.parse(spec, **params) if spec.startswith("pattern") else \
    attncc.load("specs/" + spec + ".attn", **params)
opts = CompileOptions(block_m=block, block_n=block, tile_1d=flat)
q_len = p.fixed_length
kv_len = getattr(p, "fixed_kv_length", None) or q_len
heads = p.param_dict.get("heads", 1)
t0, c0 = time.perf_counter(), time.process_time()
s = build_schedule(p, q_len, kv_len, heads, options=opts)
dt, dc = time.perf_counter() - t0, time.process_time() - c0
print(json.dumps({"tokens": f"{s.q_len}x{s.kv_len}", "wall_s": dt, "cpu_s": dc,
                  "tiles": f"{s.n_q_tiles}x{s.n_kv_tiles}",
                  "tile": s.stats["q_tile"] + " / " + s.stats["kv_tile"],
                  "efficiency": s.efficiency(), "fallback": s.stats["fallback_tiles"],
                  "kept": s.stats["kept_pairs"]}))
"""

# A 64×64 query grid over a 32×32 key grid, NATTEN 7×7 around each query's key cell.
POOLED = ("pattern pooled_natten\nlayout q_grid(y = 64, x = 64)\nlayout k_grid(y = 32, x = 32)\n"
          "mask neighborhood(7)\n")
SEG_CASES = [(spec, params, mode, block)
             for spec, params, block in (("mmdit_natten", {}, 64), ("mmdit_natten", {}, 128),
                                         ("mmdit_natten", {"kernel": 13}, 64),
                                         ("vit_cls_natten", {}, 64), ("hilo", {}, 64),
                                         (POOLED, {}, 64))
             for mode in ("chosen", "1d")]


def segments_table(tree: str):
    print("| spec | slots | tiles | tokens (q×kv) | tile pairs | tile (q / kv) | build wall (s) | "
          "build CPU (s) | efficiency | exact-fallback tiles |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for spec, params, mode, block in SEG_CASES:
        out = subprocess.run([sys.executable, "-c", _SEG_CHILD, spec, mode, json.dumps(params),
                              str(block)], cwd=tree, capture_output=True, text=True,
                             env=dict(os.environ, PYTHONPATH=tree))
        name = ("64×64 over 32×32, neighborhood(7)" if spec is POOLED else spec) \
            + "".join(f" {k}={v}" for k, v in params.items())
        if out.returncode:
            print(f"| {name} | {block} | {mode} | failed: "
                  f"{out.stderr.strip().splitlines()[-1]} |")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {name} | {block} | {'cost model' if mode == 'chosen' else '1-D (tile_1d)'} | "
              f"{r['tokens']} | {r['tiles']} | {r['tile']} | {r['wall_s']:.3f} | "
              f"{r['cpu_s']:.3f} | {r['efficiency']:.3f} | {r['fallback']} |", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1024,4096,16384,65536,131072")
    ap.add_argument("--patterns", default="window4096,chunked,natten2d")
    ap.add_argument("--only", choices=("build", "efficiency", "segments"))
    ap.add_argument("--tree", default=ROOT, help="attncc checkout the segments table runs "
                                                "(default: this one)")
    a = ap.parse_args(argv)
    if a.only == "segments":
        segments_table(os.path.abspath(a.tree))
        return
    if a.only != "efficiency":
        build_table([int(x) for x in a.sizes.split(",")], a.patterns.split(","))
        print()
    if a.only != "build":
        efficiency_table()
    if a.only is None:
        print()
        segments_table(os.path.abspath(a.tree))


if __name__ == "__main__":
    main()
