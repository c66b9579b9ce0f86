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

from dataclasses import dataclass
from typing import Optional

from .nodes import Binary, Const, Expr, Var
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
