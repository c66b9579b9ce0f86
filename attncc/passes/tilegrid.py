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

    def __str__(self) -> str:
        return "×".join(map(str, self.tile)) + " tiles over " + "×".join(map(str, self.shape))
