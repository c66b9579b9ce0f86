"""Time `dense_mask` (the dense reference evaluator) on large masks.

    python bench/bench_dense.py            # natten2d 64x64 kernel 7, 8 heads (4096 x 4096 x 8)

The natten2d IR is built here by hand from the NATTEN formula of DESIGN §4 (non-causal,
per axis: group, leader, clamped window start), so the benchmark does not depend on the
spec frontend.
"""
from __future__ import annotations

import argparse
import time

import torch

from attncc.ir.dense import dense_mask
from attncc.ir.nodes import Binary, Const, Coord, Expr, Select
from attncc.ir.pattern import Axis, Layout, Pattern


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--kernel", type=int, default=7)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    p = natten2d(args.size, args.size, args.kernel)
    n = args.size * args.size
    dense_mask(p, heads=args.heads)  # warm-up
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        m = dense_mask(p, heads=args.heads)
        times.append(time.perf_counter() - t0)
    kept = int(m[0, 0].sum())
    print(f"natten2d {args.size}x{args.size} kernel {args.kernel}, {args.heads} heads: "
          f"mask {tuple(m.shape)} ({m.numel() / 1e6:.0f}M bools), kept/row {kept / n:.1f}, "
          f"threads {torch.get_num_threads()}; dense_mask best {min(times) * 1e3:.0f} ms, "
          f"median {sorted(times)[len(times) // 2] * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
