"""Tile shapes: 1-D blocks, or multi-dimensional boxes of a grid layout chosen by a cost model.

1-D patterns (no layout) use `(block_m,)` query tiles and `(block_n,)` key tiles from the
`CompileOptions`. On a grid layout the candidates are boxes with power-of-two extents per
axis (each at most the axis length rounded up to a power of two) whose token count equals
`block_m` (queries) / `block_n` (keys) — so every candidate launches the same work per
tile — plus the 1-D flattening. The cost of a candidate is the number of token pairs the
kernel computes: visited tiles × query-tile size × key-tile size, with visited tiles
counted by the interval stage alone (cheap, an upper bound). The cheapest wins; ties go to
a box whose tiles *are* the 1-D tiles (e.g. 1×64 on a 64-wide map: same work, but per-axis
closed-form bounds apply), then to the 1-D tiles, then to the squarer box. `options.q_tile` / `kv_tile` fix the shapes and
`options.tile_1d` forces 1-D tiles. Segmented and separate query/key layouts tile each grid
with its own boxes and each run of plain tokens 1-D (`attncc.schedule.segment_tiles`).
"""
from __future__ import annotations

import itertools
from typing import Optional

from ..ir.nodes import Expr
from ..ir.segmented import Segmented
from ..passes.tiles import as_box, classify_tiles
from .schedule import TileClass, TileGrid


def _pow2_at_least(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p


def box_candidates(shape: tuple[int, ...], size: int) -> list[tuple[int, ...]]:
    """Power-of-two boxes with prod == size fitting `shape` (extents ≤ pow2ceil(axis))."""
    caps = [_pow2_at_least(s) for s in shape]
    exps = [list(range(0, c.bit_length())) for c in caps]
    out = []
    for combo in itertools.product(*exps):
        box = tuple(1 << e for e in combo)
        prod = 1
        for b in box:
            prod *= b
        if prod == size:
            out.append(box)
    return out


def _kv_boxes(a: tuple[int, ...], ratio: float) -> list[tuple[int, ...]]:
    """Key boxes paired with query box `a`: `a` itself when the tile sizes match, else `a`
    stretched or shrunk by `ratio` along one axis."""
    if ratio == 1:
        return [a]
    out = []
    for i, e in enumerate(a):
        v = e * ratio
        if v >= 1 and v == int(v):
            out.append(a[:i] + (int(v),) + a[i + 1:])
    return out


def grids_1d(q_len: int, kv_len: int, options) -> tuple[TileGrid, TileGrid]:
    return TileGrid((q_len,), (options.block_m,)), TileGrid((kv_len,), (options.block_n,))


def computed_pairs(mask: Expr, q_grid: TileGrid, kv_grid: TileGrid, layout, head,
                   exact: bool = False) -> int:
    """Token pairs computed by a kernel visiting every non-EMPTY tile."""
    c = classify_tiles(mask, q_grid, kv_grid, layout=layout, head=head, exact=exact)
    visited = int((c.matrix != int(TileClass.EMPTY)).sum())
    return visited * q_grid.tile_size * kv_grid.tile_size


def choose_grids(masks: list[Expr], layout, q_len: int, kv_len: int, options,
                 heads: Optional[list[int]] = None) -> tuple[TileGrid, TileGrid, dict]:
    """(q_grid, kv_grid, info) for the specialized masks of all head classes; `info` lists
    each candidate's computed pairs (`candidates`) when the cost model ran."""
    if layout is None or options.tile_1d or len(layout.axes) == 0:
        return (*grids_1d(q_len, kv_len, options), {})
    if isinstance(layout, Segmented):
        from .segment_tiles import choose_segmented_grids
        return choose_segmented_grids(masks, layout, options, heads)
    shape = layout.shape
    if options.q_tile is not None or options.kv_tile is not None:
        qt = options.q_tile or options.kv_tile
        kt = options.kv_tile or options.q_tile
        if len(qt) != len(shape) or len(kt) != len(shape):
            raise ValueError(f"tile shapes {qt} / {kt} do not match layout {layout}")
        return TileGrid(shape, tuple(qt)), TileGrid(shape, tuple(kt)), {}
    heads = heads or [None] * len(masks)
    cands: list[tuple[TileGrid, TileGrid]] = [grids_1d(q_len, kv_len, options)]
    if len(shape) > 1:
        kb = set(box_candidates(shape, options.block_n))
        for a in box_candidates(shape, options.block_m):
            for b in _kv_boxes(a, options.block_n / options.block_m):
                if b in kb:
                    cands.append((TileGrid(shape, a), TileGrid(shape, b)))
    same = (as_box(cands[0][0], shape), as_box(cands[0][1], shape))
    scored = []
    for idx, (qg, kg) in enumerate(cands):
        cost = sum(computed_pairs(m, qg, kg, layout, h) for m, h in zip(masks, heads))
        squareness = max(qg.tile) / min(qg.tile)
        rank = 1 if idx == 0 else 0 if (qg, kg) == same else 2
        scored.append((cost, rank, squareness, idx))
    best = min(scored)
    qg, kg = cands[best[3]]
    info = {"candidates": {("×".join(map(str, q.tile)), "×".join(map(str, k.tile))): s[0]
                           for (q, k), s in zip(cands, scored)}}
    return qg, kg, info
