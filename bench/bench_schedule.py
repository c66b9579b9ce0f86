"""Schedule-building benchmark: attncc `build_schedule` (+ BlockMask export) versus
FlexAttention `create_block_mask`, eager and compiled, on CPU.

    python bench/bench_schedule.py                       # full table (several minutes)
    python bench/bench_schedule.py --sizes 1024,4096 --patterns sliding256

Patterns (all with FlexAttention's 128×128 blocks; attncc runs with 1-D 128-token tiles so
both produce the same block structure):
    sliding256 / sliding4096   causal & q - k < W          (specs/sliding_window.attn)
    natten2d                   NATTEN 2-D, kernel 7×7, on a square grid of side ⌊√L⌋
                               (specs/natten2d.attn; the token count is side², e.g. 362² = 131044)
    document                   causal within packed documents of random lengths (uniform in
                               [64, 2048] tokens, seed 0) (specs/document.attn)
    mmdit                      77 text tokens then a frames×32×32 video grid, text attends to
                               and is seen by everything, video tokens use a 3-D NATTEN
                               neighborhood (3, 7, 7) (specs/mmdit_natten.attn); frames =
                               max(3, round(L / 1024)), e.g. 16 frames = 16,461 tokens at 16K;
                               not in the default set (`--patterns mmdit`)

FlexAttention's mask_mods are written the way a user would write them (plain torch ops on
the index arguments), not lowered from attncc's IR. attncc's `document` schedule is the
static causal envelope (the document ids are runtime data: those tiles are PARTIAL), while
create_block_mask sees the ids; the block-level check below accounts for that.

Each (method, pattern) runs in its own subprocess over increasing sizes. Time is the median
of several runs (one at ≥ 64K tokens); attncc's memoization is cleared before each run. For
compiled create_block_mask (`torch.compile(create_block_mask)`,
one compiled function per subprocess) the first call at each size (which compiles) is timed separately
and the reported time is a later, warm call. Peak memory is the largest resident-set growth
over the RSS just before the call, sampled every millisecond by a thread. Eager
create_block_mask sizes that would need more than half the machine's memory (about 10 bytes
per (q, k) element) are skipped, as are sizes after one that exceeded `--limit` seconds.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import queue
import statistics
import subprocess
import sys
import threading
import time

SIZES = (1024, 4096, 16384, 65536, 131072)
PATTERNS = ("sliding256", "sliding4096", "natten2d", "document")
METHODS = ("attncc", "flex_eager", "flex_compiled")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCK = 128
KERNEL = 7
EAGER_BYTES_PER_ELEMENT = 10


# ---- measurement helpers ------------------------------------------------------------------

def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Context manager: `.peak` = max RSS growth (bytes) over the RSS at entry."""

    def __enter__(self):
        self.base = _rss()
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss() - self.base)
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss() - self.base)


def _repeats(n_tokens: int) -> int:
    return 5 if n_tokens <= 4096 else 3 if n_tokens <= 16384 else 1


def tokens(pattern: str, size: int) -> int:
    if pattern == "natten2d":
        return math.isqrt(size) ** 2
    if pattern == "mmdit":
        return MMDIT_TEXT + _frames(size) * 32 * 32
    return size


MMDIT_TEXT = 77


def _frames(size: int) -> int:
    return max(3, round(size / 1024))


def doc_ids(n: int, seed: int = 0):
    """int64 [n]: document id per token, documents of uniform random length in [64, 2048]."""
    import torch
    g = torch.Generator().manual_seed(seed)
    lengths, total = [], 0
    while total < n:
        ln = int(torch.randint(64, 2049, (1,), generator=g))
        lengths.append(min(ln, n - total))
        total += lengths[-1]
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))


# ---- the two contestants ------------------------------------------------------------------

def attncc_pattern(pattern: str, size: int):
    import attncc
    spec = lambda name, **kw: attncc.load(os.path.join(ROOT, "specs", name + ".attn"), **kw)
    if pattern.startswith("sliding"):
        return spec("sliding_window", window=int(pattern[len("sliding"):]))
    if pattern == "natten2d":
        side = math.isqrt(size)
        return spec("natten2d", height=side, width=side, kernel=KERNEL)
    if pattern == "mmdit":
        return spec("mmdit_natten", text=MMDIT_TEXT, frames=_frames(size), kernel_t=3,
                    kernel=KERNEL)
    return spec("document")


