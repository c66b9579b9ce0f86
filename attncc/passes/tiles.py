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
   `fallback_tiles`; for band patterns it is O(number of diagonal tiles). Masks that see q
   and k only through q - k (`shift_invariant`) evaluate one whole tile per distinct offset
   q0 - k0 and reuse it, so a long window costs a handful of tile evaluations.

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
from ..ir.intervals import Box, IntervalEval, linear_form
from ..ir.nodes import (COMPARE_OPS, INT, Binary, Blocks, Coord, Expr, Load, Route, Unary, Var,
                        free_vars, walk)
from ..ir.pattern import Layout
from .tilegrid import SegmentedGrid, TileClass, TileGrid

_BAND_ELEMS = 1 << 18      # box pairs per row-band in the interval stage
_GROUP = 32                # key tiles per group in the coarse interval pass
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


def _all_boxes(grid: TileGrid, side: str) -> dict:
    """Box entries of every tile of `grid`: key → (lo, hi) float64 [n_tiles], keys `side`
    (flat token index) and, on multi-dimensional grids, (side, axis) coordinates."""
    lo, hi, _ = tile_boxes(grid)
    lo, hi = lo.to(torch.float64), hi.to(torch.float64)
    if len(grid.shape) == 1:
        return {side: (lo[:, 0], hi[:, 0])}
    strides = torch.tensor([math.prod(grid.shape[i + 1:]) for i in range(len(grid.shape))],
                           dtype=torch.float64)
    out = {side: ((lo * strides).sum(-1), (hi * strides).sum(-1))}
    for a in range(len(grid.shape)):
        out[(side, a)] = (lo[:, a], hi[:, a])
    return out


def _group_boxes(boxes: dict, n: int, g: int) -> dict:
    """Boxes of consecutive groups of `g` tiles (the last group may be shorter): per key the
    min of lo and max of hi over the group — a box containing every tile of the group."""
    pad = -n % g
    out = {}
    for key, (lo, hi) in boxes.items():
        lo = torch.nn.functional.pad(lo, (0, pad), value=math.inf).view(-1, g).amin(1)
        hi = torch.nn.functional.pad(hi, (0, pad), value=-math.inf).view(-1, g).amax(1)
        out[key] = (lo, hi)
    return out


def _decide(mask, base_vars, layout, qbox: dict, qsel, kbox: dict, ksel, shape_q, shape_k):
    """(always, never) of `mask` over box pairs: q boxes `qsel` viewed as `shape_q` against
    k boxes `ksel` viewed as `shape_k` (broadcast together)."""
    vars_, coords = dict(base_vars), {}
    for boxes, sel, shape in ((qbox, qsel, shape_q), (kbox, ksel, shape_k)):
        for key, (lo, hi) in boxes.items():
            entry = (lo[sel].view(shape), hi[sel].view(shape))
            if isinstance(key, tuple):
                coords[key] = entry
            else:
                vars_[key] = entry
    return IntervalEval(Box(vars=vars_, coords=coords, layout=layout)).decide(mask)


def _classes(always: torch.Tensor, never: torch.Tensor) -> torch.Tensor:
    return torch.where(always & ~never, int(TileClass.FULL),
                       torch.where(never, int(TileClass.EMPTY), int(TileClass.PARTIAL))).to(torch.int8)


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


def as_box(grid: TileGrid, shape: tuple[int, ...]) -> Optional[TileGrid]:
    """The box tiling of the row-major grid `shape` whose tiles are exactly the 1-D tiles of
    `grid` (same tokens, same numbering), or None: a 1-D tile of T tokens is a box when T
    divides the last axis, or is a multiple of it by a divisor of the axis before, etc."""
    if len(grid.shape) != 1 or grid.shape[0] != math.prod(shape):
        return None
    t, box = grid.tile[0], [1] * len(shape)
    for a in reversed(range(len(shape))):
        if t <= shape[a]:
            if shape[a] % t:
                return None
            box[a], t = t, 1
            break
        if t % shape[a]:
            return None
        box[a], t = shape[a], t // shape[a]
    return TileGrid(tuple(shape), tuple(box)) if t == 1 else None


