"""Tiles of one side and their classes: `TileGrid` (how a side's tokens are cut into tiles)
and `TileClass` (EMPTY / PARTIAL / FULL). They live below the schedule stage because tile
classification (`passes.tiles`) produces them; `attncc.schedule.schedule` re-exports both.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum

import torch


class TileClass(IntEnum):
    EMPTY = 0
    PARTIAL = 1
    FULL = 2


@dataclass(frozen=True)
class TileGrid:
    """Tiling of one side. `shape` is the token grid (`(L,)` for 1-D, the layout's axis sizes
    for multi-dimensional tiles); `tile` the tile extent per axis (same rank as `shape`).
    Tiles are numbered row-major over the tile grid; tokens inside a tile row-major too.
    Border tiles may hang over the end of an axis (those token slots are padding)."""
    shape: tuple[int, ...]
    tile: tuple[int, ...]

    def __post_init__(self):
        if len(self.shape) != len(self.tile) or not self.shape:
            raise ValueError(f"tile {self.tile} does not match grid {self.shape}")
        if any(t < 1 for t in self.tile) or any(s < 1 for s in self.shape):
            raise ValueError(f"bad tiling {self.tile} of {self.shape}")

    @property
    def counts(self) -> tuple[int, ...]:
        """Number of tiles along each axis."""
        return tuple(-(-s // t) for s, t in zip(self.shape, self.tile))

    @property
    def n_tiles(self) -> int:
        return math.prod(self.counts)

    @property
    def tile_size(self) -> int:
        """Token slots per tile (padding included)."""
        return math.prod(self.tile)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def token_index(self) -> torch.Tensor:
        """`int64 [n_tiles, tile_size]`: the flat (row-major) token index of every slot of every
        tile, -1 for padding slots beyond the grid."""
        nd = len(self.shape)
        tcoord = torch.stack(torch.meshgrid(*[torch.arange(c) for c in self.counts], indexing="ij"),
                             -1).reshape(-1, nd)                       # [n_tiles, nd]
        ocoord = torch.stack(torch.meshgrid(*[torch.arange(t) for t in self.tile], indexing="ij"),
                             -1).reshape(-1, nd)                       # [tile_size, nd]
        coord = tcoord[:, None, :] * torch.tensor(self.tile) + ocoord[None, :, :]
        inside = (coord < torch.tensor(self.shape)).all(-1)
        strides = torch.tensor([math.prod(self.shape[i + 1:]) for i in range(nd)])
        flat = (coord * strides).sum(-1)
        return torch.where(inside, flat, torch.full_like(flat, -1))

    @property
    def label(self) -> str:
        """The tile extents, e.g. "8×8" (schedule statistics)."""
        return "×".join(map(str, self.tile))

    def __str__(self) -> str:
        return "×".join(map(str, self.tile)) + " tiles over " + "×".join(map(str, self.shape))


@dataclass(frozen=True)
class SegmentedGrid(TileGrid):
    """Tiling of one side of a segmented layout (`attncc.ir.segmented`): `parts[p]` tiles the
    `parts[p].numel` tokens from flat index `starts[p]` on (1-D tiles for plain-token runs,
    boxes or 1-D tiles for a grid), so every tile lies in one part. Tiles are numbered part
    by part (`tile_offsets`), each part's tiles row-major as in a `TileGrid`; every part has
    the same number of token slots per tile.

    `shape` / `tile` / `counts` are the concatenations of the parts' (so `zip(shape, tile)`
    walks every part's axes: a tile hangs over an axis end iff some `shape % tile`)."""
    parts: tuple[TileGrid, ...] = ()
    starts: tuple[int, ...] = ()

    @staticmethod
    def of(parts, starts) -> "SegmentedGrid":
        parts, starts = tuple(parts), tuple(starts)
        shape = tuple(s for p in parts for s in p.shape)
        tile = tuple(t for p in parts for t in p.tile)
        return SegmentedGrid(shape, tile, parts, starts)

    def __post_init__(self):
        super().__post_init__()
        if len(self.parts) < 2 or len(self.starts) != len(self.parts):
            raise ValueError("a segmented tiling needs two or more parts, each with a start")
        if len({p.tile_size for p in self.parts}) != 1:
            raise ValueError(f"parts of a segmented tiling differ in tile size: "
                             f"{[p.tile_size for p in self.parts]}")
        end = 0
        for p, s in zip(self.parts, self.starts):
            if s != end:
                raise ValueError(f"part at {s} does not follow the previous part (ends at {end})")
            end = s + p.numel

    @property
    def tile_offsets(self) -> tuple[int, ...]:
        """First tile of each part, plus the total (len(parts) + 1 entries)."""
        out = [0]
        for p in self.parts:
            out.append(out[-1] + p.n_tiles)
        return tuple(out)

    @property
    def counts(self) -> tuple[int, ...]:
        return tuple(c for p in self.parts for c in p.counts)

    @property
    def n_tiles(self) -> int:
        return sum(p.n_tiles for p in self.parts)

    @property
    def tile_size(self) -> int:
        return self.parts[0].tile_size

    @property
    def numel(self) -> int:
        return sum(p.numel for p in self.parts)

    def token_index(self) -> torch.Tensor:
        """`int64 [n_tiles, tile_size]`: flat token index of every slot, -1 for padding."""
        out = []
        for p, s in zip(self.parts, self.starts):
            t = p.token_index()
            out.append(torch.where(t >= 0, t + s, t))
        return torch.cat(out)

    @property
    def label(self) -> str:
        """The parts' tile extents in token order, e.g. "64 + 1×8×8"."""
        return " + ".join(p.label for p in self.parts)

    def __str__(self) -> str:
        return " + ".join(f"[{s}:{s + p.numel}] {p}" for p, s in zip(self.parts, self.starts))
