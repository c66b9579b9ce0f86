"""Time `dense_mask` (the dense reference evaluator) on large masks.

    python bench/bench_dense.py            # natten2d 64x64 kernel 7, 8 heads (4096 x 4096 x 8)
    python bench/bench_dense.py --all      # also seer_gate (4096, block 64) and biformer (56x56)

The natten2d IR is built here by hand from the NATTEN formula of DESIGN §4 (non-causal,
per axis: group, leader, clamped window start), so the benchmark does not depend on the
spec frontend.
"""
from __future__ import annotations

import argparse
import time

import torch

from attncc.ir.dense import dense_mask
from attncc.ir.nodes import Binary, Blocks, Const, Coord, Expr, Route, Select, Var
from attncc.ir.pattern import Axis, InputDecl, Layout, Pattern


def _b(op: str, a: Expr, b) -> Expr:
    return Binary(op, a, b if isinstance(b, Expr) else Const(b))


def natten_axis(axis: int, name: str, length: int, kernel: int, dilation: int,
                stride: int) -> Expr:
    """Non-causal NATTEN neighborhood condition on one layout axis (DESIGN §4)."""
    i, j = Coord("q", axis, name), Coord("k", axis, name)
    g = _b("mod", i, dilation)
    ip = _b("floordiv", i, dilation)
    lg = _b("add", Const(length // dilation),
            Select(_b("lt", g, length % dilation), Const(1), Const(0)))
    leader = _b("min", _b("add", _b("mul", _b("floordiv", ip, stride), stride), stride // 2),
                _b("sub", lg, 1))
    start = _b("max", _b("min", _b("sub", leader, kernel // 2), _b("sub", lg, kernel)), 0)
    jp = _b("floordiv", j, dilation)
    return _b("and", _b("and", _b("eq", _b("mod", j, dilation), g), _b("le", start, jp)),
              _b("lt", jp, _b("add", start, kernel)))


def natten2d(height: int = 64, width: int = 64, kernel: int = 7, dilation: int = 1,
             stride: int = 1) -> Pattern:
    """natten2d as a Pattern over layout grid(y = height, x = width)."""
    mask = _b("and", natten_axis(0, "y", height, kernel, dilation, stride),
              natten_axis(1, "x", width, kernel, dilation, stride))
    layout = Layout((Axis("y", height), Axis("x", width)))
    params = (("height", height), ("width", width), ("kernel", kernel),
              ("dilation", dilation), ("stride", stride))
    return Pattern("natten2d", params, layout, (), mask)


def seer_gate(block: int = 64, keep: float = 0.1) -> Pattern:
    """causal & blocks(gate, block, top=keep) over a 1-D sequence."""
    mask = _b("and", _b("le", Var("k"), Var("q")), Blocks("gate", block, top=keep))
    decl = InputDecl("gate", "float", ("b", "h", "q_blocks", "k_blocks"))
    return Pattern("seer_gate", (("block", block), ("keep", keep)), None, (decl,), mask)


def biformer(size: int = 56, region: int = 8, topk: int = 4) -> Pattern:
    """route(region=(R, R), topk) on a size x size grid."""
    layout = Layout((Axis("y", size), Axis("x", size)))
    return Pattern("biformer", (("region", region), ("topk", topk)), layout, (),
                   Route((region, region), topk))


def timed(fn, repeat: int) -> tuple[float, float, object]:
    fn()  # warm-up
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), sorted(times)[len(times) // 2], out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--kernel", type=int, default=7)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--all", action="store_true", help="also time seer_gate and biformer")
    args = ap.parse_args()
    H = args.heads
    p = natten2d(args.size, args.size, args.kernel)
    n = args.size * args.size
    best, med, m = timed(lambda: dense_mask(p, heads=H), args.repeat)
    print(f"natten2d {args.size}x{args.size} kernel {args.kernel}, {H} heads: "
          f"mask {tuple(m.shape)} ({m.numel() / 1e6:.0f}M bools), kept/row "
          f"{int(m[0, 0].sum()) / n:.1f}, threads {torch.get_num_threads()}: "
          f"best {best * 1e3:.0f} ms, median {med * 1e3:.0f} ms")
    if not args.all:
        return
    gate = torch.randn(1, H, n // 64, n // 64, generator=torch.Generator().manual_seed(0))
    best, med, m = timed(lambda: dense_mask(seer_gate(), n, n, heads=H, inputs={"gate": gate}),
                         args.repeat)
    print(f"seer_gate L={n} block 64 top 0.1, {H} heads: best {best * 1e3:.0f} ms, "
          f"median {med * 1e3:.0f} ms")
    g = torch.Generator().manual_seed(1)
    q, k = (torch.randn(1, H, 56 * 56, 32, generator=g) for _ in range(2))
    best, med, m = timed(lambda: dense_mask(biformer(), heads=H, inputs={"query": q, "key": k}),
                         args.repeat)
    print(f"biformer 56x56 region 8 topk 4, {H} heads: mask {tuple(m.shape)}: "
          f"best {best * 1e3:.0f} ms, median {med * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