def combine_axes(mats: list[torch.Tensor]) -> torch.Tensor:
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
    if isinstance(q_grid, SegmentedGrid) or isinstance(kv_grid, SegmentedGrid):
        # Tiles of a segmented layout: block by block of parts (`passes.segment_blocks`).
        from .segment_blocks import classify_parts
        return classify_parts(mask, q_grid, kv_grid, layout, lengths=lengths, head=head,
                              heads=heads, exact=exact)
    nq, nk = q_grid.n_tiles, kv_grid.n_tiles
    static = is_static(mask)
    one_grid = isinstance(layout, Layout)
    if static and one_grid and len(layout.axes) > 1 and len(q_grid.shape) == 1:
        qb, kb = as_box(q_grid, layout.shape), as_box(kv_grid, layout.shape)
        if qb is not None and kb is not None and separable_axes(mask, len(layout.axes)):
            # 1-D tiles that are boxes of the grid (e.g. 64 tokens of a 256-wide row):
            # same tiles, same row-major numbering, so the per-axis path applies.
            return classify_tiles(mask, qb, kb, layout=layout, lengths=lengths, head=head,
                                  heads=heads, exact=exact)
    if len(q_grid.shape) > 1 and len(kv_grid.shape) == len(q_grid.shape) and static:
        parts = separable_axes(mask, len(q_grid.shape))
        if parts is not None:
            # Box tiles of a per-axis conjunction: classify each axis on its own (exact).
            res = [classify_tiles(m, TileGrid((qs,), (qt,)), TileGrid((ks,), (kt,)),
                                  lengths=lengths, head=head, heads=heads, exact=exact)
                   for m, qs, qt, ks, kt in zip(parts, q_grid.shape, q_grid.tile,
                                                kv_grid.shape, kv_grid.tile)]
            kept = None if any(r.kept is None for r in res) else math.prod(r.kept for r in res)
            return TileClassification(combine_axes([r.matrix for r in res]), kept,
                                      sum(r.fallback_tiles for r in res))
    out = torch.zeros(nq, nk, dtype=torch.int8)
    _, _, q_count = tile_boxes(q_grid)
    _, _, k_count = tile_boxes(kv_grid)
    kept = 0
    base_vars = {n: (float(v), float(v)) for n, v in lengths.items()}
    base_vars["h"] = (float(head), float(head)) if head is not None else (0.0, float(heads - 1))
    qbox, kbox = _all_boxes(q_grid, "q"), _all_boxes(kv_grid, "k")
    # Coarse-to-fine: decide groups of `g` key tiles first; only undecided groups are
    # refined tile by tile (band patterns leave O(1) undecided groups per query tile).
    g = _GROUP if nk >= 4 * _GROUP else 1
    ng = -(-nk // g)
    gbox = _group_boxes(kbox, nk, g) if g > 1 else kbox
    rows = max(1, _BAND_ELEMS // max(ng, 1))
    undecided_q, undecided_k = [], []
    for r0 in range(0, nq, rows):
        r1 = min(nq, r0 + rows)
        R = r1 - r0
        rsel = torch.arange(r0, r1)
        always, never = _decide(mask, base_vars, layout, qbox, rsel, gbox, torch.arange(ng),
                                (R, 1), (1, ng))
        coarse = _classes(always.expand(R, ng), never.expand(R, ng))
        band = coarse if g == 1 else coarse.repeat_interleave(g, dim=1)[:, :nk].contiguous()
        if g > 1:
            ri, gi = (coarse == int(TileClass.PARTIAL)).nonzero(as_tuple=True)
            if ri.numel():
                kt = gi[:, None] * g + torch.arange(g)[None, :]
                ok = kt < nk
                ri2 = ri[:, None].expand_as(kt)[ok]
                kt = kt[ok]
                always, never = _decide(mask, base_vars, layout, qbox, ri2 + r0, kbox, kt,
                                        (-1,), (-1,))
                band[ri2, kt] = _classes(always.expand(kt.shape), never.expand(kt.shape))
        out[r0:r1] = band
        fq, fk = (band == int(TileClass.FULL)).nonzero(as_tuple=True)
        kept += int((q_count[fq + r0] * k_count[fk]).sum())
        qi, ki = (band == int(TileClass.PARTIAL)).nonzero(as_tuple=True)
        undecided_q.append(qi + r0)
        undecided_k.append(ki)
    qi = torch.cat(undecided_q) if undecided_q else torch.zeros(0, dtype=torch.int64)
    ki = torch.cat(undecided_k) if undecided_k else torch.zeros(0, dtype=torch.int64)
    if not static or not exact:
        return TileClassification(out, kept if static and qi.numel() == 0 else None, qi.numel())
    kept += _exact(mask, q_grid, kv_grid, layout, lengths, head, qi, ki, out)
    return TileClassification(out, kept, qi.numel())


def shift_invariant(mask: Expr) -> bool:
    """True when the mask depends on q and k only through q - k: every affine combination that
    involves q or k has coefficients c·q − c·k (causal, windows, bands, dilation residues, and
    any &, |, !, min, max, abs, //, % built on them). Then two whole 1-D tiles with the same
    offset q0 − k0 have identical contents, and one of them decides all."""
    deps: dict[int, bool] = {}
    inv: dict[int, bool] = {}
    lin: dict = {}

    def affine_ok(form) -> bool:
        coeffs = dict(form[0])
        cq, ck = coeffs.pop(Var("q"), 0), coeffs.pop(Var("k"), 0)
        return cq == -ck and all(inv[id(a)] for a, v in coeffs.items() if v)

    for n in walk(mask):
        dep = any(deps[id(c)] for c in n.children()) or isinstance(n, Coord) or \
            (isinstance(n, Var) and n.name in ("q", "k"))
        deps[id(n)] = dep
        if not dep:
            inv[id(n)] = True
        elif isinstance(n, (Var, Coord, Load, Route, Blocks)):
            inv[id(n)] = False
        elif isinstance(n, Binary) and n.op in COMPARE_OPS and n.a.dtype == INT:
            (ca, ka), (cb, kb) = linear_form(n.a, lin), linear_form(n.b, lin)
            coeffs = dict(ca)
            for atom, v in cb.items():
                coeffs[atom] = coeffs.get(atom, 0) - v
            inv[id(n)] = affine_ok((coeffs, ka - kb))
        elif n.dtype == INT and ((isinstance(n, Binary) and n.op in ("add", "sub", "mul"))
                                 or (isinstance(n, Unary) and n.op == "neg")):
            form = linear_form(n, lin)
            inv[id(n)] = affine_ok(form) if form[0].get(n) is None else \
                all(inv[id(c)] for c in n.children())
        else:
            inv[id(n)] = all(inv[id(c)] for c in n.children())
    return inv[id(mask)]


def _exact(mask, q_grid, kv_grid, layout, lengths, head, qi, ki, out) -> int:
    """Decide tiles (qi[t], ki[t]) exactly, writing their class into `out`; returns the number
    of kept pairs in them. For shift-invariant masks on 1-D tiles, whole tiles are grouped by
    their offset q0 − k0 and one tile per group is evaluated (a band's diagonal tiles are all
    alike), so the work is O(distinct offsets · tile area) instead of O(tiles · tile area)."""
    if qi.numel() == 0:
        return 0
    if len(q_grid.shape) == 1 and len(kv_grid.shape) == 1 and shift_invariant(mask):
        tq, tk = q_grid.tile[0], kv_grid.tile[0]
        whole = ((qi + 1) * tq <= q_grid.shape[0]) & ((ki + 1) * tk <= kv_grid.shape[0])
        if bool(whole.any()):
            wq, wk = qi[whole], ki[whole]
            offsets, group = torch.unique(wq * tq - wk * tk, return_inverse=True)
            first = torch.full((offsets.numel(),), wq.numel(), dtype=torch.int64)
            first.scatter_reduce_(0, group, torch.arange(wq.numel()), reduce="amin")
            cls, hits = _evaluate_tiles(mask, q_grid, kv_grid, layout, lengths, head,
                                        wq[first], wk[first])
            out[wq, wk] = cls[group]
            rest = ~whole
            cls, rest_hits = _evaluate_tiles(mask, q_grid, kv_grid, layout, lengths, head,
                                             qi[rest], ki[rest])
            out[qi[rest], ki[rest]] = cls
            return int(hits[group].sum()) + int(rest_hits.sum())
    cls, hits = _evaluate_tiles(mask, q_grid, kv_grid, layout, lengths, head, qi, ki)
    out[qi, ki] = cls
    return int(hits.sum())


def _evaluate_tiles(mask, q_grid, kv_grid, layout, lengths, head, qi, ki):
    """Exact classes (int8 [n]) and kept-pair counts (int64 [n]) of tiles (qi[t], ki[t])."""
    classes = torch.zeros(qi.numel(), dtype=torch.int8)
    hits_out = torch.zeros(qi.numel(), dtype=torch.int64)
    if qi.numel() == 0:
        return classes, hits_out
    q_tok = q_grid.token_index()
    k_tok = kv_grid.token_index()
    per = max(1, _EXACT_ELEMS // (q_grid.tile_size * kv_grid.tile_size))
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
        classes[c0:c0 + per] = cls.to(torch.int8)
        hits_out[c0:c0 + per] = hit.flatten(1).sum(1)
    return classes, hits_out