def flex_mask_mod(pattern: str, size: int):
    if pattern.startswith("sliding"):
        w = int(pattern[len("sliding"):])
        return lambda b, h, q, k: (q >= k) & (q - k < w)
    if pattern == "natten2d":
        side = math.isqrt(size)

        def natten(b, h, q, k):
            qy, qx, ky, kx = q // side, q % side, k // side, k % side
            sy = (qy - KERNEL // 2).clamp(0, side - KERNEL)
            sx = (qx - KERNEL // 2).clamp(0, side - KERNEL)
            return (sy <= ky) & (ky < sy + KERNEL) & (sx <= kx) & (kx < sx + KERNEL)
        return natten
    if pattern == "mmdit":
        frames, t = _frames(size), MMDIT_TEXT

        def window(i, j, length, kernel):
            start = (i - kernel // 2).clamp(0, length - kernel)
            return (start <= j) & (j < start + kernel)

        def mmdit(b, h, q, k):
            qi, ki = q - t, k - t
            video = (q >= t) & (k >= t) \
                & window(qi // 1024, ki // 1024, frames, 3) \
                & window(qi // 32 % 32, ki // 32 % 32, 32, KERNEL) \
                & window(qi % 32, ki % 32, 32, KERNEL)
            return (q < t) | (k < t) | video
        return mmdit
    doc = doc_ids(size)
    return lambda b, h, q, k: (q >= k) & (doc[q] == doc[k])


def run_attncc(pattern: str, n: int) -> dict:
    from attncc.runtime.options import CompileOptions
    from attncc.schedule import build as build_mod
    from attncc.schedule.blockmask import to_block_mask
    p = attncc_pattern(pattern, n)
    opts = CompileOptions(block_m=BLOCK, block_n=BLOCK, tile_1d=True)
    inputs = {"doc": doc_ids(n)[None]} if pattern == "document" else None
    build_t, export_t = [], []
    for _ in range(_repeats(n)):
        build_mod._build.cache_clear()
        t0 = time.perf_counter()
        sched = build_mod.build_schedule(p, n, n, options=opts)
        t1 = time.perf_counter()
        bm = to_block_mask(sched, inputs=inputs)
        t2 = time.perf_counter()
        build_t.append(t1 - t0)
        export_t.append(t2 - t1)
    build_mod._build.cache_clear()
    with PeakRSS() as mem:
        sched = build_mod.build_schedule(p, n, n, options=opts)
        bm = to_block_mask(sched, inputs=inputs)
    tiles = sum(c.full.nnz + c.partial.nnz for c in sched.classes)
    return {"build_s": statistics.median(build_t), "export_s": statistics.median(export_t),
            "peak_bytes": mem.peak, "tiles_visited": tiles, "blocks": _blocks(bm)}


_COMPILED_CBM = None


def run_flex(pattern: str, n: int, compiled: bool) -> dict:
    import torch
    from torch.nn.attention.flex_attention import create_block_mask
    global _COMPILED_CBM
    fn = create_block_mask
    if compiled:
        if _COMPILED_CBM is None:
            _COMPILED_CBM = torch.compile(create_block_mask)
        fn = _COMPILED_CBM
    mm = flex_mask_mod(pattern, n)
    call = lambda: fn(mm, 1, 1, n, n, device="cpu", BLOCK_SIZE=BLOCK)
    out = {}
    if compiled:
        t0 = time.perf_counter()
        call()
        out["first_call_s"] = time.perf_counter() - t0
    times = []
    for _ in range(_repeats(n)):
        t0 = time.perf_counter()
        bm = call()
        times.append(time.perf_counter() - t0)
    with PeakRSS() as mem:
        bm = call()
    out.update({"build_s": statistics.median(times), "peak_bytes": mem.peak,
                "blocks": _blocks(bm)})
    return out


def _blocks(bm) -> list:
    """Block-level summary for cross-checking: [n_partial, n_full] over all query blocks."""
    return [int(bm.kv_num_blocks.sum()), int(bm.full_kv_num_blocks.sum())]


def worker(method: str, pattern: str, sizes: list[int]) -> None:
    """Runs in a subprocess: one JSON line per size on stdout."""
    import torch
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    for size in sizes:
        n = tokens(pattern, size)
        if method == "attncc":
            res = run_attncc(pattern, n)
        else:
            res = run_flex(pattern, n, compiled=method == "flex_compiled")
        print(json.dumps({"size": size, "tokens": n, **res}), flush=True)


# ---- driver -------------------------------------------------------------------------------

def _mem_total() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 0


def collect(method: str, pattern: str, sizes: list[int], limit: float) -> dict:
    """{size: result dict or {"skipped": reason}} for one (method, pattern)."""
    results: dict[int, dict] = {}
    todo = []
    for size in sizes:
        n = tokens(pattern, size)
        need = EAGER_BYTES_PER_ELEMENT * n * n
        if method == "flex_eager" and need > _mem_total() / 2:
            results[size] = {"skipped": f"OOM (needs ~{need / 2**30:.0f} GB)"}
        else:
            todo.append(size)
    if not todo:
        return results
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", method, pattern,
           ",".join(map(str, todo))]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": ROOT})
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout] + [lines.put(None)],
                     daemon=True).start()
    stop = None
    for i, size in enumerate(todo):
        # Each size runs repeats + 2 calls; the first size of a run also imports and compiles.
        wait = limit * (_repeats(tokens(pattern, size)) + 2) + (120 if i == 0 else 0)
        try:
            line = lines.get(timeout=wait)
        except queue.Empty:
            stop = {"skipped": f"> {limit:.0f} s per call (stopped after {wait:.0f} s)"}
            break
        if line is None:
            stop = {"skipped": "worker failed (see stderr)"}
            break
        row = json.loads(line)
        results[size] = row
        if max(row["build_s"], row.get("first_call_s", 0.0)) > limit:
            stop = {"skipped": f"> {limit:.0f} s (a smaller size took longer)"}
            break
    proc.kill()
    proc.wait()
    for size in todo:
        results.setdefault(size, stop)
    return results


def _fmt_time(r: dict, key: str = "build_s") -> str:
    if "skipped" in r:
        return "skipped: " + r["skipped"]
    s = r[key]
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def _fmt_mem(r: dict) -> str:
    return "—" if "skipped" in r else f"{r['peak_bytes'] / 2**20:.0f} MB"


def table(all_res: dict, sizes: list[int], patterns: list[str]) -> str:
    head = ("| pattern | tokens | attncc tiles | attncc build | +BlockMask export | attncc peak ΔRSS | "
            "create_block_mask eager | eager peak ΔRSS | compiled (warm) | compiled 1st call | "
            "compiled peak ΔRSS | speedup vs compiled | blocks agree |")
    rows = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    for pat in patterns:
        for size in sizes:
            a = all_res.get(("attncc", pat), {}).get(size, {"skipped": "not run"})
            e = all_res.get(("flex_eager", pat), {}).get(size, {"skipped": "not run"})
            c = all_res.get(("flex_compiled", pat), {}).get(size, {"skipped": "not run"})
            n = tokens(pat, size)
            speed = "—"
            if "skipped" not in a and "skipped" not in c:
                speed = f"{c['build_s'] / (a['build_s'] + a['export_s']):.1f}×"
            agree = "—"
            ref = c if "skipped" not in c else e
            if "skipped" not in a and "skipped" not in ref:
                if pat == "document":  # attncc: causal envelope, all PARTIAL; must cover Flex's
                    agree = "superset" if sum(a["blocks"]) >= sum(ref["blocks"]) else "NO"
                else:
                    agree = "yes" if a["blocks"] == ref["blocks"] else f"NO {a['blocks']} vs {ref['blocks']}"
            tiles = a.get("tiles_visited", "—")
            rows.append(f"| {pat} | {n} | {tiles} | {_fmt_time(a)} | "
                        f"{_fmt_time(a, 'export_s') if 'skipped' not in a else '—'} | {_fmt_mem(a)} | "
                        f"{_fmt_time(e)} | {_fmt_mem(e)} | {_fmt_time(c)} | "
                        f"{_fmt_time(c, 'first_call_s') if 'skipped' not in c else '—'} | "
                        f"{_fmt_mem(c)} | {speed} | {agree} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)))
    ap.add_argument("--patterns", default=",".join(PATTERNS))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--limit", type=float, default=60.0,
                    help="skip larger sizes after a call slower than this (seconds)")
    ap.add_argument("--json", help="also write raw results to this file")
    ap.add_argument("--table-from", metavar="JSON", help="print the table of a saved --json run")
    ap.add_argument("--worker", nargs=3, metavar=("METHOD", "PATTERN", "SIZES"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        method, pattern, sizes = args.worker
        worker(method, pattern, [int(s) for s in sizes.split(",")])
        return 0
    sizes = [int(s) for s in args.sizes.split(",")]
    patterns = [p for p in args.patterns.split(",") if p]
    if args.table_from:
        with open(args.table_from) as f:
            raw = json.load(f)
        all_res = {tuple(key.split("/")): {int(s): r for s, r in v.items()} for key, v in raw.items()}
        print(table(all_res, sizes, patterns))
        return 0
    methods = [m for m in args.methods.split(",") if m]
    for p in patterns:
        if p not in PATTERNS + ("mmdit",) and not (p.startswith("sliding") and p[7:].isdigit()):
            ap.error(f"unknown pattern {p!r}; choose from {', '.join(PATTERNS)}")
    for m in methods:
        if m not in METHODS:
            ap.error(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    all_res = {}
    for pat in patterns:
        for m in methods:
            t0 = time.time()
            all_res[(m, pat)] = collect(m, pat, sizes, args.limit)
            print(f"# {m} {pat}: {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    print(table(all_res, sizes, patterns))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({f"{m}/{p}": {str(s): r for s, r in v.items()} for (m, p), v in all_res.items()},
                      f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
