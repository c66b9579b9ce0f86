"""Tile classes of cluster-equality masks (Routing Transformer): `qc[b, h, q] == kc[b, h, k]`
with per-head cluster ids of queries and keys as runtime inputs.

Each tile keeps the *set* of cluster ids of its tokens (a 63-bit set when every id lies in
[0, 63), else the id range): a (query tile, key tile) pair is EMPTY when the sets are disjoint
(no pair can match), FULL when both tiles hold one and the same id, PARTIAL otherwise. Sound
for any ids, and exact with bit sets: after sorting tokens by cluster (or with clustered
inputs) whole tiles are skipped, as for packed documents (`runtime.conjuncts`).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..ir.nodes import Binary, Expr, Load, Var
from ..schedule.schedule import TileGrid
from .prepass import EMPTY, FULL, PARTIAL

__all__ = ["cluster_inputs", "cluster_classes"]

_BITS = 63


def cluster_inputs(e: Expr) -> Optional[tuple[str, str]]:
    """(query-side input, key-side input) when `e` is `qc[b, h, q] == kc[b, h, k]` (either
    operand order; the two names may be equal)."""
    if not (isinstance(e, Binary) and e.op == "eq" and isinstance(e.a, Load)
            and isinstance(e.b, Load)):
        return None
    sides = {}
    for ld in (e.a, e.b):
        if len(ld.index) != 3:
            return None
        i0, i1, i2 = ld.index
        if not (isinstance(i0, Var) and i0.name == "b" and isinstance(i1, Var) and i1.name == "h"
                and isinstance(i2, Var) and i2.name in ("q", "k")):
            return None
        sides[i2.name] = ld.input
    return (sides["q"], sides["k"]) if sorted(sides) == ["k", "q"] else None


def _tile_sets(ids: torch.Tensor, grid: TileGrid, use_bits: bool):
    """Per (b, h, tile): (bit set or None, lo, hi) of the ids of its real tokens."""
    slots = grid.token_index().to(ids.device)
    if grid.numel > ids.shape[-1]:
        raise ValueError(f"cluster ids cover {ids.shape[-1]} tokens but {grid.numel} are attended")
    vals = ids[:, :, slots.clamp(min=0)].to(torch.int64)           # [B, H, nT, S]
    real = (slots >= 0)[None, None]
    big = torch.iinfo(torch.int64).max
    lo = torch.where(real, vals, big).amin(-1)
    hi = torch.where(real, vals, -big).amax(-1)
    bits = None
    if use_bits:
        one = torch.ones((), dtype=torch.int64, device=ids.device)
        b = torch.where(real, torch.bitwise_left_shift(one, vals.clamp(0, _BITS - 1)),
                        torch.zeros((), dtype=torch.int64, device=ids.device))
        bits = b[..., 0]
        for s in range(1, b.shape[-1]):
            bits = bits | b[..., s]
    return bits, lo, hi


def cluster_classes(qc: torch.Tensor, kc: torch.Tensor, q_grid: TileGrid,
                    kv_grid: TileGrid) -> torch.Tensor:
    """int8 [B, H, nQT, nKT] tile classes of `qc[b, h, q] == kc[b, h, k]` (qc int [B, H, Lq],
    kc int [B, H, Lkv])."""
    use_bits = bool(((qc >= 0) & (qc < _BITS)).all()) and bool(((kc >= 0) & (kc < _BITS)).all())
    qb, qlo, qhi = _tile_sets(qc, q_grid, use_bits)
    kb, klo, khi = _tile_sets(kc, kv_grid, use_bits)
    if use_bits:
        overlap = (qb[..., :, None] & kb[..., None, :]) != 0
    else:
        overlap = (qlo[..., :, None] <= khi[..., None, :]) & (klo[..., None, :] <= qhi[..., :, None])
    single = (qlo == qhi)[..., :, None] & (klo == khi)[..., None, :] \
        & (qlo[..., :, None] == klo[..., None, :])
    out = torch.where(overlap, PARTIAL, EMPTY).to(torch.int8)
    out[single] = FULL
    return out
