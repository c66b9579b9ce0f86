"""Tile classes of whole data-dependent patterns, one top-level conjunct at a time.

A mask `t1 & t2 & ...` is classified per (batch, head, query tile, key tile) as the minimum of
its conjuncts' classes (EMPTY < PARTIAL < FULL): `route` / `blocks` from their selections
(`attncc.runtime.prepass`), `doc[b, q] == doc[b, k]` and token guards such as `doc[b, k] >= 0`
from per-tile id ranges, data-independent conjuncts from the static schedule. The minimum is
sound (a FULL tile is FULL in every conjunct) and exact whenever one conjunct decides a tile.
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch

from ..ir.dense import route_by_groups, route_groups
from ..ir.terms import conjuncts, document_input
from ..ir.nodes import INT, Binary, Blocks, Const, Expr, Load, Route, Var, free_vars, walk
from ..schedule.schedule import TileGrid
from .prepass import (EMPTY, FULL, PARTIAL, PrepassError, _block_gids, _intersect, block_select,
                      group_classes, route_select, static_classes)

__all__ = ["conjuncts", "document_input", "document_classes", "token_predicate",
           "token_range_classes", "static_expr", "is_static", "pattern_classes"]


def document_classes(doc: torch.Tensor, q_grid: TileGrid, kv_grid: TileGrid, *,
                     padding_matches: bool = True) -> torch.Tensor:
    """Tile classes of `doc[b, q] == doc[b, k]` from per-tile id ranges.

    doc int [B, L] (L ≥ both lengths) → int8 [B, 1, nQT, nKT]. Each tile keeps the range of
    its non-negative ids and the range of its negative ids (padding); a tile pair is EMPTY
    when neither range pair overlaps (no pair can match), FULL when both tiles hold one and the
    same id, PARTIAL otherwise. Exact for packed ids (non-decreasing, then -1 padding) on 1-D
    tiles, sound for any ids. `padding_matches=False` classifies the guarded form
    `doc[b, q] == doc[b, k] & doc[b, k] >= 0`: negative ids match nothing.
    """
    big = torch.iinfo(torch.int64).max

    def ranges(grid):
        slots = grid.token_index().to(doc.device)
        if grid.numel > doc.shape[1]:
            raise PrepassError(f"document ids cover {doc.shape[1]} tokens but {grid.numel} "
                               "are attended")
        vals = doc[:, slots.clamp(min=0)].to(torch.int64)             # [B, nT, S]
        real = (slots >= 0)[None]
        out = []
        for part in (real & (vals >= 0), real & (vals < 0), real):
            out.append(torch.where(part, vals, torch.full_like(vals, big)).amin(-1))
            out.append(torch.where(part, vals, torch.full_like(vals, -big)).amax(-1))
        return out

    q_r, k_r = ranges(q_grid), ranges(kv_grid)
    overlap = None
    for i in ((0, 2) if padding_matches else (0,)):
        qlo, qhi, klo, khi = q_r[i][:, :, None], q_r[i + 1][:, :, None], k_r[i][:, None], k_r[i + 1][:, None]
        hit = (qlo <= khi) & (klo <= qhi)
        overlap = hit if overlap is None else overlap | hit
    qlo, qhi, klo, khi = q_r[4], q_r[5], k_r[4], k_r[5]
    single = (qlo == qhi)[:, :, None] & (klo == khi)[:, None, :] & (qlo[:, :, None] == klo[:, None, :])
    if not padding_matches:
        single &= (qlo >= 0)[:, :, None]
    out = torch.where(overlap, PARTIAL, EMPTY).to(torch.int8)
    out[single] = FULL
    return out[:, None]


# ---- whole patterns -------------------------------------------------------------------------

_FLIP = {"lt": "gt", "le": "ge", "gt": "lt", "ge": "le", "eq": "eq", "ne": "ne"}


def token_predicate(e: Expr) -> Optional[tuple[str, str, str, int]]:
    """(input, side, op, constant) when `e` compares one token's integer input with a constant,
    e.g. the padding guard `doc[b, k] >= 0` (either operand order)."""
    if not (isinstance(e, Binary) and e.op in _FLIP):
        return None
    a, c, op = e.a, e.b, e.op
    if isinstance(a, Const) and isinstance(c, Load):
        a, c, op = c, a, _FLIP[op]
    if not (isinstance(a, Load) and isinstance(c, Const) and a.elem == INT and len(a.index) == 2):
        return None
    i0, i1 = a.index
    if not (isinstance(i0, Var) and i0.name == "b" and isinstance(i1, Var)
            and i1.name in ("q", "k")):
        return None
    return a.input, i1.name, op, int(c.value)


def token_range_classes(values: torch.Tensor, grid: TileGrid, op: str, c: int) -> torch.Tensor:
    """Tile classes of `values[b, token] <op> c` from each tile's value range.

    values int [B, L] (L ≥ grid.numel) → int8 [B, n_tiles]: FULL when every in-range token of
    the tile satisfies the comparison, EMPTY when none does, PARTIAL otherwise (exact for the
    ordering comparisons; `==`/`!=` are exact at the ends of the range, sound in between).
    """
    slots = grid.token_index().to(values.device)
    valid = slots >= 0
    v = values.to(torch.int64)[:, slots.clamp(min=0)]
    big = torch.iinfo(torch.int64).max
    lo = torch.where(valid, v, big).amin(-1)
    hi = torch.where(valid, v, -big).amax(-1)
    if op in ("lt", "le", "gt", "ge"):
        test = {"lt": lambda x: x < c, "le": lambda x: x <= c,
                "gt": lambda x: x > c, "ge": lambda x: x >= c}[op]
        t_lo, t_hi = test(lo), test(hi)
        full, empty = t_lo & t_hi, ~t_lo & ~t_hi
    else:
        single = (lo == c) & (hi == c)
        outside = (c < lo) | (c > hi)
        full, empty = (single, outside) if op == "eq" else (outside, single)
    out = torch.where(full, FULL, torch.where(empty, EMPTY, PARTIAL))
    return out.to(torch.int8)


def static_expr(parts: list[Expr]) -> Optional[Expr]:
    out = None
    for p in parts:
        out = p if out is None else Binary("and", out, p)
    return out


def pattern_classes(pattern, q: torch.Tensor, k: torch.Tensor, inputs: Mapping[str, torch.Tensor],
                    q_grid: TileGrid, kv_grid: TileGrid, static=None):
    from .clusters import cluster_classes, cluster_inputs
    """Tile classes of a whole (possibly data-dependent) pattern for one call.

    q [B, Hq, Lq, D], k [B, Hkv, Lkv, D], `inputs` the pattern's runtime tensors (already
    validated). Each top-level conjunct of the mask contributes a class tensor: `route` and
    `blocks` from their selections, `doc[b, q] == doc[b, k]` and token guards such as
    `doc[b, k] >= 0` from per-tile id ranges,
    data-independent conjuncts from `static` (a `Schedule` or int8 [H|1, nQT, nKT] of the
    conjunction of those terms) or, when absent, `static_classes`; any other conjunct counts
    as PARTIAL everywhere. Returns (classes int8 [B, Hq, nQT, nKT], selections) where
    selections maps each Route/Blocks node to (sel, q_gid, k_gid).
    """
    B, Hq, Lq, _ = q.shape
    Lkv = k.shape[2]
    dev = q.device
    layout = pattern.layout
    selections = {}
    for node in walk(pattern.mask):
        if isinstance(node, Route) and node not in selections and hasattr(layout, "q"):
            # Separate query and key grids: regions of the key grid (`ir.dense.route_groups`).
            (rq, nq), (rk, nk) = (route_groups(layout, s, node.region, t.shape[2], dev)
                                  for s, t in (("q", q), ("k", k)))
            selections[node] = (route_by_groups(q, k, rq, nq, rk, nk, node.topk), rq, rk)
        elif isinstance(node, Route) and node not in selections:
            shape = layout.shape if layout is not None else None
            selections[node] = route_select(q, k, node.region, node.topk, shape,
                                            q_region=node.q_region, causal=node.causal)
        elif isinstance(node, Blocks) and node not in selections:
            sel = block_select(inputs[node.input], node.top, node.threshold,
                               name=f"input '{node.input}'")
            selections[node] = (sel.to(dev), _block_gids(Lq, node.block, dev),
                                _block_gids(Lkv, node.block, dev))
    cls = torch.full((B, Hq, q_grid.n_tiles, kv_grid.n_tiles), FULL, dtype=torch.int8, device=dev)
    static_parts = []
    terms = conjuncts(pattern.mask)
    for term in terms:
        doc = document_input(term)
        if isinstance(term, (Route, Blocks)):
            sel, q_gid, k_gid = selections[term]
            cls = torch.minimum(cls, group_classes(sel, q_gid, k_gid, q_grid, kv_grid))
        elif doc is not None:
            guarded = any(token_predicate(t) in ((doc, "k", "ge", 0), (doc, "q", "ge", 0),
                                                  (doc, "k", "gt", -1), (doc, "q", "gt", -1))
                          for t in terms)
            cls = torch.minimum(cls, document_classes(inputs[doc].to(dev), q_grid, kv_grid,
                                                      padding_matches=not guarded))
        elif cluster_inputs(term) is not None:  # Routing Transformer ids (runtime/clusters.py)
            qn, kn = cluster_inputs(term)
            cls = torch.minimum(cls, cluster_classes(inputs[qn].to(dev), inputs[kn].to(dev),
                                                     q_grid, kv_grid))
        elif token_predicate(term) is not None:
            name, side, op, c = token_predicate(term)
            t = token_range_classes(inputs[name].to(dev), q_grid if side == "q" else kv_grid, op, c)
            cls = torch.minimum(cls, t[:, None, :, None] if side == "q" else t[:, None, None, :])
        elif not is_static(term):
            cls = torch.minimum(cls, torch.full_like(cls, PARTIAL))
        else:
            static_parts.append(term)
    if static is not None:
        cls = _intersect(cls, static)
    elif static_parts:
        expr = static_expr(static_parts)
        cls = torch.minimum(cls, static_classes(expr, layout, q_grid, kv_grid, Hq, Lq, Lkv, dev))
    return cls, selections


def is_static(term: Expr) -> bool:
    return "b" not in free_vars(term) and not any(
        isinstance(n, (Load, Route, Blocks)) for n in walk(term))
