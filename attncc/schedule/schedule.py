"""Schedule data structures: which key tiles each query tile visits, and how.

A *tile* groups tokens of one side. On 1-D patterns a tile is `BLOCK` consecutive tokens; on
grid layouts it may be a box of the grid (e.g. 8×8 tokens of a 2-D map), whose tokens are not
contiguous in memory and are loaded by computed row offsets.

For each query tile, every key tile is one of
    EMPTY    never visited (every pair masked out)
    FULL     visited without mask code (every pair kept)
    PARTIAL  visited with the mask predicate evaluated per element

Heads whose masks are identical share one `HeadClass` (one set of lists). Each class stores
the visited tiles as CSR (per query-tile counts + int32 key-tile indices), separately for
FULL and PARTIAL, plus the transposed form (per key tile, the query tiles that visit it) that
a backward pass walks, and, where the pattern is band-like, `bounds`: closed-form loop bounds
as IR expressions of the query-tile index, so a kernel needs no index arrays at all.

Runtime selectors (`route`, `blocks`) cannot be decided statically: a schedule of a pattern
that uses them lists, in `runtime`, the selector kinds whose per-(batch, head, query tile)
key-tile lists a device pre-pass produces and intersects with the static lists here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

# TileClass and TileGrid are produced by tile classification (a pass); re-exported here.
from ..passes.tilegrid import TileClass, TileGrid  # noqa: F401


@dataclass(frozen=True, eq=False)
class CSR:
    """Compressed rows: row r holds `indices[offsets[r]:offsets[r+1]]` (int32, ascending)."""
    offsets: torch.Tensor  # int32 [n_rows + 1]
    indices: torch.Tensor  # int32 [nnz]

    @property
    def n_rows(self) -> int:
        return self.offsets.numel() - 1

    @property
    def nnz(self) -> int:
        return self.indices.numel()

    @property
    def counts(self) -> torch.Tensor:
        """int32 [n_rows]"""
        return (self.offsets[1:] - self.offsets[:-1]).to(torch.int32)

    def row(self, r: int) -> list[int]:
        return self.indices[int(self.offsets[r]):int(self.offsets[r + 1])].tolist()

    @staticmethod
    def from_rows(rows: list[list[int]]) -> "CSR":
        counts = torch.tensor([len(r) for r in rows], dtype=torch.int64)
        offsets = torch.zeros(len(rows) + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(counts, 0)
        flat = [i for r in rows for i in r]
        return CSR(offsets.to(torch.int32), torch.tensor(flat, dtype=torch.int32))

    @staticmethod
    def from_dense(matrix: torch.Tensor) -> "CSR":
        """From a bool [n_rows, n_cols] tile matrix."""
        counts = matrix.sum(1)
        offsets = torch.zeros(matrix.shape[0] + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(counts, 0)
        indices = matrix.nonzero()[:, 1]
        return CSR(offsets.to(torch.int32), indices.to(torch.int32))

    def transpose(self, n_cols: int) -> "CSR":
        rows = torch.repeat_interleave(torch.arange(self.n_rows), self.counts.to(torch.int64))
        cols = self.indices.to(torch.int64)
        order = torch.argsort(cols * max(self.n_rows, 1) + rows, stable=True)
        counts = torch.bincount(cols, minlength=n_cols)
        offsets = torch.zeros(n_cols + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(counts, 0)
        return CSR(offsets.to(torch.int32), rows[order].to(torch.int32))

    def to_dense(self, n_cols: int) -> torch.Tensor:
        """bool [n_rows, n_cols]"""
        out = torch.zeros(self.n_rows, n_cols, dtype=torch.bool)
        rows = torch.repeat_interleave(torch.arange(self.n_rows), self.counts.to(torch.int64))
        out[rows, self.indices.to(torch.int64)] = True
        return out


@dataclass(frozen=True, eq=False)
class HeadClass:
    """The tile lists shared by `heads` (all of which have the same mask)."""
    heads: tuple[int, ...]
    full: CSR          # by query tile
    partial: CSR       # by query tile
    full_t: CSR        # by key tile (transposed), for the backward pass
    partial_t: CSR
    bounds: Optional[Any] = None  # closed-form loop bounds (attncc.schedule.closed_form), if any

    def classes(self, n_kv_tiles: int) -> torch.Tensor:
        """int8 [n_q_tiles, n_kv_tiles] of TileClass values."""
        out = torch.zeros(self.full.n_rows, n_kv_tiles, dtype=torch.int8)
        out[self.partial.to_dense(n_kv_tiles)] = int(TileClass.PARTIAL)
        out[self.full.to_dense(n_kv_tiles)] = int(TileClass.FULL)
        return out


@dataclass(frozen=True, eq=False)
class Schedule:
    """A pattern's block-sparse schedule for one (q_len, kv_len, heads) shape.

    q_grid / kv_grid   tilings of the query and key sides
    classes            head classes; `head_class[h]` is the class index of head h
    runtime            selector kinds ("route", "blocks") decided by a runtime pre-pass,
                       intersected with the static lists (empty for static patterns)
    stats              analysis statistics (e.g. tiles decided by exact fallback)
    """
    pattern: Any  # attncc.ir.pattern.Pattern
    q_len: int
    kv_len: int
    heads: int
    q_grid: TileGrid
    kv_grid: TileGrid
    classes: tuple[HeadClass, ...]
    head_class: tuple[int, ...]
    runtime: tuple[str, ...] = ()
    stats: dict = field(default_factory=dict)

    @property
    def n_q_tiles(self) -> int:
        return self.q_grid.n_tiles

    @property
    def n_kv_tiles(self) -> int:
        return self.kv_grid.n_tiles

    def for_head(self, h: int) -> HeadClass:
        return self.classes[self.head_class[h]]

    # ---- inspection ---------------------------------------------------------------------
    def tile_matrix(self, head: int = 0) -> torch.Tensor:
        """int8 [n_q_tiles, n_kv_tiles] of TileClass values for query head `head`."""
        return self.for_head(head).classes(self.n_kv_tiles)

    def density(self) -> Optional[float]:
        """Kept (query, key) pairs / all pairs over all heads (exact); None when the mask
        depends on runtime data."""
        kept = self.stats.get("kept_pairs")
        total = self.heads * self.q_len * self.kv_len
        return None if kept is None or not total else kept / total

    def efficiency(self) -> Optional[float]:
        """Kept pairs / pairs computed in visited tiles (1.0 = no wasted work); None when the
        mask depends on runtime data."""
        return self.stats.get("efficiency")

    def to_block_mask(self, **kwargs):
        """FlexAttention `BlockMask` of this schedule (see `attncc.schedule.blockmask`)."""
        from .blockmask import to_block_mask
        return to_block_mask(self, **kwargs)

    def __str__(self) -> str:
        from .draw import draw_text
        return draw_text(self)
