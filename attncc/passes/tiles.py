"""Tile classification: every (query tile, key tile) pair is EMPTY, FULL or PARTIAL.

Pre: a bool mask IR with lengths (and, per head class, `h`) substituted; the query and key
`TileGrid`s. Post: an int8 `[n_q_tiles, n_kv_tiles]` matrix of `TileClass` values that is
*sound* — a FULL tile is all-true and an EMPTY tile all-false on its in-range pairs — and,
for static masks, *tight* (every PARTIAL tile really is mixed), plus the exact number of
kept pairs.

Two stages, both vectorized over a row-band of query tiles × all key tiles:

0. Box tiles of a mask that is a conjunction of per-axis conditions (NATTEN, blocked) are
   classified axis by axis and combined (a box is FULL iff FULL on every axis, EMPTY iff
   EMPTY on some axis): exact, and O(per-axis tiles) instead of O(tile pairs).
1. Interval analysis (`attncc.ir.intervals`) over each tile's index box decides most tiles.
   1-D tiles give `q ∈ [q0, q1]`, `k ∈ [k0, k1]` (coordinates of a grid layout are derived
   from the flat range); multi-dimensional tiles give every coordinate its own interval.
   Only in-range tokens count: a tail tile's box stops at the last token.
2. Tiles left undecided are evaluated exactly, element by element but only for those tiles
   (`attncc.ir.dense.Evaluator` over the tiles' token indices). Their number is reported as
   `fallback_tiles`; for band patterns it is O(number of diagonal tiles).

Masks that read runtime data (`Load`, `route`, `blocks`) cannot be evaluated statically:
their undecided tiles stay PARTIAL (a sound over-approximation) and the kept-pair count is
unknown (None).

Work and memory are O(number of tiles) plus O(tile area) per undecided tile; no
`[q_len, kv_len]` tensor is ever built.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..ir.dense import Evaluator
from ..ir.intervals import Box, IntervalEval
from ..ir.nodes import Blocks, Expr, Load, Route, free_vars, walk
from ..schedule.schedule import TileClass, TileGrid

_BAND_ELEMS = 1 << 18      # tile pairs per row-band in the interval stage
_EXACT_ELEMS = 1 << 21     # token pairs per chunk in the exact stage


@dataclass(frozen=True, eq=False)
class TileClassification:
    """matrix          int8 [n_q_tiles, n_kv_tiles] of TileClass values
    kept            exact number of kept (query, key) pairs, None when data-dependent
    fallback_tiles  tiles decided by exact evaluation (or left PARTIAL for runtime data)
    """
    matrix: torch.Tensor
    kept: Optional[int]
    fallback_tiles: int

    @property
    def tiles(self) -> int:
        return self.matrix.numel()


def runtime_kinds(mask: Expr) -> tuple[str, ...]:
    """Selector kinds ("route", "blocks") used by `mask`, in that order."""
    kinds = {type(n) for n in walk(mask)}
    return tuple(name for cls, name in ((Route, "route"), (Blocks, "blocks")) if cls in kinds)


def is_static(mask: Expr) -> bool:
    """True when `mask` reads no runtime data (no input loads, no selectors) and does not
    depend on the batch index (schedules are shared by every batch element)."""
    return "b" not in free_vars(mask) and \
        not any(isinstance(n, (Load, Route, Blocks)) for n in walk(mask))


def _tile_coords(grid: TileGrid) -> torch.Tensor:
    """int64 [n_tiles, ndim]: tile-grid coordinates of every tile (row-major)."""
    counts = grid.counts
    idx = torch.arange(grid.n_tiles, dtype=torch.int64)
    out = []
    for c in reversed(counts):
        out.append(idx % c)
        idx = idx // c
    return torch.stack(list(reversed(out)), -1)


def tile_boxes(grid: TileGrid) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per tile: coordinate bounds lo, hi (int64 [n_tiles, ndim], in-range tokens only) and the
    number of in-range tokens (int64 [n_tiles])."""
    tc = _tile_coords(grid)
    tile = torch.tensor(grid.tile, dtype=torch.int64)
    shape = torch.tensor(grid.shape, dtype=torch.int64)
    lo = tc * tile
    hi = torch.minimum(lo + tile, shape) - 1
    return lo, hi, (hi - lo + 1).prod(-1)


