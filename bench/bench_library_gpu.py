"""Forward (or, with --backward, forward + backward) of every library pattern on a CUDA device:
attncc ("triton" backend: generated forward, dQ and dK/dV kernels) against SDPA (dense, and
with a dense bool mask) and compiled FlexAttention (its own backward), bf16, B=1, H=8, per
head dim.

    python bench/bench_library_gpu.py --dims 64 128 --out out/library.md
    python bench/bench_library_gpu.py --backward --dims 128 --out out/library_train.md

1-D patterns run at --len tokens (default 8192), grid patterns at their layout's size. Each
row is appended to --out as soon as it is measured, so a run cut short by a timeout keeps
what it finished; a pattern that fails gets a row with the error. Needs CUDA (exits 0 with a
note otherwise).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import attncc  # noqa: E402
from attncc.runtime.bench import bench_forward  # noqa: E402

SPECS = os.path.join(ROOT, "specs")
HEADER = ("| pattern | D | shape (B, H, Lq, Lkv) | density | attncc ms | sdpa ms | sdpa+mask ms | "
          "flex ms | flex / attncc | note |\n|---|---|---|---|---|---|---|---|---|---|\n")


def _row(name, d, res) -> str:
    t = {x.name: x for x in res.timings}
    ms = lambda n: f"{t[n].ms:.3f}" if n in t and t[n].ms == t[n].ms else "–"  # noqa: E731
    ratio = ""
    if "flex" in t and t["flex"].ms == t["flex"].ms and t["attncc"].ms > 0:
        ratio = f"{t['flex'].ms / t['attncc'].ms:.2f}"
    notes = "; ".join(x.note for x in res.timings if x.name == "flex" and "not run" in x.note)
    return (f"| {name} | {d} | {res.shape[:4]} | {res.density:.3f} | {ms('attncc')} | "
            f"{ms('sdpa')} | {ms('sdpa+mask')} | {ms('flex')} | {ratio} | {notes} |\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", nargs="*", type=int, default=[64, 128])
    ap.add_argument("--len", type=int, default=8192, help="tokens of 1-D patterns")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--backward", action="store_true",
                    help="time training steps (forward + backward into q, k, v)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    out = open(args.out, "a", encoding="utf-8") if args.out else sys.stdout
    if not torch.cuda.is_available():
        out.write("skipped: no CUDA device\n")
        return 0
    mode = "forward + backward" if args.backward else "forward"
    out.write(f"{mode}: {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, B=1, "
              f"H={args.heads}, 1-D length {args.len}, reps {args.reps}\n\n" + HEADER)
    out.flush()
    specs = args.only or sorted(f[:-5] for f in os.listdir(SPECS) if f.endswith(".attn"))
    for d in args.dims:
        for name in specs:
            t0 = time.perf_counter()
            try:
                p = attncc.load(os.path.join(SPECS, name + ".attn"))
                q_len = None if p.layout is not None else args.len
                res = bench_forward(p, heads=args.heads, head_dim=d, q_len=q_len,
                                    dtype=torch.bfloat16, reps=args.reps, warmup=2,
                                    backward=args.backward)
                out.write(_row(name, d, res))
            except Exception as e:  # noqa: BLE001 - one failing pattern must not end the run
                msg = f"{type(e).__name__}: {e}".splitlines()[0][:160].replace("|", "/")
                out.write(f"| {name} | {d} | | | FAILED | | | | | {msg} |\n")
                traceback.print_exc(file=sys.stderr)
                torch.cuda.empty_cache()
            out.flush()
            print(f"[{name} d{d}: {time.perf_counter() - t0:.1f} s]", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
