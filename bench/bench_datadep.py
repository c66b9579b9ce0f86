"""Data-dependent patterns (route / blocks) versus how they are run in plain PyTorch today.

    python bench/bench_datadep.py                       # CPU, default sizes
    python bench/bench_datadep.py --threads 2 --reps 5 --out results.md

Two workloads, each at about 10% / 25% / 50% block density (q, k, v random, float32):

  blocks  SeerAttention-style block gate: `blocks(gate, block = 64, top = f)` on 1-D
          sequences (B=1, H=4, L=2048, D=64; 32 key blocks, top-f keeps 4 / 8 / 16)
  route   BiFormer routing: `route(region = (8, 8), topk = t)` on a 32×64 map (L=2048,
          32 regions of 64 tokens, t = 3 / 8 / 16)

Implementations (all produce the same attention; each is checked against the first):
  sdpa_mask   the selection expanded to a dense bool mask [B, H, L, L] + SDPA (mask build
              included)
  flex        FlexAttention (torch.compile) with `BlockMask.from_kv_blocks` built from the
              same selection (block = region / gate block, so every kept block is full)
  gather      BiFormer-style: permute tokens region-major, gather the top-k key regions per
              query region (k-fold K/V duplication), one SDPA per region (route only; for
              blocks, the same gather over key blocks)
  attncc      `attncc.runtime.blocksparse.blocksparse_attention` (the CPU path: device
              pre-pass + block-sparse torch forward), pre-pass included
  prepass     the attncc pre-pass alone (selection + tile classes + lists)

Times are medians over --reps runs after one warm-up run (torch.compile time excluded).
Prints one Markdown table; `--out FILE` also writes it.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import attncc  # noqa: E402
from attncc.runtime.blocksparse import blocksparse_attention  # noqa: E402
from attncc.runtime.prepass import (block_select, group_classes, lists_from_classes,  # noqa: E402
                                    route_select)
from attncc.schedule.schedule import TileGrid  # noqa: E402


def median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


# ---- plain-PyTorch baselines -----------------------------------------------------------------

def sdpa_mask(q, k, v, sel, q_gid, k_gid):
    """Dense bool mask from a group selection, then SDPA."""
    mask = sel[:, :, q_gid][:, :, :, k_gid]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def gather_attention(q, k, v, idx, perm, group: int):
    """BiFormer-style gather: tokens permuted so each group (region / block) is contiguous,
    top-k key groups gathered per query group (idx int64 [B, H, nG, topk]), one dense
    attention per query group, result un-permuted."""
    B, H, L, D = q.shape
    n = L // group
    qr = q[:, :, perm].view(B, H, n, group, D)
    kr = k[:, :, perm].view(B, H, n, group, D)
    vr = v[:, :, perm].view(B, H, n, group, D)
    t = idx.shape[-1]
    gi = idx[..., None, None].expand(B, H, n, t, group, D)
    kg = torch.gather(kr[:, :, None].expand(B, H, n, n, group, D), 3, gi).reshape(B, H, n, t * group, D)
    vg = torch.gather(vr[:, :, None].expand(B, H, n, n, group, D), 3, gi).reshape(B, H, n, t * group, D)
    out = F.scaled_dot_product_attention(qr, kg, vg).reshape(B, H, L, D)
    res = torch.empty_like(out)
    res[:, :, perm] = out
    return res


def flex_runner(L: int, block: int):
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
    compiled = torch.compile(flex_attention, dynamic=False)

    def run(q, k, v, sel_tokens_blocks):
        # sel_tokens_blocks: bool [B, H, L/block, L/block] over contiguous token blocks.
        counts = sel_tokens_blocks.sum(-1, dtype=torch.int32)
        order = torch.sort((~sel_tokens_blocks).to(torch.int8), dim=-1, stable=True).indices
        bm = BlockMask.from_kv_blocks(counts, order.to(torch.int32), BLOCK_SIZE=block)
        return compiled(q, k, v, block_mask=bm)
    return run


# ---- workloads -------------------------------------------------------------------------------

def workload_blocks(top: float, B=1, H=4, L=2048, D=64, block=64):
    spec = (f"pattern seer(block = {block}, keep = {top})\n"
            "input gate: float[b, h, q_blocks, k_blocks]\n"
            "mask blocks(gate, block = block, top = keep)")
    p = attncc.parse(spec)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, generator=g) for _ in range(3))
    gate = torch.randn(B, H, L // block, L // block, generator=g)
    inputs = {"gate": gate}

    def select():
        sel = block_select(gate, top=top)
        gid = torch.arange(L) // block
        return sel, gid, gid

    perm = torch.arange(L)
    return p, q, k, v, inputs, select, perm, block, (block,), (block,)


def workload_route(topk: int, B=1, H=4, Hh=32, W=64, D=64, region=8):
    p = attncc.parse(f"pattern bif(height = {Hh}, width = {W}, region = {region}, topk = {topk})\n"
                     "layout grid(y = height, x = width)\n"
                     "mask route(region = (region, region), topk = topk)")
    L = Hh * W
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, generator=g) for _ in range(3))

    def select():
        return route_select(q, k, region, topk, (Hh, W))

    # Region-major permutation: tokens of region r occupy [r·64, (r+1)·64).
    _, gid, _ = route_select(q[:, :1, :, :1], k[:, :1, :, :1], region, 1, (Hh, W))
    perm = torch.sort(gid * L + torch.arange(L)).indices
    return p, q, k, v, {}, select, perm, region * region, (region, region), (region, region)


def run(threads: int, reps: int) -> str:
    torch.set_num_threads(threads)
    rows = ["| workload | density | sdpa_mask ms | flex ms | gather ms | attncc ms | prepass ms "
            "| attncc vs sdpa_mask | max abs err vs sdpa_mask |",
            "|---|---|---|---|---|---|---|---|---|"]
    cases = [("blocks L=2048 β=64", workload_blocks, f) for f in (0.1, 0.25, 0.5)] + \
            [("route 32×64 R=8×8", workload_route, t) for t in (3, 8, 16)]
    for label, make, arg in cases:
        p, q, k, v, inputs, select, perm, group, qt, kt = make(arg)
        sel, q_gid, k_gid = select()
        density = float(sel.float().mean())
        L = q.shape[2]
        ref = sdpa_mask(q, k, v, sel, q_gid, k_gid)
        t_sdpa = median_ms(lambda: sdpa_mask(q, k, v, *select()), reps)

        # Selection over contiguous token blocks (region-major order for route).
        n = L // group
        sel_c = sel
        flex = flex_runner(L, group)
        qp, kp, vp = q[:, :, perm], k[:, :, perm], v[:, :, perm]

        def run_flex():
            s, _, _ = select()
            o = flex(qp, kp, vp, s)
            res = torch.empty_like(o)
            res[:, :, perm] = o
            return res
        out_flex = run_flex()
        t_flex = median_ms(run_flex, reps)

        topk = int(sel_c[0, 0, 0].sum())

        def run_gather():
            s, _, _ = select()
            idx = torch.sort((~s).to(torch.int8), dim=-1, stable=True).indices[..., :topk]
            return gather_attention(q, k, v, idx, perm, group)
        out_gather = run_gather()
        t_gather = median_ms(run_gather, reps)

        def run_attncc():
            return blocksparse_attention(p, q, k, v, inputs, q_tile=qt, kv_tile=kt)[0]
        out_a = run_attncc()
        t_a = median_ms(run_attncc, reps)

        qg = TileGrid(p.layout.shape, qt) if p.layout is not None else TileGrid((L,), qt)
        kg = TileGrid(p.layout.shape, kt) if p.layout is not None else TileGrid((L,), kt)

        def run_prepass():
            s, a, b = select()
            return lists_from_classes(group_classes(s, a, b, qg, kg))
        t_pre = median_ms(run_prepass, reps)
        err = max(float((o - ref).abs().max()) for o in (out_flex, out_gather, out_a))
        assert err < 1e-3, f"{label}: implementations disagree ({err})"
        assert n == sel.shape[-1]
        rows.append(f"| {label} | {density:.1%} | {t_sdpa:.1f} | {t_flex:.1f} | {t_gather:.1f} | "
                    f"{t_a:.1f} | {t_pre:.2f} | {t_sdpa / t_a:.2f}× | {err:.1e} |")
        print(rows[-1], flush=True)
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", help="also write the table to this file")
    args = ap.parse_args(argv)
    head = (f"machine: {platform.machine()} {platform.processor() or ''} "
            f"{os.cpu_count()} CPUs, torch {torch.__version__}, threads={args.threads}; "
            f"date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(head, flush=True)
    table = run(args.threads, args.reps)
    if args.out:
        with open(args.out, "w") as f:
            f.write(head + "\n\n" + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