def _side_box(grid: TileGrid, side: str, sel: torch.Tensor, shape) -> tuple[dict, dict]:
    """Box entries for tiles `sel` of `grid`, reshaped to `shape` for broadcasting."""
    lo, hi, _ = tile_boxes(grid)
    lo, hi = lo[sel].to(torch.float64), hi[sel].to(torch.float64)
    if len(grid.shape) == 1:
        return {side: (lo[:, 0].view(shape), hi[:, 0].view(shape))}, {}
    strides = torch.tensor([math.prod(grid.shape[i + 1:]) for i in range(len(grid.shape))],
                           dtype=torch.float64)
    flat = ((lo * strides).sum(-1).view(shape), (hi * strides).sum(-1).view(shape))
    coords = {(side, a): (lo[:, a].view(shape), hi[:, a].view(shape))
              for a in range(len(grid.shape))}
    return {side: flat}, coords


def separable_axes(mask: Expr, ndim: int) -> Optional[list[Expr]]:
    """When `mask` is a conjunction of atoms that each use the coordinates of one layout axis
    only (NATTEN neighborhoods, blocked attention), the per-axis masks with `q.a`, `k.a`
    renamed to `q`, `k`; else None."""
    from ..ir.nodes import TRUE, Binary, Coord, Var, transform

    def conj(e):
        if isinstance(e, Binary) and e.op == "and":
            return conj(e.a) + conj(e.b)
        return [e]

    parts: list[list[Expr]] = [[] for _ in range(ndim)]
    for atom in conj(mask):
        if atom is TRUE:
            continue
        fv = free_vars(atom)
        axes = {n.axis for n in walk(atom) if isinstance(n, Coord)}
        if len(axes) != 1 or fv & {"q", "k"} != {n.side for n in walk(atom)
                                                   if isinstance(n, Coord)} or \
                any(isinstance(n, Var) and n.name in ("q", "k") for n in walk(atom)):
            return None
        a = axes.pop()
        if a >= ndim:
            return None
        parts[a].append(transform(atom, lambda n: Var(n.side) if isinstance(n, Coord) else None))
    out = []
    for items in parts:
        m = TRUE
        for x in items:
            m = x if m is TRUE else Binary("and", m, x)
        out.append(m)
    return out


def _combine_axes(mats: list[torch.Tensor]) -> torch.Tensor:
    """Product-box classes: the minimum over axes of per-axis classes, tiles row-major."""
    nd = len(mats)
    out = None
    for a, m in enumerate(mats):
        shape = [1] * (2 * nd)
        shape[a], shape[nd + a] = m.shape
        v = m.view(shape)
        out = v if out is None else torch.minimum(out, v)
    nq = math.prod(m.shape[0] for m in mats)
    return out.reshape(nq, -1)


