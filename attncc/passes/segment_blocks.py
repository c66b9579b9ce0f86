"""Tile classification on segmented layouts, one block of parts at a time.

Pre: a bool mask over flat token indices q, k and the coordinates of a `Segmented` layout
(`attncc.ir.segmented`; lengths and the head substituted as for `classify_tiles`), and the
two sides' tilings, at least one a `SegmentedGrid` (whose tiles each lie in one part).
Post: the `TileClassification` of the whole tile matrix, assembled block by block.

A side's *parts* (`side_parts`) are the maximal runs of consecutive token segments and the
grid segment. For a block (query part P, key part R) the mask is *restricted*: q and k become
indices local to their parts (q → q + start(P)), and every boolean subexpression that interval
analysis decides over the whole block (q ∈ P, k ∈ R, coordinates within their grids) becomes a
constant — so segment membership is decided once per block, the coordinate guards vanish,
and what remains is a plain mask over the block's own grids (e.g. the NATTEN conjunction on
grid × grid, `true` on text × anything). Each restricted block is then classified by
`classify_tiles` with the block's layout (the shared grid itself, or per-side grids), so the
per-axis, interval and exact stages apply unchanged and the work stays O(tile pairs).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch

from ..ir.intervals import Box, IntervalEval
from ..ir.nodes import BOOL, FALSE, TRUE, Binary, Const, Expr, Var, rebuild, walk
from ..ir.pattern import Layout
from ..ir.segmented import Segment, Segmented, SideLayout
from .simplify import simplify, substitute
from .tilegrid import SegmentedGrid, TileGrid


@dataclass(frozen=True)
class Part:
    """Tokens [start, start + size) of one side: a run of token segments or the grid. `side`
    is the part's own layout (its segments shifted to start at 0)."""
    start: int
    size: int
    side: SideLayout

    @property
    def grid(self) -> Optional[Layout]:
        segs = self.side.segments
        return segs[0].grid if len(segs) == 1 else None


def side_parts(side: SideLayout) -> tuple[Part, ...]:
    """The parts of `side` in token order (consecutive token segments merged)."""
    out: list[Part] = []
    run: list[Segment] = []

    def close():
        if run:
            s0 = run[0].start
            segs = tuple(Segment(s.name, s.start - s0, s.size) for s in run)
            out.append(Part(s0, sum(s.size for s in run), SideLayout(segs)))
            run.clear()
    for seg in side.segments:
        if seg.grid is None:
            run.append(seg)
            continue
        close()
        out.append(Part(seg.start, seg.size, SideLayout((Segment("grid", 0, seg.size, seg.grid),))))
    close()
    return tuple(out)


def whole_part(side: SideLayout) -> Part:
    """The whole side as one part (a side tiled without regard to its segments)."""
    return Part(0, side.numel, side)


def block_layout(qp: Part, kp: Part):
    """Layout of a restricted block: the grid itself when both parts are the same grid,
    else per-side layouts."""
    if qp.grid is not None and qp.grid == kp.grid:
        return qp.grid
    return Segmented(qp.side, kp.side, shared=False)


def _fold_decided(root: Expr, ev: IntervalEval) -> Expr:
    """`root` with every bool node that `ev` decides replaced by its constant."""
    ev.interval(root)
    memo: dict[int, Expr] = {}
    for n in walk(root):
        if n.dtype == BOOL and not isinstance(n, Const):
            lo, hi = ev.memo[id(n)]
            if bool(lo.all()):
                memo[id(n)] = TRUE
                continue
            if not bool(hi.any()):
                memo[id(n)] = FALSE
                continue
        kids = n.children()
        memo[id(n)] = rebuild(n, tuple(memo[id(c)] for c in kids)) if kids else n
    return memo[id(root)]


@functools.lru_cache(maxsize=4096)
def restrict(mask: Expr, qp: Part, kp: Part, lengths: tuple = (), head: Optional[int] = None,
             heads: Optional[int] = 1, local: bool = True) -> Expr:
    """`mask` on block (qp, kp) over part-local indices, decided parts folded (module doc).
    `local=False` keeps the flat indices (only the folding), for kernels whose loops each
    visit one part's tiles: there the parts' coordinate guards are decided per loop."""
    shift = {}
    if qp.start and local:
        shift["q"] = Binary("add", Var("q"), Const(qp.start))
    if kp.start and local:
        shift["k"] = Binary("add", Var("k"), Const(kp.start))
    m = simplify(substitute(mask, shift)) if shift else mask
    f = torch.tensor
    vars_ = {n: (f(float(v)), f(float(v))) for n, v in lengths}
    q0, k0 = (0, 0) if local else (qp.start, kp.start)
    vars_["q"] = (f(float(q0)), f(float(q0 + qp.size - 1)))
    vars_["k"] = (f(float(k0)), f(float(k0 + kp.size - 1)))
    if head is not None:
        vars_["h"] = (f(float(head)), f(float(head)))
    elif heads is not None:  # None: any head (h unbounded)
        vars_["h"] = (f(0.0), f(float(heads - 1)))
    coords = {}
    for side, part in (("q", qp), ("k", kp)):
        if part.grid is not None:
            for a, size in enumerate(part.grid.shape):
                coords[(side, a)] = (f(0.0), f(float(size - 1)))
    ev = IntervalEval(Box(vars=vars_, coords=coords, layout=None))
    return simplify(_fold_decided(m, ev))


def _parts_of(grid: TileGrid, side: SideLayout) -> list[tuple[Part, TileGrid]]:
    if not isinstance(grid, SegmentedGrid):
        return [(whole_part(side), grid)]
    by_start = {p.start: p for p in side_parts(side)}
    out = []
    for g, s in zip(grid.parts, grid.starts):
        part = by_start.get(s)
        if part is None or part.size != g.numel:
            raise ValueError(f"tiling part [{s}:{s + g.numel}] is not a part of the layout {side}")
        out.append((part, g))
    return out


def classify_parts(mask: Expr, q_grid: TileGrid, kv_grid: TileGrid, layout: Segmented, *,
                   lengths: dict, head: Optional[int], heads: int, exact: bool):
    """`classify_tiles` for segmented tilings (see the module docstring)."""
    from .tiles import TileClassification, classify_tiles
    qparts, kparts = _parts_of(q_grid, layout.q), _parts_of(kv_grid, layout.k)
    out = torch.zeros(q_grid.n_tiles, kv_grid.n_tiles, dtype=torch.int8)
    kept: Optional[int] = 0
    fallback = 0
    lens = tuple(sorted(lengths.items()))
    q0 = 0
    for qp, qg in qparts:
        k0 = 0
        for kp, kg in kparts:
            m = restrict(mask, qp, kp, lens, head, heads)
            if m is FALSE:
                pass  # EMPTY block
            else:
                r = classify_tiles(m, qg, kg, layout=block_layout(qp, kp), lengths=lengths,
                                   head=head, heads=heads, exact=exact)
                out[q0:q0 + qg.n_tiles, k0:k0 + kg.n_tiles] = r.matrix
                kept = None if kept is None or r.kept is None else kept + r.kept
                fallback += r.fallback_tiles
            k0 += kg.n_tiles
        q0 += qg.n_tiles
    return TileClassification(out, kept, fallback)
