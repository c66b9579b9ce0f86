"""Token ownership for context parallelism: which global token positions each rank holds.

A `Layout` assigns every position of a length-`L` sequence to one of `world` ranks. Each rank
keeps its positions in ascending global order (so a shard is `x.index_select(dim, owned[r])`
and shards of contiguous pieces stay contiguous). Balance choices:

    contiguous  rank r holds [r·L/W, (r+1)·L/W) (the first L mod W ranks one token more)
    headtail    the sequence cut into 2W near-equal chunks; rank r holds chunks r and 2W-1-r
                (zig-zag: evens causal work)
    document    per-document: contiguous pieces whose cut points split the causal work of
                the documents evenly (a token of an n-token document counts (n + 1) / 2),
                snapped to a document boundary when one is within L/(8W) tokens, at most
                2·⌈L/W⌉ tokens per rank; a document cut across ranks is then spread
                head-tail over them (each keeps its share, half from the document's head,
                half from its tail). Needs the document ids
    grid        a tiling of a grid layout: the world is factored into per-axis rank counts
                (the fewest tokens in the largest box, then the smallest total cut area)
                and each rank holds one box of the grid

All functions are pure and deterministic: every rank computes the same layout.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

BALANCES = ("contiguous", "headtail", "document", "grid")


@dataclass(frozen=True, eq=False)
class Layout:
    """Ownership of `length` positions by `world` ranks.

    kind    the balance choice that produced it (`detail`: its parameters, if any)
    owner   int64 [length]: the rank holding each position
    owned   per rank, int64 [n_r] of its global positions, ascending
    """
    kind: str
    length: int
    world: int
    owner: torch.Tensor
    owned: tuple[torch.Tensor, ...]
    detail: str = ""   # e.g. the per-axis rank counts of a grid tiling, "2×2×2"

    def sizes(self) -> list[int]:
        return [len(o) for o in self.owned]

    def ranges(self, rank: int) -> list[tuple[int, int]]:
        """The positions of `rank` as merged half-open ranges."""
        return to_ranges(self.owned[rank])

    def local_index(self, rank: int, positions: torch.Tensor) -> torch.Tensor:
        """Local (shard) indices on `rank` of global `positions` it owns."""
        return torch.searchsorted(self.owned[rank], positions)

    def describe(self) -> str:
        return f"{self.kind} over {self.world} ranks ({min(self.sizes())}..{max(self.sizes())} tokens each)"


def _from_owner(kind: str, owner: torch.Tensor, world: int, detail: str = "") -> Layout:
    owner = owner.to(torch.int64)
    order = torch.argsort(owner, stable=True)
    counts = torch.bincount(owner, minlength=world).tolist()
    owned = tuple(t.contiguous() for t in torch.split(order, counts))
    return Layout(kind, int(owner.shape[0]), world, owner, owned, detail)


def to_ranges(pos: torch.Tensor) -> list[tuple[int, int]]:
    """Sorted int64 positions → merged half-open ranges."""
    starts, ends = range_bounds(pos)
    return list(zip(starts.tolist(), ends.tolist()))


def range_bounds(pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted int64 positions → (starts, ends) of their maximal runs (half-open)."""
    if pos.numel() == 0:
        return pos.new_zeros(0), pos.new_zeros(0)
    brk = torch.nonzero(torch.diff(pos) != 1).flatten()
    starts = torch.cat([pos[:1], pos[brk + 1]])
    ends = torch.cat([pos[brk], pos[-1:]]) + 1
    return starts, ends


