"""Segmented layouts: plain-token segments and one grid concatenated in one sequence.

    layout tokens(text = 77)                  # tokens 0..76
    layout grid(t = 16, y = 32, x = 32)       # tokens 77..77+16·32·32-1, row-major
    mask   q.text | k.text | neighborhood((3, 7, 7))

Several `layout` lines declare segments in sequence order: `tokens(name = size, ...)` adds one
segment per keyword, `grid(...)` adds the grid segment (at most one). In expressions,
`q.<segment>` / `k.<segment>` is true when the token is in that segment (`q.grid` for the grid
segment); `q.<axis>` is the token's coordinate *within the grid segment*; `neighborhood` and
`blocked` work on the grid segment's axes.

Reading a coordinate of a token outside the grid is impossible by construction: every
comparison that involves a coordinate of side q (k) is false unless q (k) is in the grid
segment. So `q.text | k.text | neighborhood(...)` lets text tokens see and be seen by every
token while grid tokens use the neighborhood, and `neighborhood(...)` alone keeps no pair that
involves a text token. Coordinates may only be compared (not used in score or output
expressions, nor as input indices): those are rejected at elaboration.

The elaborator builds the IR with the grid as its layout (so primitives work unchanged); then
`Segments.lower` rewrites it over the flat token index (`Coord` leaves become
`((i - start) // stride) % size`, comparisons get membership guards), and the pattern has no
layout: its tiles are 1-D and every backend runs the plain integer arithmetic.
`SegmentLengthCheck` makes calls check that both sequence lengths equal the layout's total.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..ir.nodes import (COMPARE_OPS, INT, Binary, Const, Coord, Expr, Load, Route, Var,
                        transform, walk)
from ..ir.pattern import Layout


@dataclass(frozen=True)
class Segment:
    name: str
    start: int
    size: int


@dataclass(frozen=True)
class SegmentLengthCheck:
    """Call-time check: q_len and kv_len must both equal the segmented layout's total."""
    loc: object
    total: int
    description: str

    def message(self, q_len: int, kv_len: int) -> Optional[str]:
        for name, n in (("q", q_len), ("k", kv_len)):
            if n != self.total:
                return (f"the layout {self.description} has {self.total} tokens, but {name} has "
                        f"sequence length {n}")
        return None


@dataclass(frozen=True)
class Segments:
    """Segments in sequence order; `grid` (with its start) when one is a grid."""
    parts: tuple[Segment, ...]
    grid: Optional[Layout]
    grid_start: int

    @property
    def total(self) -> int:
        return sum(p.size for p in self.parts)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.parts)

    def describe(self) -> str:
        return " + ".join(f"{p.name}[{p.start}:{p.start + p.size}]" for p in self.parts)

    def resolve(self, side: str, name: str):
        """`q.<name>` / `k.<name>`: segment membership, or None (a grid coordinate)."""
        return self.member(side, name) if name in self.names else None

    def member(self, side: str, name: str) -> Expr:
        """`start <= side < start + size` for segment `name` (an IR bool)."""
        seg = next(p for p in self.parts if p.name == name)
        i = Var(side)
        lo = Binary("ge", i, Const(seg.start)) if seg.start > 0 else None
        hi = Binary("lt", i, Const(seg.start + seg.size)) if seg.start + seg.size < self.total \
            else None
        if lo is None and hi is None:
            return Const(True)
        if lo is None or hi is None:
            return lo if hi is None else hi
        return Binary("and", lo, hi)

    def coordinate(self, c: Coord) -> Expr:
        """A grid coordinate over the flat token index: ((i - start) // stride) % size."""
        axis = c.axis
        i: Expr = Var(c.side)
        if self.grid_start:
            i = Binary("sub", i, Const(self.grid_start))
        stride = self.grid.strides[axis]
        if stride > 1:
            i = Binary("floordiv", i, Const(stride))
        if axis > 0:
            i = Binary("mod", i, Const(self.grid.shape[axis]))
        return i

    def misuse(self, expr: Optional[Expr], clause: str) -> Optional[str]:
        """Why `expr` reads coordinates where that is not allowed, or None."""
        if expr is None:
            return None
        if any(isinstance(n, Route) for n in walk(expr)):
            return "route(...) is not supported on a layout with token segments"
        coords = [n for n in walk(expr) if isinstance(n, Coord)]
        if not coords:
            return None
        if clause != "mask":
            return (f"grid coordinates cannot be used in the {clause} clause of a layout with "
                    "token segments (only compared in the mask)")
        for n in walk(expr):
            if isinstance(n, Load) and any(isinstance(m, Coord) for ix in n.indices
                                           for m in walk(ix)):
                return ("grid coordinates cannot index an input in a layout with token "
                        "segments (only compared)")
        return None

    def lower(self, expr: Optional[Expr]) -> Optional[Expr]:
        """`expr` over the flat token index (see the module docstring)."""
        if expr is None:
            return None

        def guard(n: Expr):
            if isinstance(n, Binary) and n.op in COMPARE_OPS and n.a.dtype == INT:
                sides = sorted({m.side for m in walk(n) if isinstance(m, Coord)})
                if sides:
                    out = n
                    for side in reversed(sides):
                        out = Binary("and", self.member(side, "grid"), out)
                    return out
            return None

        def flatten(n: Expr):
            return self.coordinate(n) if isinstance(n, Coord) else None

        return transform(transform(expr, guard), flatten)


@dataclass(frozen=True)
class GridLengthCheck:
    """Call-time check for separate query and key grids: q_len and kv_len must match them."""
    loc: object
    total: int       # query tokens
    kv_total: int    # key tokens

    def message(self, q_len: int, kv_len: int) -> Optional[str]:
        for name, n, want in (("q", q_len, self.total), ("k", kv_len, self.kv_total)):
            if n != want:
                side = "query" if name == "q" else "key"
                return f"the {side} grid has {want} tokens, but {name} has sequence length {n}"
        return None


@dataclass(frozen=True)
class TwoGrids:
    """Separate layouts for queries (`layout q_grid(...)`) and keys (`layout k_grid(...)`):
    `q.<axis>` is a coordinate in the query grid, `k.<axis>` in the key grid (e.g. a 64×64
    query map over 32×32 pooled keys: `q.y // 2 == k.y`)."""
    q: Layout
    k: Layout
    names: tuple = ()

    def resolve(self, side: str, name: str):
        grid = self.q if side == "q" else self.k
        names = [a.name for a in grid.axes]
        if name not in names:
            which = "query" if side == "q" else "key"
            return f"unknown axis '{name}' of the {which} grid (it has axes {', '.join(names)})"
        return Coord(side, names.index(name), name)

    def misuse(self, expr: Optional[Expr], clause: str) -> Optional[str]:
        if expr is not None and any(isinstance(n, Route) for n in walk(expr)):
            return "route(...) is not supported with separate query and key layouts"
        return None

    def lower(self, expr: Optional[Expr]) -> Optional[Expr]:
        if expr is None:
            return None

        def flatten(n: Expr):
            if not isinstance(n, Coord):
                return None
            grid = self.q if n.side == "q" else self.k
            i: Expr = Var(n.side)
            if grid.strides[n.axis] > 1:
                i = Binary("floordiv", i, Const(grid.strides[n.axis]))
            if n.axis > 0:
                i = Binary("mod", i, Const(grid.shape[n.axis]))
            return i
        return transform(expr, flatten)
