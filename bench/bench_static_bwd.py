"""Static report of the generated backward kernels (dQ and dK/dV) of every library spec,
compiled ahead of time for GPU targets without a GPU (`attncc.runtime.aot`).

    python bench/bench_static_bwd.py                       # all specs, sm_80 + sm_90, d64 + d128
    python bench/bench_static_bwd.py --only causal natten2d --arch 90 --dims 128
    python bench/bench_static_bwd.py --out table.md --json raw.json
    python bench/bench_static_bwd.py --from-json raw.json            # the table of a saved run

The launch is the runtime's own backward (`attncc.runtime.autograd.backward_case`: bf16,
batch 2, `Kernel.default_shape()`, default CompileOptions), captured on CPU tensors and
compiled in worker processes with a fresh Triton cache. Per kernel: registers, spill bytes,
shared memory (KB), how products lowered (wgmma and/or mma.sync), SASS instructions in total and per FULL / PARTIAL tile
iteration ("u": unrolled or single-iteration loop, counted whole; for dK/dV one iteration is
one SUB_M-row slice of a query tile, for dQ of scores that read float tables one SUB_N-slot
slice of a key tile), CPU seconds of the cold compile.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SPECS = os.path.join(ROOT, "specs")


def _iter(rep: dict, kind: str) -> str:
    from attncc.runtime.aot import AOTReport
    r = AOTReport.from_dict(rep)
    loops = [lp for lp in r.loops if lp.kind == kind]
    if not loops:
        return "-"
    n = r.iteration(kind)
    kept = any(lp.sass_loop and lp.instructions == n for lp in loops)
    return f"{n}" + ("" if kept else "u")


def _kernel_label(name: str) -> str:
    """dQ / dK/dV of the generated softmax backward; linear dQ / dK / dV of `normalize none`."""
    if name.startswith("attncc_linear_bwd_"):
        return "linear " + {"dq": "dQ", "dk": "dK", "dv": "dV"}[name.split("_")[3]]
    return "dK/dV" if name.endswith("_dkv") else "dQ"


def _products(rep: dict) -> str:
    """How the matrix products were lowered: wgmma, mma.sync, or both."""
    kinds = [k for k, on in (("wgmma", rep["wgmma"]), ("mma.sync", rep["mma_sync"])) if on]
    return " + ".join(kinds) or "-"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", default=None, help="spec names (default: all)")
    ap.add_argument("--arch", nargs="*", type=int, default=[80, 90])
    ap.add_argument("--dims", nargs="*", type=int, default=[64, 128])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default=None, help="also write the markdown table here")
    ap.add_argument("--json", default=None, help="write the raw reports here")
    ap.add_argument("--from-json", default=None,
                    help="render the table of a run saved with --json (compiles nothing)")
    args = ap.parse_args(argv)
    if args.from_json:
        with open(args.from_json, encoding="utf-8") as f:
            raw = json.load(f)
    else:
        from attncc.runtime import aot
        missing = aot.ptxas_missing()
        if missing:
            print(f"cannot compile ahead of time: {missing}", file=sys.stderr)
            return 1
        specs = args.only or sorted(f[:-5] for f in os.listdir(SPECS) if f.endswith(".attn"))
        jobs = [{"arch": a, "entry": "attncc.runtime.autograd:backward_case", "sass": True,
                 "sys_path": [ROOT],
                 "kwargs": {"spec": os.path.join(SPECS, s + ".attn"), "head_dim": d}}
                for s in specs for a in args.arch for d in args.dims]
        results = aot.run_jobs(jobs, workers=args.workers)
        raw = [{"spec": os.path.basename(job["kwargs"]["spec"])[:-5], "arch": job["arch"],
                "head_dim": job["kwargs"]["head_dim"], **rep}
               for job, reps in zip(jobs, results) for rep in reps]
    rows = ["| spec | arch | d | kernel | regs | spill B | smem KB | products | SASS | FULL iter "
            "| PARTIAL iter | compile CPU s |", "|" + "---|" * 12]
    bad = 0
    for rep in raw:
        spec, d = rep["spec"], rep["head_dim"]
        if not rep["ok"]:
            bad += 1
            rows.append(f"| {spec} | sm_{rep['arch']} | {d} | "
                        f"FAILED: {rep['error'][:80]} |" + " |" * 8)
            continue
        bad += rep["spill_bytes"] > 0
        rows.append(
            f"| {spec} | sm_{rep['arch']} | {d} | {_kernel_label(rep['name'])} | "
            f"{rep['registers']} | {rep['spill_bytes']} | {rep['shared'] / 1024:.0f} | "
            f"{_products(rep)} | {rep['sass_instructions']} | "
            f"{_iter(rep, 'full')} | {_iter(rep, 'partial')} | {rep['cpu_s']:.1f} |")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = "\n".join(rows) + f"\n\n{len(raw)} kernels, {bad} failed or spilling ({stamp})\n"
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
    if args.json and not args.from_json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(raw, f, indent=1)
    return 0 if bad == 0 else 2


if __name__ == "__main__":
    sys.exit(main())