def even_sizes(n: int, parts: int) -> torch.Tensor:
    """Sizes of n items cut into `parts` near-equal pieces (the first n mod parts one larger)."""
    sizes = torch.full((parts,), n // parts, dtype=torch.int64)
    sizes[: n % parts] += 1
    return sizes


def contiguous(length: int, world: int) -> Layout:
    owner = torch.repeat_interleave(torch.arange(world), even_sizes(length, world))
    return _from_owner("contiguous", owner, world)


def _headtail_owner(n: int, world: int) -> torch.Tensor:
    chunk_rank = torch.cat([torch.arange(world), torch.arange(world).flip(0)])
    return torch.repeat_interleave(chunk_rank, even_sizes(n, 2 * world))


def headtail(length: int, world: int) -> Layout:
    return _from_owner("headtail", _headtail_owner(length, world), world)


def document_segments(doc: torch.Tensor) -> torch.Tensor:
    """Start positions of the documents of `doc` int [B, L] (union of every batch row's
    boundaries, so one permutation serves the whole batch), ending with L."""
    d = doc.detach().to("cpu", torch.int64)
    change = (d[:, 1:] != d[:, :-1]).any(0)
    return torch.cat([torch.zeros(1, dtype=torch.int64), torch.nonzero(change).flatten() + 1,
                      torch.tensor([d.shape[1]])])


def document(length: int, world: int, doc: torch.Tensor) -> Layout:
    """Per-document balance (see the module docstring); `doc` int [B, ≥length]."""
    bounds = document_segments(doc[:, :length])
    pos = torch.arange(length)
    seg = torch.searchsorted(bounds, pos, right=True) - 1
    n_doc = (bounds[1:] - bounds[:-1]).to(torch.float64)
    # a token's causal work once its document is spread head-tail: (n + 1) / 2 on average
    cum = torch.cumsum((n_doc[seg] + 1) / 2, 0)
    total = float(cum[-1]) if length else 0.0
    cap = 2 * -(-length // world)
    tol = max(1, length // (8 * world))
    cuts = [0]
    for r in range(1, world):
        c = int(torch.searchsorted(cum, total * r / world)) + 1
        near = bounds[(bounds - c).abs().argmin()].item()
        if abs(near - c) <= tol:
            c = near                                  # snap to a document boundary
        rest = world - r                              # ranks still to fill
        lo = max(cuts[-1] + (1 if length - cuts[-1] > rest else 0), length - rest * cap)
        hi = min(cuts[-1] + cap, length - (rest if length - cuts[-1] > rest else 0))
        cuts.append(min(max(c, lo), hi))
    cuts.append(length)
    sizes = torch.tensor(cuts[1:]) - torch.tensor(cuts[:-1])
    owner = torch.repeat_interleave(torch.arange(world), sizes)
    # documents cut across ranks: each of those ranks keeps its share, half from the head
    # of the document and half from its tail (head-tail inside the document)
    for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        if b > a and owner[a] != owner[b - 1]:
            ranks, share = torch.unique_consecutive(owner[a:b], return_counts=True)
            head = share // 2
            owner[a:b] = torch.cat([torch.repeat_interleave(ranks, head),
                                    torch.repeat_interleave(ranks.flip(0), (share - head).flip(0))])
    return _from_owner("document", owner, world)


def _factorizations(world: int, nd: int):
    if nd == 1:
        yield (world,)
        return
    for f in range(1, world + 1):
        if world % f == 0:
            for rest in _factorizations(world // f, nd - 1):
                yield (f,) + rest


def grid_factor_options(shape: Sequence[int], world: int, limit: int = 3) -> list[tuple[int, ...]]:
    """Per-axis rank counts (product = world, each ≤ its axis) with the fewest tokens in the
    largest box, best first by total cut area (the halo a neighbourhood exchanges, up to
    per-axis kernel sizes and tile alignment, which the plan then measures); at most `limit`."""
    opts = []
    total = math.prod(shape)
    for f in _factorizations(world, len(shape)):
        if any(p > n for p, n in zip(f, shape)):
            continue
        biggest = math.prod(-(-n // p) for n, p in zip(shape, f))
        cuts = sum((p - 1) * total // n for n, p in zip(shape, f))
        opts.append((biggest, cuts, f))
    if not opts:
        return []
    best = min(o[0] for o in opts)
    return [o[2] for o in sorted(o for o in opts if o[0] == best)][:limit]


def grid_factors(shape: Sequence[int], world: int) -> Optional[tuple[int, ...]]:
    """The first of `grid_factor_options`, or None when no factorization fits."""
    opts = grid_factor_options(shape, world, 1)
    return opts[0] if opts else None


def grid(shape: Sequence[int], world: int,
         factors: Optional[tuple[int, ...]] = None) -> Optional[Layout]:
    """Box tiling of a row-major grid of `shape` with `factors` ranks per axis (default
    `grid_factors`); None when the world does not factor onto it."""
    f = factors if factors is not None else grid_factors(tuple(shape), world)
    if f is None:
        return None
    axis_owner = []
    for n, p in zip(shape, f):
        axis_owner.append(torch.repeat_interleave(torch.arange(p), even_sizes(n, p)))
    owner = torch.zeros(tuple(shape), dtype=torch.int64)
    for i, (ao, p) in enumerate(zip(axis_owner, f)):
        view = [1] * len(shape)
        view[i] = -1
        owner = owner * p + ao.reshape(view)
    return _from_owner("grid", owner.reshape(-1), world, "×".join(map(str, f)))


def make_layout(kind: str, length: int, world: int, *, grid_shape=None,
                doc: Optional[torch.Tensor] = None) -> Optional[Layout]:
    """The layout of balance `kind`, or None where it does not apply (grid without a grid
    layout or a world that does not factor onto it; document without ids)."""
    if kind == "contiguous":
        return contiguous(length, world)
    if kind == "headtail":
        return headtail(length, world)
    if kind == "grid":
        if grid_shape is None or len(grid_shape) < 2 or math.prod(grid_shape) != length:
            return None
        return grid(grid_shape, world)
    if kind == "document":
        return None if doc is None else document(length, world, doc)
    raise ValueError(f"unknown balance {kind!r}; expected 'auto' or one of {', '.join(BALANCES)}")


__all__ = ["Layout", "BALANCES", "make_layout", "grid_factor_options", "to_ranges", "range_bounds", "even_sizes",
           "contiguous", "headtail", "document", "grid", "grid_factors", "document_segments"]
