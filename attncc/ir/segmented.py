"""Segmented layouts: each side (queries, keys) is a sequence of token segments and at most one
grid, concatenated in one flat token order.

    layout tokens(text = 77)                # both sides: tokens 0..76
    layout grid(t = 16, y = 32, x = 32)     # both sides: tokens 77.., row-major in the grid

    layout q_grid(y = 64, x = 64)           # queries: a 64×64 grid
    layout k_grid(y = 64, x = 64)           # keys: a 64×64 grid, then
    layout k_tokens(pooled = 1024)          #       1024 plain tokens

`Segmented` is the `Pattern.layout` of such a spec (a plain one-grid spec keeps its `Layout`).
`Coord(side, axis)` leaves refer to axis `axis` of that side's grid; over the flat token index
i a coordinate is `((i - start) // stride) % size`, `start` being the grid's first token. The
mask guards every comparison that reads a coordinate of a side with the side's grid
membership (`attncc.passes.segments`), so a coordinate is never *used* for a token outside
the grid; its value there is whatever the formula gives.

`coord_terms(layout, side, axis)` gives `(start, stride, size)` for a plain `Layout` and for
a `Segmented` layout alike: every evaluator (dense, intervals, torch lowering, codegen)
computes coordinates through it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from .nodes import Binary, Const, Coord, Expr, Var
from .pattern import Layout


@dataclass(frozen=True)
class Segment:
    """`size` tokens starting at flat index `start`; `grid` holds the axes of a grid segment
    (its membership name is 'grid'), None for plain tokens."""
    name: str
    start: int
    size: int
    grid: Optional[Layout] = None

    def __str__(self) -> str:
        return str(self.grid) if self.grid is not None else f"tokens({self.name} = {self.size})"


@dataclass(frozen=True)
class SideLayout:
    """The segments of one side, in token order."""
    segments: tuple[Segment, ...]

    @property
    def numel(self) -> int:
        return sum(s.size for s in self.segments)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.segments)

    @property
    def grid_segment(self) -> Optional[Segment]:
        return next((s for s in self.segments if s.grid is not None), None)

    @property
    def grid(self) -> Optional[Layout]:
        g = self.grid_segment
        return g.grid if g is not None else None

    @property
    def axes(self) -> tuple:
        g = self.grid
        return g.axes if g is not None else ()

    def segment(self, name: str) -> Segment:
        return next(s for s in self.segments if s.name == name)

    def member(self, side: str, name: str) -> Expr:
        """`start <= side < start + size` for segment `name` (a bool IR expression; bounds
        implied by the side's extent are left out)."""
        seg = self.segment(name)
        i = Var(side)
        lo = Binary("ge", i, Const(seg.start)) if seg.start > 0 else None
        end = seg.start + seg.size
        hi = Binary("lt", i, Const(end)) if end < self.numel else None
        if lo is None and hi is None:
            return Const(True)
        if lo is None or hi is None:
            return lo if hi is None else hi
        return Binary("and", lo, hi)

    def __str__(self) -> str:
        return " + ".join(map(str, self.segments))


@dataclass(frozen=True)
class Segmented:
    """Per-side segment lists. `shared`: one layout for both sides (`layout tokens(...)` /
    `layout grid(...)` lines); else separate query and key layouts (`q_*` / `k_*` lines)."""
    q: SideLayout
    k: SideLayout
    shared: bool

    def side(self, side: str) -> SideLayout:
        return self.q if side == "q" else self.k

    @property
    def axes(self) -> tuple:
        """The longer of the two sides' grid axes (for rank checks; coordinates use the
        axes of their own side: `side(s).axes`)."""
        return self.q.axes if len(self.q.axes) >= len(self.k.axes) else self.k.axes

    @property
    def has_tokens(self) -> bool:
        return any(s.grid is None for sd in (self.q, self.k) for s in sd.segments)

    def __str__(self) -> str:
        if self.shared:
            return str(self.q)
        return f"q: {self.q}; k: {self.k}"


def side_grid(layout, side: str) -> Optional[Layout]:
    """The grid of `side` under `layout` (a `Layout`, a `Segmented` or None)."""
    if layout is None:
        return None
    if isinstance(layout, Segmented):
        return layout.side(side).grid
    return layout


def side_axes(layout, side: str) -> tuple:
    g = side_grid(layout, side)
    return g.axes if g is not None else ()


def coord_terms(layout, side: str, axis: int) -> Optional[tuple[int, int, int]]:
    """(start, stride, size) of coordinate `axis` of `side`: the coordinate of flat token i is
    `((i - start) // stride) % size`. None when the side has no grid or no such axis."""
    if isinstance(layout, Segmented):
        seg = layout.side(side).grid_segment
        if seg is None or axis >= len(seg.grid.axes):
            return None
        return seg.start, seg.grid.strides[axis], seg.grid.shape[axis]
    if layout is None or axis >= len(layout.axes):
        return None
    return 0, layout.strides[axis], layout.shape[axis]


def lengths(layout) -> Optional[tuple[int, int]]:
    """(query tokens, key tokens) a layout fixes, or None without a layout."""
    if layout is None:
        return None
    if isinstance(layout, Segmented):
        return layout.q.numel, layout.k.numel
    return layout.numel, layout.numel


# ---- queries placed on the key grid (separate grids; `attncc.passes.grid_map`) -------------

def mapped_cell_expr(i: Expr, q_size: int, k_size: int) -> Expr:
    """Key cell c(i) = ⌊(2i + 1)·K / (2Q)⌋ of query coordinate `i` (an int IR expression) on an
    axis of Q query cells and K key cells, in its simplest exact form: i when Q = K, i // r
    when Q = r·K, i·r + r // 2 when K = r·Q."""
    g = math.gcd(q_size, k_size)
    p, q = k_size // g, q_size // g
    if p == q:
        return i
    if p == 1:
        return Binary("floordiv", i, Const(q))
    if q == 1:
        out = Binary("mul", i, Const(p))
        return Binary("add", out, Const(p // 2)) if p // 2 else out
    num = Binary("mul", Binary("add", Binary("mul", i, Const(2)), Const(1)), Const(p))
    return Binary("floordiv", num, Const(2 * q))


def mapped_cell(i: int, q_size: int, k_size: int) -> int:
    """`mapped_cell_expr` on a plain int."""
    return (2 * i + 1) * k_size // (2 * q_size)


def route_groups_expr(layout, side: str, region: tuple[int, ...]) -> tuple[Expr, int]:
    """(IR of the route region of token `side`, number of regions). Regions have `region`
    cells per axis of the (key) grid, numbered row-major over the region grid; with separate
    grids a query belongs to the region of its key cell (`mapped_cell_expr`); without a
    layout, regions are runs of region[0] tokens."""
    if layout is None:
        return Binary("floordiv", Var(side), Const(region[0])), None
    kgrid = layout.k.grid if isinstance(layout, Segmented) else layout
    qgrid = layout.q.grid if isinstance(layout, Segmented) else layout
    out: Expr = Const(0)
    n = 1
    for a, (ka, r) in enumerate(zip(kgrid.axes, region)):
        c: Expr = Coord(side, a, ka.name)
        if side == "q" and qgrid is not kgrid:
            c = mapped_cell_expr(Coord("q", a, qgrid.axes[a].name), qgrid.axes[a].size, ka.size)
        count = -(-ka.size // r)
        out = Binary("add", Binary("mul", out, Const(count)), Binary("floordiv", c, Const(r)))
        n *= count
    return out, n
