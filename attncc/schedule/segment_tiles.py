"""Tile shapes for segmented and separate query/key layouts (`attncc.ir.segmented`).

Each side is cut into parts (`passes.segment_blocks.side_parts`): runs of plain tokens get
1-D tiles of `block_m` (queries) / `block_n` (keys) tokens, the grid gets boxes of that many
token slots or 1-D tiles over the grid's own tokens, so every tile lies in one part. A side
with one part is a plain `TileGrid` (of its grid's shape for boxes); a side with several a
`SegmentedGrid`.

The grid's box comes from the tile-shape cost model of `tileshape` (pairs computed in
visited tiles, counted by the interval stage over every block of parts): one layout for both
sides tries the same (query box, key box) pairs as a plain grid; separate query and key grids
first rank the query boxes against 1-D key tiles and against the key box of most similar
shape scaled to the key grid, then try every key box with the three best query boxes. Ties go to the box whose
tiles are the 1-D tiles, then to 1-D tiles, then to the squarer box. Plain 1-D tiles over the
whole sequence (tiles then straddle parts) compete too and win only when strictly cheaper
(a handful of extra tokens beside a small grid). `options.q_tile` / `kv_tile` fix the boxes.
"""
from __future__ import annotations

import math
from typing import Optional

from ..ir.nodes import Expr
from ..passes.segment_blocks import side_parts
from ..passes.tiles import as_box
from .schedule import TileGrid
from .tileshape import _kv_boxes, box_candidates, computed_pairs
from ..passes.tilegrid import SegmentedGrid


def _grid_options(shape, block: int) -> list[TileGrid]:
    """1-D tiles over the grid's tokens, then the boxes of `block` slots."""
    n = 1
    for s in shape:
        n *= s
    out = [TileGrid((n,), (block,))]
    if len(shape) > 1:
        out += [TileGrid(tuple(shape), b) for b in box_candidates(tuple(shape), block)]
    return out


def side_grid(side, block: int, grid_tiling: Optional[TileGrid]) -> TileGrid:
    """The tiling of one side: its parts' tilings (the grid's = `grid_tiling`)."""
    parts, starts = [], []
    for p in side_parts(side):
        starts.append(p.start)
        if p.grid is None:
            parts.append(TileGrid((p.size,), (block,)))
        else:
            parts.append(grid_tiling)
    return parts[0] if len(parts) == 1 else SegmentedGrid.of(parts, starts)


def _rank(t: Optional[TileGrid]) -> tuple[int, float]:
    """Tie-break key of a grid tiling: (box equal to 1-D tiles: 0, 1-D: 1, other box: 2),
    squareness."""
    if t is None or len(t.shape) == 1:
        return 1, 1.0
    same = as_box(TileGrid((t.numel,), (t.tile_size,)), t.shape)
    return (0 if same == t else 2), max(t.tile) / min(t.tile)


def _label(t: Optional[TileGrid]) -> str:
    return "-" if t is None else "×".join(map(str, t.tile))


def choose_segmented_grids(masks: list[Expr], layout, options,
                           heads: Optional[list]) -> tuple[TileGrid, TileGrid, dict]:
    """(q_grid, kv_grid, info) for the head-class masks on a `Segmented` layout."""
    qg_shape = layout.q.grid.shape if layout.q.grid is not None else None
    kg_shape = layout.k.grid.shape if layout.k.grid is not None else None
    bm, bn = options.block_m, options.block_n
    heads = heads or [None] * len(masks)

    def build(qt, kt):
        return side_grid(layout.q, bm, qt), side_grid(layout.k, bn, kt)

    if options.q_tile is not None or options.kv_tile is not None:
        def fixed(shape, own, other):
            t = own or other
            if shape is None:
                return None
            if len(t) != len(shape):
                raise ValueError(f"tile shape {t} does not match the grid {shape} of {layout}")
            return TileGrid(tuple(shape), tuple(t))
        return (*build(fixed(qg_shape, options.q_tile, options.kv_tile),
                       fixed(kg_shape, options.kv_tile, options.q_tile)), {})

    scored: dict = {}

    def cost(qt, kt):
        key = (_label(qt), _label(kt))
        if key not in scored:
            qg, kg = build(qt, kt)
            c = sum(computed_pairs(m, qg, kg, layout, h) for m, h in zip(masks, heads))
            r1, s1 = _rank(qt)
            r2, s2 = _rank(kt)
            scored[key] = ((c, r1 + r2, max(s1, s2)), qt, kt)
        return scored[key][0]

    q_opts = _grid_options(qg_shape, bm) if qg_shape is not None else [None]
    k_opts = _grid_options(kg_shape, bn) if kg_shape is not None else [None]
    if layout.shared and qg_shape is not None:
        pairs = [(q_opts[0], k_opts[0])]
        kb = {t.tile for t in k_opts[1:]}
        for a in q_opts[1:]:
            for b in _kv_boxes(a.tile, bn / bm):
                if b in kb:
                    pairs.append((a, TileGrid(a.shape, b)))
        for qt, kt in pairs:
            cost(qt, kt)
    else:
        # Stage 1: every query tiling against 1-D key tiles and against the key box most like
        # it scaled to the key grid; stage 2: every key tiling with the three best.
        def scaled(qt):
            if qt is None or kg_shape is None or len(qt.tile) != len(kg_shape) \
                    or len(k_opts) < 2 or len(qt.tile) == 1:
                return k_opts[0]
            want = [math.log2(max(t * k / q, 1e-9)) for t, q, k in zip(qt.tile, qg_shape, kg_shape)]
            return min(k_opts[1:], key=lambda kt: sum(abs(math.log2(t) - w)
                                                      for t, w in zip(kt.tile, want)))
        for qt in q_opts:
            cost(qt, k_opts[0])
            cost(qt, scaled(qt))
        best_q = sorted(q_opts, key=lambda t: min(cost(t, k_opts[0]), cost(t, scaled(t))))[:3]
        for qt in best_q:
            for kt in k_opts:
                cost(qt, kt)
    # The whole sequence in plain 1-D tiles (tiles may straddle parts): chosen only when
    # strictly cheaper, e.g. a few extra tokens beside a small grid.
    flat = (TileGrid((layout.q.numel,), (bm,)), TileGrid((layout.k.numel,), (bn,)))
    flat_cost = sum(computed_pairs(m, flat[0], flat[1], layout, h) for m, h in zip(masks, heads))
    (c, _, _), qt, kt = min(scored.values(), key=lambda v: v[0])
    info = {"candidates": {key: v[0][0] for key, v in scored.items()}}
    info["candidates"][("flat", "flat")] = flat_cost
    if flat_cost < c:
        return (*flat, info)
    return (*build(qt, kt), info)
