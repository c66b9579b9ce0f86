"""The transposed schedule: per key tile, the query tiles that visit it (for dK/dV kernels).

A static `Schedule` keeps each head class's transposed CSR (`HeadClass.full_t` /
`partial_t`, built once with the schedule, never through a dense tile matrix);
`transposed_rows` concatenates them into the launch layout of the dK/dV kernel, row
`class · n_kv_tiles + n`. Data-dependent patterns get their per-(batch, head) transposed
lists from the call's tile classes (`transpose_classes`). `max_visits` bounds the key tiles
one query-tile row visits (the scratch size of table gradients).

Closed form: `transposed_schedule` schedules the *transposed pattern* (q ↔ k, Q_LEN ↔ KV_LEN,
query ↔ key coordinates; `transposed_pattern`) with the tile sizes swapped. Its query tiles
are the key tiles of the original, so where it has closed-form bounds (band patterns) they
are the per-key-tile query-tile ranges of the original: the dK/dV kernel loops over them
without index arrays. Both classifications are sound, so tiles may differ in class only
where one analysis is more precise (a PARTIAL tile instead of an EMPTY or FULL one).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from ..ir.nodes import Const, Coord, Var, transform
from .schedule import CSR, Schedule, TileClass

__all__ = ["transposed_rows", "forward_rows", "transpose_classes", "max_visits",
           "transposed_pattern", "transposed_schedule"]

_SWAP = {"q": "k", "k": "q", "Q_LEN": "KV_LEN", "KV_LEN": "Q_LEN"}


def transposed_pattern(pattern):
    """`pattern` with the roles of queries and keys exchanged in its mask (q ↔ k,
    Q_LEN ↔ KV_LEN, q.<axis> ↔ k.<axis>); score and output scale dropped. Its mask at
    (q=j, k=i) with lengths (Lkv, Lq) equals the original's at (q=i, k=j)."""
    def swap(n):
        if isinstance(n, Var) and n.name in _SWAP:
            return Var(_SWAP[n.name])
        if isinstance(n, Coord):
            return Coord("k" if n.side == "q" else "q", n.axis, n.name)
        return None
    mask = transform(pattern.mask, swap) if not isinstance(pattern.mask, Const) else pattern.mask
    return dataclasses.replace(pattern, mask=mask, score=None, output_scale=None)


def transposed_schedule(schedule: Schedule, options) -> Optional[Schedule]:
    """The schedule of `transposed_pattern(schedule.pattern)` for (kv_len, q_len) with the
    tile sizes swapped, when both schedules use 1-D tiles (None otherwise): its bounds, where
    it has them, are closed-form query-tile ranges per key tile of `schedule`."""
    from .build import build_schedule
    qg, kg = schedule.q_grid, schedule.kv_grid
    if len(qg.tile) != 1 or len(kg.tile) != 1 or schedule.runtime:
        return None
    opts = options.replace(block_m=kg.tile[0], block_n=qg.tile[0], q_tile=None, kv_tile=None,
                           tile_1d=True)
    out = build_schedule(transposed_pattern(schedule.pattern), schedule.kv_len, schedule.q_len,
                         schedule.heads, options=opts)
    if out.q_grid.tile != kg.tile or out.kv_grid.tile != qg.tile:
        return None
    return out


def _concat(csrs: list[CSR], n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    offsets, indices, base = [torch.zeros(1, dtype=torch.int64)], [], 0
    for csr in csrs:
        if csr.n_rows != n_rows:
            raise ValueError(f"head class lists have {csr.n_rows} rows, expected {n_rows}")
        offsets.append(csr.offsets[1:].to(torch.int64) + base)
        indices.append(csr.indices.to(torch.int64))
        base += csr.nnz
    if base >= 2 ** 31:
        raise ValueError("schedule has more than 2**31 tile entries")
    idx = torch.cat(indices) if indices else torch.zeros(0, dtype=torch.int64)
    if idx.numel() == 0:
        idx = torch.zeros(1, dtype=torch.int64)
    return torch.cat(offsets).to(torch.int32), idx.to(torch.int32)


def transposed_rows(schedule: Schedule) -> dict:
    """int32 CPU tensors of the transposed lists of every head class, concatenated:
    full_offsets / partial_offsets [n_classes · n_kv_tiles + 1] (row class · n_kv_tiles + n
    lists the query tiles visiting key tile n, ascending), full_indices / partial_indices,
    head_class [heads]."""
    out = {}
    for kind in ("full", "partial"):
        off, idx = _concat([getattr(c, kind + "_t") for c in schedule.classes],
                           schedule.n_kv_tiles)
        out[f"{kind}_offsets"], out[f"{kind}_indices"] = off, idx
    out["head_class"] = torch.tensor(schedule.head_class, dtype=torch.int32)
    return out


def forward_rows(schedule: Schedule) -> dict:
    """Like `transposed_rows` for the forward (per query tile) lists."""
    out = {}
    for kind in ("full", "partial"):
        off, idx = _concat([getattr(c, kind) for c in schedule.classes], schedule.n_q_tiles)
        out[f"{kind}_offsets"], out[f"{kind}_indices"] = off, idx
    out["head_class"] = torch.tensor(schedule.head_class, dtype=torch.int32)
    return out


def transpose_classes(classes: torch.Tensor) -> torch.Tensor:
    """int8 tile classes [B, H, nQT, nKT] → [B, H, nKT, nQT] (contiguous), whose CSR rows
    (`prepass_kernel.program_lists`) are the per-(batch, head, key tile) query-tile lists."""
    return classes.transpose(-1, -2).contiguous()


def max_visits(schedule: Schedule = None, classes: torch.Tensor = None) -> int:
    """The most key tiles (FULL + PARTIAL) any query-tile row visits: of a static schedule
    (over its head classes) or of call classes int8 [B, H, nQT, nKT]."""
    if classes is not None:
        if classes.numel() == 0:
            return 0
        return int((classes != int(TileClass.EMPTY)).sum(-1).max())
    best = 0
    for c in schedule.classes:
        counts = c.full.counts.to(torch.int64) + c.partial.counts.to(torch.int64)
        if counts.numel():
            best = max(best, int(counts.max()))
    return best
