"""`build_schedule`: a pattern + shape → its block-sparse `Schedule`.

Pipeline (each step its own module):
    heads.head_classes      specialize lengths, split heads into classes of identical masks
    tileshape.choose_grids  1-D blocks or multi-D boxes (cost model on grid layouts)
    tiles.classify_tiles    EMPTY / FULL / PARTIAL per tile pair (intervals + exact fallback)
    closed_form             loop bounds for band-like masks, validated against the CSR

Time and memory are O(number of tile pairs) for band patterns (no [Lq, Lkv] tensor; key
tiles are first decided in groups, so mostly O(band tiles)): a 128K-token sliding window
with 64-token tiles (2048 × 2048 tiles) builds in well under a second on CPU
(bench/bench_tiles.py).
Results are memoized per (pattern, q_len, kv_len, heads, options).

`Schedule.stats` keys: tiles (tile pairs analysed, summed over head classes), fallback_tiles
(tiles decided by exact evaluation; for box tiles of a per-axis mask, the per-axis tile pairs
so decided — see `attncc.passes.tiles`), kept_pairs (exact kept (q, k) pairs over all heads, None for
data-dependent masks), computed_pairs (pairs in visited tiles over all heads), efficiency
(kept / computed), efficiency_1d (the same with plain 1-D tiles, on one-grid layouts; not
computed on segmented layouts, where it costs what their part tiling saves), q_tile /
kv_tile (tile shapes), bounds (head classes with closed-form bounds), bounds_dropped (head
classes whose derived bounds disagreed with the CSR and were dropped), candidates (cost of
each tile-shape candidate, when the cost model ran).
"""
from __future__ import annotations

import functools
from typing import Optional

from ..ir.dense import resolve_lengths
from ..passes.heads import head_classes
from ..passes.simplify import simplify, substitute
from ..passes.tiles import classify_tiles, runtime_kinds
from .closed_form import bounds_agree, derive_bounds
from ..ir.segmented import Segmented
from ..passes.tilegrid import SegmentedGrid
from .schedule import CSR, HeadClass, Schedule, TileClass
from .tileshape import choose_grids, grids_1d


def build_schedule(pattern, q_len: Optional[int] = None, kv_len: Optional[int] = None,
                   heads: int = 1, *, options=None) -> Schedule:
    """The schedule of `pattern` for queries of `q_len` and keys of `kv_len` tokens (both
    default to the layout's size on grid patterns) and `heads` query heads.

    Returns a `Schedule` whose head classes hold FULL and PARTIAL CSR lists (int32) by query
    tile and by key tile, and closed-form `bounds` where derivable (see
    `attncc.schedule.closed_form`). Raises ValueError for bad lengths or options.
    """
    from ..options import CompileOptions
    options = options if options is not None else CompileOptions()
    q_len, kv_len = resolve_lengths(pattern, q_len, kv_len)
    for label, n in (("q_len", q_len), ("kv_len", kv_len), ("heads", heads)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{label} must be a positive int, got {n!r}")
    return _build(pattern, q_len, kv_len, heads, options)


@functools.lru_cache(maxsize=64)
def _build(pattern, q_len: int, kv_len: int, heads: int, options) -> Schedule:
    layout = pattern.layout
    groups = head_classes(pattern.mask, q_len, kv_len, heads)
    masks = [g.mask for g in groups]
    reps = [g.heads[0] for g in groups]
    q_grid, kv_grid, info = choose_grids(masks, layout, q_len, kv_len, options, reps)
    classes, head_class = [], [0] * heads
    stats = {"tiles": 0, "fallback_tiles": 0, "kept_pairs": 0, "computed_pairs": 0,
             "bounds": 0, "bounds_dropped": 0,
             "q_tile": q_grid.label, "kv_tile": kv_grid.label}
    area = q_grid.tile_size * kv_grid.tile_size
    for ci, g in enumerate(groups):
        c = classify_tiles(g.mask, q_grid, kv_grid, layout=layout, head=g.heads[0])
        m = c.matrix
        full, partial = m == int(TileClass.FULL), m == int(TileClass.PARTIAL)
        full_csr, partial_csr = CSR.from_dense(full), CSR.from_dense(partial)
        bounds = None
        parts = isinstance(q_grid, SegmentedGrid) or isinstance(kv_grid, SegmentedGrid) \
            or len(q_grid.shape) != len(kv_grid.shape)
        if len(q_grid.shape) == 1 and not parts:
            # Length-generic bounds first (Q_LEN / KV_LEN stay variables: one kernel serves
            # every length); specialized bounds where those disagree at this shape.
            generic_mask = simplify(substitute(pattern.mask, {"HEADS": heads, "h": g.heads[0]}))
            bounds = derive_bounds(generic_mask, q_grid, kv_grid, layout, True)
            if bounds is not None and not bounds_agree(bounds, full_csr, partial_csr):
                bounds = None
        if bounds is None and not parts:
            bounds = derive_bounds(g.mask, q_grid, kv_grid, layout)
            if bounds is not None and not bounds_agree(bounds, full_csr, partial_csr):
                bounds = None
                stats["bounds_dropped"] += 1
        if bounds is not None:
            stats["bounds"] += 1
        classes.append(HeadClass(g.heads, full_csr, partial_csr,
                                 full_csr.transpose(kv_grid.n_tiles),
                                 partial_csr.transpose(kv_grid.n_tiles), bounds))
        for h in g.heads:
            head_class[h] = ci
        n = len(g.heads)
        stats["tiles"] += c.tiles
        stats["fallback_tiles"] += c.fallback_tiles
        stats["computed_pairs"] += int((full | partial).sum()) * area * n
        if c.kept is None or stats["kept_pairs"] is None:
            stats["kept_pairs"] = None
        else:
            stats["kept_pairs"] += c.kept * n
    kept, computed = stats["kept_pairs"], stats["computed_pairs"]
    stats["efficiency"] = None if kept is None else (kept / computed if computed else 1.0)
    if isinstance(layout, Segmented):
        pass  # efficiency_1d: the flat 1-D classification is the slow path these tiles avoid
    elif layout is not None and len(q_grid.shape) > 1 and kept is not None:
        g1q, g1k = grids_1d(q_len, kv_len, options)
        comp1 = 0
        for g in groups:
            c1 = classify_tiles(g.mask, g1q, g1k, layout=layout, head=g.heads[0])
            comp1 += int((c1.matrix != int(TileClass.EMPTY)).sum()) * g1q.tile_size \
                * g1k.tile_size * len(g.heads)
        stats["efficiency_1d"] = kept / comp1 if comp1 else 1.0
    elif kept is not None and len(q_grid.shape) == 1:
        stats["efficiency_1d"] = stats["efficiency"]
    stats.update(info)
    return Schedule(pattern, q_len, kv_len, heads, q_grid, kv_grid, tuple(classes),
                    tuple(head_class), runtime_kinds(pattern.mask), stats)


def schedule_text(pattern, q_len: Optional[int] = None, kv_len: Optional[int] = None,
                  heads: int = 1, options=None) -> str:
    """The text tile map of the schedule (the CLI's `--stage schedule`)."""
    return str(build_schedule(pattern, q_len, kv_len, heads, options=options))