def classify_tiles(mask: Expr, q_grid: TileGrid, kv_grid: TileGrid, *, layout=None,
                   lengths: Optional[dict] = None, head: Optional[int] = None,
                   heads: int = 1, exact: bool = True) -> TileClassification:
    """Classify every tile pair of `mask` (see module docstring).

    q_grid / kv_grid   tilings of the query and key tokens (multi-dimensional tiles need the
                       grid `layout`, whose shape they tile)
    lengths            values of Q_LEN / KV_LEN / HEADS if still present in `mask`
    head               the head index when `h` is fixed (a head class), else h ∈ [0, heads)
    exact              decide undecided tiles by exact evaluation (False: leave them PARTIAL,
                       a cheap upper bound used by the tile-shape cost model)
    Returns a `TileClassification` (matrix int8 [n_q_tiles, n_kv_tiles]).
    """
    lengths = dict(lengths or {})
    if head is None and "h" in free_vars(mask) and exact and is_static(mask):
        raise ValueError("the mask uses h: classify one head class at a time (pass head=)")
    nq, nk = q_grid.n_tiles, kv_grid.n_tiles
    static = is_static(mask)
    if len(q_grid.shape) > 1 and static:
        parts = separable_axes(mask, len(q_grid.shape))
        if parts is not None:
            # Box tiles of a per-axis conjunction: classify each axis on its own (exact).
            res = [classify_tiles(m, TileGrid((qs,), (qt,)), TileGrid((ks,), (kt,)),
                                  lengths=lengths, head=head, heads=heads, exact=exact)
                   for m, qs, qt, ks, kt in zip(parts, q_grid.shape, q_grid.tile,
                                                kv_grid.shape, kv_grid.tile)]
            kept = None if any(r.kept is None for r in res) else math.prod(r.kept for r in res)
            return TileClassification(_combine_axes([r.matrix for r in res]), kept,
                                      sum(r.fallback_tiles for r in res))
    out = torch.zeros(nq, nk, dtype=torch.int8)
    _, _, q_count = tile_boxes(q_grid)
    _, _, k_count = tile_boxes(kv_grid)
    kept = 0
    base_vars = {n: (float(v), float(v)) for n, v in lengths.items()}
    base_vars["h"] = (float(head), float(head)) if head is not None else (0.0, float(heads - 1))
    k_all = torch.arange(nk)
    k_vars, k_coords = _side_box(kv_grid, "k", k_all, (1, nk))
    rows = max(1, _BAND_ELEMS // max(nk, 1))
    undecided_q, undecided_k = [], []
    for r0 in range(0, nq, rows):
        r1 = min(nq, r0 + rows)
        q_vars, q_coords = _side_box(q_grid, "q", torch.arange(r0, r1), (r1 - r0, 1))
        box = Box(vars={**base_vars, **q_vars, **k_vars}, coords={**q_coords, **k_coords},
                  layout=layout)
        always, never = IntervalEval(box).decide(mask)
        always = always.expand(r1 - r0, nk)
        never = never.expand(r1 - r0, nk)
        full = always & ~never
        band = torch.where(full, int(TileClass.FULL),
                           torch.where(never, int(TileClass.EMPTY), int(TileClass.PARTIAL))).to(torch.int8)
        out[r0:r1] = band
        kept += int(q_count[r0:r1].to(torch.float64) @ (full.to(torch.float64) @ k_count.to(torch.float64)))
        qi, ki = (band == int(TileClass.PARTIAL)).nonzero(as_tuple=True)
        undecided_q.append(qi + r0)
        undecided_k.append(ki)
    qi = torch.cat(undecided_q) if undecided_q else torch.zeros(0, dtype=torch.int64)
    ki = torch.cat(undecided_k) if undecided_k else torch.zeros(0, dtype=torch.int64)
    if not static or not exact:
        return TileClassification(out, kept if static and qi.numel() == 0 else None, qi.numel())
    kept += _exact(mask, q_grid, kv_grid, layout, lengths, head, qi, ki, out)
    return TileClassification(out, kept, qi.numel())


def _exact(mask, q_grid, kv_grid, layout, lengths, head, qi, ki, out) -> int:
    """Decide tiles (qi[t], ki[t]) exactly, writing their class into `out`; returns the number
    of kept pairs in them."""
    if qi.numel() == 0:
        return 0
    q_tok = q_grid.token_index()
    k_tok = kv_grid.token_index()
    per = max(1, _EXACT_ELEMS // (q_grid.tile_size * kv_grid.tile_size))
    kept = 0
    env_base = dict(lengths)
    env_base["b"] = 0
    env_base["h"] = 0 if head is None else head
    for c0 in range(0, qi.numel(), per):
        a, b = qi[c0:c0 + per], ki[c0:c0 + per]
        q = q_tok[a][:, :, None]      # [n, TQ, 1]
        k = k_tok[b][:, None, :]      # [n, 1, TK]
        padded = bool((q < 0).any()) or bool((k < 0).any())
        env = dict(env_base, q=q.clamp(min=0) if padded else q, k=k.clamp(min=0) if padded else k)
        value = Evaluator(env, layout=layout).evaluate(mask)
        value = value.expand(q.shape[0], q.shape[1], k.shape[2])
        if padded:
            valid = (q >= 0) & (k >= 0)
            hit = value & valid
            all_true = (value | ~valid).flatten(1).all(1)
        else:
            hit = value
            all_true = value.flatten(1).all(1)
        any_true = hit.flatten(1).any(1)
        cls = torch.where(all_true, int(TileClass.FULL),
                          torch.where(any_true, int(TileClass.PARTIAL), int(TileClass.EMPTY)))
        out[a, b] = cls.to(torch.int8)
        kept += int(hit.sum())
    return kept
