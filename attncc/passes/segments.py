"""Segmented layouts in the mask IR: segment membership, coordinate guards, misuse checks.

    layout tokens(text = 77)                  # tokens 0..76
    layout grid(t = 16, y = 32, x = 32)       # tokens 77..77+16·32·32-1, row-major
    mask   q.text | k.text | neighborhood((3, 7, 7))

Several `layout` lines declare segments in sequence order (`attncc.ir.segmented`):
`tokens(name = size, ...)` adds one segment per keyword, `grid(...)` the grid segment (at most
one per side). `q_tokens` / `q_grid` / `k_tokens` / `k_grid` lines give the query and key
sides separate layouts. In expressions `q.<segment>` / `k.<segment>` is true when the token
is in that segment (`q.grid` for the grid segment); `q.<axis>` is the token's coordinate
*within its side's grid*; `neighborhood`, `blocked` and `route` work on the grid.

Reading a coordinate of a token outside the grid is impossible by construction: `guard`
makes every comparison that involves a coordinate of side q (k) false unless q (k) is in
that side's grid segment. So `q.text | k.text | neighborhood(...)` lets text tokens see and
be seen by every token while grid tokens use the neighborhood, and `neighborhood(...)` alone
keeps no pair that involves a text token. On a side with token segments, coordinates may
only be compared in the mask (not used in score or output expressions, nor as input
indices): `misuse` rejects those at elaboration.

The IR keeps `Coord` leaves (the pattern's layout is the `Segmented` object), so tile
analysis works on the grid's boxes (`attncc.schedule.segment_tiles`) and every evaluator
computes coordinates from flat indices by `attncc.ir.segmented.coord_terms`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..ir.nodes import COMPARE_OPS, INT, Binary, Coord, Expr, Load, Route, transform, walk
from ..ir.segmented import Segmented


@dataclass(frozen=True)
class SegmentLengthCheck:
    """Call-time check: q_len and kv_len must equal the segmented layout's side totals."""
    loc: object
    total: int       # query tokens
    kv_total: int    # key tokens
    description: str
    shared: bool = True

    def message(self, q_len: int, kv_len: int) -> Optional[str]:
        for name, n, want in (("q", q_len, self.total), ("k", kv_len, self.kv_total)):
            if n != want:
                if self.shared:
                    return (f"the layout {self.description} has {want} tokens, but {name} has "
                            f"sequence length {n}")
                side = "query" if name == "q" else "key"
                return f"the {side} layout has {want} tokens, but {name} has sequence length {n}"
        return None


def resolve(layout: Segmented, side: str, name: str):
    """`q.<name>` / `k.<name>`: segment membership (bool IR), a coordinate of the side's grid
    (`Coord`), or an error message (str)."""
    sd = layout.side(side)
    if name in sd.names:
        return sd.member(side, name)
    axes = [a.name for a in sd.axes]
    if name in axes:
        return Coord(side, axes.index(name), name)
    which = "query" if side == "q" else "key"
    known = list(sd.names) + axes
    where = "the layout" if layout.shared else f"the {which} layout"
    return (f"unknown segment or axis '{name}' of {where} (it has "
            + ", ".join(known) + ")")


def guarded_sides(layout: Segmented) -> tuple[str, ...]:
    """Sides whose grid does not cover all their tokens (coordinates there need a guard)."""
    return tuple(s for s in ("q", "k") if len(layout.side(s).segments) > 1)


def guard(expr: Optional[Expr], layout: Segmented) -> Optional[Expr]:
    """`expr` with every int comparison that reads a coordinate of a guarded side ANDed with
    that side's grid membership (see the module docstring); guards shared by both operands
    of `&` / `|` are factored out."""
    if expr is None:
        return None
    sides = guarded_sides(layout)
    if not sides:
        return expr

    guards = {layout.side(side).member(side, "grid") for side in sides}

    def fn(n: Expr):
        if isinstance(n, Binary) and n.op in COMPARE_OPS and n.a.dtype == INT:
            used = sorted({m.side for m in walk(n) if isinstance(m, Coord)} & set(sides))
            if used:
                out = n
                for side in reversed(used):
                    out = Binary("and", layout.side(side).member(side, "grid"), out)
                return out
        return None

    def factor(n: Expr):
        # (g & a) op (g & b) == g & (a op b) for op in {&, |}: one guard per subexpression
        # instead of one per comparison (the kernels evaluate it once).
        if isinstance(n, Binary) and n.op in ("and", "or"):
            a, b = n.a, n.b
            if isinstance(a, Binary) and isinstance(b, Binary) and a.op == b.op == "and" \
                    and a.a is b.a and a.a in guards:
                return Binary("and", a.a, factor(Binary(n.op, a.b, b.b)))
        return n
    return transform(transform(expr, fn), lambda n: None if factor(n) is n else factor(n))


def misuse(layout: Segmented, expr: Optional[Expr], clause: str) -> Optional[str]:
    """Why `expr` reads coordinates where that is not allowed, or None."""
    if expr is None:
        return None
    if layout.has_tokens and any(isinstance(n, Route) for n in walk(expr)):
        return "route(...) is not supported on a layout with token segments"
    sides = set(guarded_sides(layout))
    coords = [n for n in walk(expr) if isinstance(n, Coord) and n.side in sides]
    if not coords:
        return None
    if clause != "mask":
        return (f"grid coordinates cannot be used in the {clause} clause of a layout with "
                "token segments (only compared in the mask)")
    for n in walk(expr):
        if isinstance(n, Load) and any(isinstance(m, Coord) and m.side in sides
                                       for ix in n.index for m in walk(ix)):
            return ("grid coordinates cannot index an input in a layout with token "
                    "segments (only compared)")
    return None
