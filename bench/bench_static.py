"""Static performance report: every library kernel compiled ahead of time for GPU targets (no
GPU needed), side by side with a plain causal flash-attention forward compiled the same way.

    python bench/bench_static.py                         # all specs, sm_80 + sm_90, d64 + d128
    python bench/bench_static.py --only causal gna --arch 90 --dims 128
    python bench/bench_static.py --out table.md --json raw.json
    python bench/bench_static.py --compare before.json after.json   # before → after table

Per kernel: registers, spill bytes (ptxas -v), shared memory (KB; limit sm_90 227, sm_80
163), whether the products lowered to wgmma (sm_90), SASS instructions in total and per
FULL-tile and PARTIAL-tile iteration (`attncc.runtime.sass.sass_loops`: back-edges of the
SASS control flow mapped to the source loops by line info; "u" marks a loop that ptxas
unrolled or that has one iteration, counted as all of its instructions), the number of
source loops, and the cold compile time (fresh Triton cache), wall and CPU seconds (the
CPU figure, ptxas included, is the stable one on a shared machine).
The launch is the runtime's own (bf16, batch 2, `Kernel.default_shape()`: 1024 tokens on
1-D patterns, the layout's size on grids), captured on CPU tensors.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

SPECS = os.path.join(ROOT, "specs")


@triton.jit
def plain_causal_fwd(
    Q, K, V, O, LSE,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh, stride_lm,
    SEQ_LEN, HEADS, sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    # Plain causal flash-attention forward (square, BLOCK_M == BLOCK_N): the baseline.
    m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HEADS
    h = bh % HEADS
    offs_m = m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=offs_m[:, None] < SEQ_LEN, other=0.0)
    qk_scale = sm_scale * 1.4426950408889634
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    # FULL key tiles: below the diagonal, no masking.
    for start in range(0, m * BLOCK_M, BLOCK_N):
        kn = start + offs_n
        k = tl.load(k_base + kn[None, :] * stride_kn + offs_d[:, None] * stride_kd)
        s = tl.dot(q, k)
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + kn[:, None] * stride_vn + offs_d[None, :] * stride_vd)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    # PARTIAL key tiles: the diagonal tile, causal mask and sequence tail.
    for start in range(m * BLOCK_M, tl.minimum((m + 1) * BLOCK_M, SEQ_LEN), BLOCK_N):
        kn = start + offs_n
        k = tl.load(k_base + kn[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                    mask=kn[None, :] < SEQ_LEN, other=0.0)
        s = tl.dot(q, k)
        keep = (offs_m[:, None] >= kn[None, :]) & (kn[None, :] < SEQ_LEN)
        s = tl.where(keep, s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + kn[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=kn[:, None] < SEQ_LEN, other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    out = acc / l_i[:, None]
    o_base = O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    tl.store(o_base + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
             out.to(O.dtype.element_ty), mask=offs_m[:, None] < SEQ_LEN)
    l_base = LSE + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh
    tl.store(l_base + offs_m * stride_lm, m_i * 0.6931471805599453 + tl.log(l_i),
             mask=offs_m < SEQ_LEN)


def plain_case(head_dim: int = 64, dtype: str = "bfloat16", batch: int = 2, heads: int = 1,
               seq_len: int = 1024, block: int = 64, num_warps: int = 4,
               num_stages: int = 2) -> None:
    """Launch `plain_causal_fwd` on CPU tensors q/k/v [batch, heads, seq_len, head_dim] (for
    `attncc.runtime.aot.capture_launches`; the launch is recorded, not run)."""
    import torch
    dt = getattr(torch, dtype)
    q = torch.empty(batch, heads, seq_len, head_dim, dtype=dt)
    k, v, o = torch.empty_like(q), torch.empty_like(q), torch.empty_like(q)
    lse = torch.empty(batch, heads, seq_len, dtype=torch.float32)
    grid = (triton.cdiv(seq_len, block), batch * heads)
    plain_causal_fwd[grid](q, k, v, o, lse, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
                           *lse.stride(), seq_len, heads, head_dim ** -0.5, BLOCK_M=block,
                           BLOCK_N=block, HEAD_DIM=head_dim, num_warps=num_warps,
                           num_stages=num_stages)


def library_specs() -> list:
    return sorted(f[:-5] for f in os.listdir(SPECS) if f.endswith(".attn"))


def jobs_for(specs, archs, dims) -> list:
    """(label, job) pairs: the plain kernel and each spec, per arch and head dim."""
    out = []
    for arch in archs:
        for d in dims:
            out.append(((f"plain causal FA", arch, d),
                        {"arch": arch, "entry": "bench_static:plain_case", "sys_path": [HERE],
                         "kwargs": {"head_dim": d}}))
            for spec in specs:
                out.append(((spec, arch, d),
                            {"arch": arch, "kwargs": {"spec": os.path.join(SPECS, spec + ".attn"),
                                                      "head_dim": d}}))
    return out


def _fmt_iter(rep: dict, kind: str) -> str:
    loops = [lp for lp in rep["loops"] if lp["kind"] == kind]
    if not loops:
        return "–"
    kept = [lp["instructions"] for lp in loops if lp["sass_loop"]]
    if kept:
        return str(max(kept))
    return f"{max(lp['instructions'] for lp in loops)}u"


def table(labels, results) -> str:
    plain = {}
    for (name, arch, d), reps in zip(labels, results):
        if name.startswith("plain") and reps and reps[0]["ok"]:
            plain[(arch, d)] = reps[0]
    rows = ["| kernel | arch | d | regs | spill B | smem KB | wgmma | SASS | FULL/iter | "
            "FULL ÷ plain | PARTIAL/iter | loops | compile s (CPU s) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (name, arch, d), reps in zip(labels, results):
        for i, r in enumerate(reps):
            label = name if len(reps) == 1 else f"{name} [{i}]"
            if not r["ok"]:
                rows.append(f"| {label} | sm_{arch} | {d} | FAILED: "
                            f"{r['error'].splitlines()[0][:120] if r['error'] else '?'} "
                            "| | | | | | | | | |")
                continue
            full = r["full_iter"]
            base = plain.get((arch, d), {}).get("full_iter")
            ratio = f"{full / base:.2f}" if full and base and not name.startswith("plain") else ""
            wg = "yes" if r["wgmma"] else ("no" if arch >= 90 else "mma")
            rows.append(
                f"| {label} | sm_{arch} | {d} | {r['registers']} | {r['spill_bytes']} | "
                f"{r['shared'] / 1024:.0f} | {wg} | {r['sass_instructions']} | "
                f"{_fmt_iter(r, 'full')} | {ratio} | {_fmt_iter(r, 'partial')} | "
                f"{len(r['loops'])} | {r['compile_s']:.1f} ({r.get('cpu_s', 0):.1f}) |")
    return "\n".join(rows)


def _load(path) -> dict:
    """(kernel, arch, d) -> reports of a --json file or its JSON-lines `.partial` file."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    entries = json.loads(text) if text.lstrip().startswith("[") else \
        [json.loads(line) for line in text.splitlines() if line.strip()]
    return {(e["kernel"], e["arch"], e["d"]): e["reports"] for e in entries}


def compare_table(before_path, after_path) -> str:
    """Markdown table `before → after` per (kernel, arch, d) of two --json files (or their
    `.partial` JSON-lines files)."""
    before, after = _load(before_path), _load(after_path)

    def plain_full(table, arch, d):
        reps = table.get(("plain causal FA", arch, d))
        return reps[0]["full_iter"] if reps and reps[0]["ok"] else None

    def cell(table, key, k):
        reps = table.get(key)
        if reps is None:
            return "–"
        if not reps or not reps[0]["ok"]:
            return "fail"
        r = reps[0]
        if k in ("full", "partial"):
            return _fmt_iter(r, k)
        if k == "ratio":
            base = plain_full(table, key[1], key[2])
            return f"{r['full_iter'] / base:.2f}" if r["full_iter"] and base else ""
        if k == "shared":
            return f"{r['shared'] / 1024:.0f}"
        if k == "cpu_s":
            return f"{r.get('cpu_s', 0):.1f}"
        return str(r[k])

    keys = [("registers", "regs"), ("spill_bytes", "spill B"), ("shared", "smem KB"),
            ("sass_instructions", "SASS"), ("full", "FULL/iter"), ("ratio", "FULL ÷ plain"),
            ("partial", "PARTIAL/iter"), ("cpu_s", "compile CPU s")]
    rows = ["| kernel | arch | d | " + " | ".join(h for _, h in keys) + " |",
            "|---|---|---|" + "---|" * len(keys)]
    for key in sorted(set(before) | set(after), key=lambda t: (t[1], t[2], t[0])):
        cells = []
        for k, _ in keys:
            x, y = cell(before, key, k), cell(after, key, k)
            cells.append(y if x == y else f"{x} → {y}")
        rows.append(f"| {key[0]} | sm_{key[1]} | {key[2]} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="spec names (default: every spec in specs/)")
    ap.add_argument("--arch", nargs="*", type=int, default=[80, 90])
    ap.add_argument("--dims", nargs="*", type=int, default=[64, 128])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default=None, help="also write the Markdown table here")
    ap.add_argument("--json", default=None, help="write the raw reports here")
    ap.add_argument("--compare", nargs=2, metavar=("BEFORE_JSON", "AFTER_JSON"),
                    help="print a before → after table of two --json files and exit")
    args = ap.parse_args(argv)
    if args.compare:
        print(compare_table(*args.compare))
        return 0
    from attncc.runtime import aot
    reason = aot.ptxas_missing()
    if reason:
        print(f"skipped: {reason}")
        return 0
    specs = args.only or library_specs()
    pairs = jobs_for(specs, args.arch, args.dims)
    t0 = time.perf_counter()
    partial = open(args.json + ".partial", "w", encoding="utf-8") if args.json else None

    def save(i, reps):  # JSON lines as jobs finish: a run cut short keeps its results
        if partial is not None:
            n, a, d = pairs[i][0]
            partial.write(json.dumps({"kernel": n, "arch": a, "d": d, "reports": reps}) + "\n")
            partial.flush()

    results = aot.run_jobs([j for _, j in pairs], workers=args.workers, timeout=3600,
                           on_result=save)
    wall = time.perf_counter() - t0
    labels = [lab for lab, _ in pairs]
    header = (f"static compile, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} "
              f"UTC, Triton {triton.__version__}, {platform.machine()} CPU-only "
              f"({os.cpu_count()} cores, shared), bf16, batch 2, {args.workers} workers, "
              f"wall {wall:.0f} s")
    text = header + "\n\n" + table(labels, results) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump([{"kernel": n, "arch": a, "d": d, "reports": r}
                       for (n, a, d), r in zip(labels, results)], f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
