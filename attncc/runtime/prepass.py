"""Runtime pre-pass for data-dependent patterns: per-(batch, head, query tile) key-tile lists.

A pattern whose mask uses `route(...)`, `blocks(...)` or a document-id equality
`doc[b, q] == doc[b, k]` cannot be scheduled from shapes alone. This module builds that part
of the schedule at call time, on the tensors' device, with a fixed number of batched torch ops
(no loop over heads, no host round trip per head and no tensor of size Lq·Lkv):

1. *Selection.* `route_select` pools q and k per region and keeps the top-k key regions of
   every query region; `block_select` keeps the top fraction / above-threshold key blocks of a
   score tensor. Both give a bool selection `[B, H, n_q_groups, n_k_groups]` over token groups
   (regions or blocks) plus the group id of every query and key token.
2. *Tile classes.* A query tile and a key tile each cover a set of groups (a tile may span
   several regions; the union is taken). The tile pair is visited iff some pair of their
   groups is kept, and the selector keeps every pair of it iff all pairs of their groups are
   kept (reductions over each tile's short group list). Padding slots of border tiles belong
   to no group. The result is an int8 `TileClass` tensor `[B, H, nQT, nKT]` (EMPTY 0,
   PARTIAL 1, FULL 2), i.e. O(tiles) memory.
3. *Intersection.* The mask is split into its top-level `&` conjuncts; each gets a class
   tensor and the pattern's class is their element-wise minimum: EMPTY if any conjunct is
   EMPTY, FULL only if every conjunct is FULL (in particular a tile is FULL only if the static
   class is FULL and the selector keeps every pair). A selector nested under `|` or `!` is
   treated as unknown (PARTIAL wherever the other conjuncts allow), which is always sound.
   (`attncc.runtime.conjuncts.pattern_classes`; document ids and token guards are classified
   there from per-tile id ranges.)
4. *Lists.* `lists_from_classes` turns the class tensor into padded, ascending int32 index
   tensors `[B, H, nQT, max_count]` plus int32 counts `[B, H, nQT]`, separately for FULL and
   PARTIAL tiles (entries past a row's count are 0).

`attncc.runtime.blocksparse` runs these lists in torch (the CPU path);
`attncc.runtime.prepass_kernel` feeds them to the generated Triton kernels (one CSR row per
(batch, head, query tile)).
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import torch

from ..ir.dense import Evaluator, select_blocks
from ..ir.inputs import InputError
from ..ir.nodes import Expr, free_vars
from ..schedule.schedule import TileClass, TileGrid

__all__ = ["TileLists", "route_select", "block_select", "route_lists", "block_lists",
           "group_classes", "lists_from_classes", "static_classes", "head_weights",
           "PrepassStats", "PrepassError"]

EMPTY, PARTIAL, FULL = int(TileClass.EMPTY), int(TileClass.PARTIAL), int(TileClass.FULL)
# Elements of one gathered score slab [B, H, tile rows, keys] in the CPU path.
_SLAB_ELEMS = 1 << 21


class PrepassError(InputError):
    """A runtime input of a data-dependent pattern is malformed (wrong shape, NaN scores...)."""


# ---- tile lists -----------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class TileLists:
    """Key-tile lists per (batch, head, query tile), FULL and PARTIAL kept apart.

    full            int32 [B, H, nQT, max_full]     ascending key-tile indices (0-padded)
    full_counts     int32 [B, H, nQT]               valid entries of each `full` row
    partial         int32 [B, H, nQT, max_partial]
    partial_counts  int32 [B, H, nQT]
    n_kv_tiles      number of key tiles
    A row's FULL and PARTIAL tiles are disjoint; tiles in neither list are never visited.
    """
    full: torch.Tensor
    full_counts: torch.Tensor
    partial: torch.Tensor
    partial_counts: torch.Tensor
    n_kv_tiles: int

    @property
    def shape(self) -> tuple[int, int, int]:
        """(B, H, nQT)"""
        return tuple(self.full_counts.shape)

    def classes(self) -> torch.Tensor:
        """int8 [B, H, nQT, nKT] of TileClass values (the inverse of `lists_from_classes`)."""
        out = torch.zeros(*self.shape, self.n_kv_tiles + 1, dtype=torch.int8,
                          device=self.full.device)
        for idx, cnt, val in ((self.partial, self.partial_counts, PARTIAL),
                              (self.full, self.full_counts, FULL)):
            pos = torch.arange(idx.shape[-1], device=idx.device)
            # Invalid entries are written to the spare column nKT and dropped.
            tgt = torch.where(pos < cnt[..., None].long(), idx.long(),
                              torch.full_like(idx, self.n_kv_tiles, dtype=torch.long))
            out.scatter_(-1, tgt, val)
        return out[..., :self.n_kv_tiles]

    def visited(self) -> int:
        """Total number of visited (batch, head, query tile, key tile) quadruples."""
        return int(self.full_counts.sum()) + int(self.partial_counts.sum())


def lists_from_classes(classes: torch.Tensor) -> TileLists:
    """int8 TileClass tensor [B, H, nQT, nKT] → `TileLists` (one host sync for the widths)."""
    nkt = classes.shape[-1]
    parts = []
    for val in (FULL, PARTIAL):
        m = classes == val
        counts = m.sum(-1, dtype=torch.int32)
        width = int(counts.max()) if counts.numel() else 0
        # Stable sort puts the selected tiles first, in ascending order.
        order = torch.sort((~m).to(torch.int8), dim=-1, stable=True).indices[..., :width]
        pos = torch.arange(width, device=classes.device)
        idx = torch.where(pos < counts[..., None], order, torch.zeros_like(order))
        parts += [idx.to(torch.int32), counts]
    return TileLists(parts[0], parts[1], parts[2], parts[3], nkt)


# ---- token groups and tile membership -------------------------------------------------------

def _as_grid(tile, shape: tuple[int, ...], label: str) -> TileGrid:
    if isinstance(tile, TileGrid):
        if tile.numel != math.prod(shape):
            raise PrepassError(f"{label} {tile} does not cover {math.prod(shape)} tokens")
        return tile
    if isinstance(tile, int) and not isinstance(tile, bool):
        return TileGrid((math.prod(shape),), (tile,)) if len(shape) > 1 else TileGrid(shape, (tile,))
    tile = tuple(tile)
    if len(tile) != len(shape):
        raise PrepassError(f"{label} {tile} does not match the token grid {shape}")
    return TileGrid(tuple(shape), tile)


def _tile_groups(grid: TileGrid, gid: torch.Tensor, n_groups: int) -> torch.Tensor:
    """int64 [n_tiles, m]: the distinct groups of each tile's tokens, ascending, padded with
    `n_groups` (m = the largest number of groups in one tile)."""
    slots = grid.token_index().to(gid.device)
    g = torch.where(slots >= 0, gid[slots.clamp(min=0)], torch.full_like(slots, n_groups))
    g = g.sort(-1).values
    dup = torch.zeros_like(g, dtype=torch.bool)
    dup[:, 1:] = g[:, 1:] == g[:, :-1]
    g = torch.where(dup, torch.full_like(g, n_groups), g).sort(-1).values
    m = int((g < n_groups).sum(-1).max()) if g.numel() else 0
    return g[:, :max(m, 1)]


def group_classes(sel: torch.Tensor, q_gid: torch.Tensor, k_gid: torch.Tensor,
                  q_grid: TileGrid, kv_grid: TileGrid) -> torch.Tensor:
    """Tile classes of a group selection.

    sel [B, H, nGq, nGk] bool (group pairs kept), q_gid int64 [Lq] / k_gid int64 [Lkv] (group
    of each token) → int8 [B, H, nQT, nKT]: EMPTY when no kept pair falls in the tile, FULL when
    every real (non-padding) pair is kept, PARTIAL otherwise. With each tile's group list
    (m groups at most) the work is O(B·H·(nQT·m·nGk + nQT·nKT·m)): linear in tile pairs.
    """
    B, H, ngq, ngk = sel.shape
    gq = _tile_groups(q_grid, q_gid, ngq)
    gk = _tile_groups(kv_grid, k_gid, ngk)
    out = []
    for pad in (False, True):  # any-reduction (pads are False), all-reduction (pads are True)
        rows = torch.cat([sel, torch.full((B, H, 1, ngk), pad, device=sel.device)], 2)
        red = rows[:, :, gq]                                           # [B, H, nQT, mq, nGk]
        red = red.all(-2) if pad else red.any(-2)
        red = torch.cat([red, torch.full((B, H, red.shape[2], 1), pad, device=sel.device)], -1)
        red = red[..., gk]                                             # [B, H, nQT, nKT, mk]
        out.append(red.all(-1) if pad else red.any(-1))
    hit, full = out
    cls = torch.where(hit, PARTIAL, EMPTY).to(torch.int8)
    cls[hit & full] = FULL
    return cls


# ---- selectors ------------------------------------------------------------------------------

def _region_ids(shape: tuple[int, ...], region: tuple[int, ...], device) -> tuple[torch.Tensor, int]:
    t = torch.arange(math.prod(shape), device=device, dtype=torch.int64)
    gid = torch.zeros_like(t)
    stride, n_total = math.prod(shape), 1
    for size, r in zip(shape, region):
        stride //= size
        n = -(-size // r)
        gid = gid * n + (t // stride) % size // r
        n_total *= n
    return gid, n_total


def _region_tuple(region, ndim: int) -> tuple[int, ...]:
    region = (region,) if isinstance(region, int) else tuple(region)
    if len(region) == 1 and ndim > 1:
        region = region * ndim
    if len(region) != ndim or any(not isinstance(r, int) or r < 1 for r in region):
        raise PrepassError(f"route region {region} does not fit a {ndim}-D token grid")
    return region


def route_select(q: torch.Tensor, k: torch.Tensor, region, topk: int,
                 layout_shape: Optional[Sequence[int]] = None, *, q_region=None,
                 causal: bool = False):
    """Region routing (DESIGN §4; `attncc.ir.dense.route_selection`) on q's device, with the
    group id of every token.

    q [B, Hq, Lq, D], k [B, Hkv, Lkv, D]; query head h reads key head h // (Hq // Hkv).
    Tokens are the row-major flattening of `layout_shape` (or 1-D sequences). Key regions of
    `region`, query regions of `q_region` tokens (default `region`; 1: token-level queries,
    MoBA); region means in float64; affinity q̄·k̄ᵀ per (b, h); each query region keeps its
    min(topk, n_k_regions) best key regions, ties to the lower region index; `causal` (1-D)
    excludes key regions after the query region's own and always keeps the own one.

    Returns (sel bool [B, Hq, nRq, nRk], q_gid int64 [Lq], k_gid int64 [Lkv]).
    """
    from ..ir.dense import MaskEvalError, route_selection
    if not isinstance(topk, int) or topk < 1:
        raise PrepassError(f"route: topk must be a positive int, got {topk!r}")
    qs = tuple(layout_shape) if layout_shape is not None else (q.shape[2],)
    ks = tuple(layout_shape) if layout_shape is not None else (k.shape[2],)
    region = _region_tuple(region, len(qs))
    q_region = region if q_region is None else _region_tuple(q_region, len(qs))
    try:  # shapes and the layout are checked there (one set of rules for both)
        sel = route_selection(q, k, region, topk, layout_shape, q_region=q_region,
                              causal=causal)
    except MaskEvalError as e:
        raise PrepassError(str(e)) from None
    q_gid, _ = _region_ids(qs, q_region, q.device)
    k_gid, _ = _region_ids(ks, region, q.device)
    return sel, q_gid, k_gid


def block_select(scores: torch.Tensor, top: Optional[float] = None,
                 threshold: Optional[float] = None, *, name: str = "scores") -> torch.Tensor:
    """Block selection (DESIGN §4): scores [B, H, nqb, nkb] → bool [B, H, nqb, nkb].

    `top=f` keeps n_keep = max(1, ⌈f·nkb⌉) key blocks per row (ties to the lower index);
    `threshold=τ` keeps blocks with score > τ. NaN scores are rejected.
    """
    if (top is None) == (threshold is None):
        raise PrepassError("blocks: give exactly one of top / threshold")
    if not isinstance(scores, torch.Tensor) or scores.dim() != 4:
        got = list(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise PrepassError(f"{name} must be a 4-D tensor [batch, heads, q_blocks, k_blocks], got {got}")
    if not scores.dtype.is_floating_point:
        raise PrepassError(f"{name} must be a floating-point tensor, got {scores.dtype}")
    if bool(torch.isnan(scores).any()):
        raise PrepassError(f"{name} contains NaN")
    if threshold is None and not top > 0:
        raise PrepassError(f"blocks: top must be a positive fraction, got {top!r}")
    # The selection itself is the dense reference's (DESIGN §4 count rule, stable ties).
    return select_blocks(scores, top=top, threshold=threshold)


def _block_gids(n: int, block: int, device) -> torch.Tensor:
    return torch.arange(n, device=device, dtype=torch.int64) // block


# Schedule -> {device: int8 [H, nQT, nKT]} static tile classes.
_STATIC_CLASSES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _intersect(cls: torch.Tensor, static) -> torch.Tensor:
    if static is None:
        return cls
    if not isinstance(static, torch.Tensor):  # a Schedule: its classes, once per device
        per = _STATIC_CLASSES.setdefault(static, {})
        stat = per.get(str(cls.device))
        if stat is None:
            stat = per[str(cls.device)] = torch.stack(
                [static.for_head(h).classes(static.n_kv_tiles) for h in range(static.heads)]
            ).to(cls.device, torch.int8)
    else:
        stat = static.to(cls.device, torch.int8)
    if stat.shape[-2:] != cls.shape[-2:]:
        raise PrepassError(f"static tile classes {list(stat.shape)} do not match the tiling "
                           f"{list(cls.shape[-2:])}")
    return torch.minimum(cls, stat)


def route_lists(q: torch.Tensor, k: torch.Tensor, region, topk: int,
                layout_shape: Optional[Sequence[int]] = None, *, q_tile, kv_tile,
                static=None, q_region=None, causal: bool = False) -> TileLists:
    """Key-tile lists of `route(region, topk)` per (b, h, query tile).

    q [B, Hq, Lq, D], k [B, Hkv, Lkv, D]. `q_tile` / `kv_tile`: a `TileGrid`, a tile extent
    tuple over `layout_shape`, or an int (1-D tiles of that many consecutive tokens).
    `static`: a `Schedule` or int8 class tensor [H, nQT, nKT] of the rest of the mask; the
    result is its intersection with the selector's classes.
    """
    sel, q_gid, k_gid = route_select(q, k, region, topk, layout_shape, q_region=q_region,
                                     causal=causal)
    qs = tuple(layout_shape) if layout_shape is not None else (q.shape[2],)
    ks = tuple(layout_shape) if layout_shape is not None else (k.shape[2],)
    cls = group_classes(sel, q_gid, k_gid, _as_grid(q_tile, qs, "q_tile"),
                        _as_grid(kv_tile, ks, "kv_tile"))
    return lists_from_classes(_intersect(cls, static))


def block_lists(scores: torch.Tensor, block: int, top: Optional[float] = None,
                threshold: Optional[float] = None, *, q_tile, kv_tile, q_len: Optional[int] = None,
                kv_len: Optional[int] = None, static=None) -> TileLists:
    """Key-tile lists of `blocks(scores, block, top | threshold)` per (b, h, query tile).

    scores [B, H, ⌈Lq/β⌉, ⌈Lkv/β⌉]; lengths default to blocks × β. Tiles as in `route_lists`.
    """
    sel = block_select(scores, top, threshold)
    q_len = q_len if q_len is not None else scores.shape[2] * block
    kv_len = kv_len if kv_len is not None else scores.shape[3] * block
    if -(-q_len // block) != scores.shape[2] or -(-kv_len // block) != scores.shape[3]:
        raise PrepassError(f"scores {list(scores.shape)} do not match q_len={q_len}, "
                           f"kv_len={kv_len} with block={block}")
    cls = group_classes(sel, _block_gids(q_len, block, sel.device),
                        _block_gids(kv_len, block, sel.device),
                        _as_grid(q_tile, (q_len,), "q_tile"), _as_grid(kv_tile, (kv_len,), "kv_tile"))
    return lists_from_classes(_intersect(cls, static))


# ---- static conjuncts ----------------------------------------------------------------------

def static_classes(expr: Expr, layout, q_grid: TileGrid, kv_grid: TileGrid, heads: int,
                   q_len: int, kv_len: int, device=None) -> torch.Tensor:
    """Exact tile classes of a data-independent mask expression (over h, q, k, coordinates and
    lengths) → int8 [H or 1, nQT, nKT], by evaluating it tile row by tile row.

    Memory is O(tile rows · Lkv) per step (never Lq·Lkv at once); time is O(Lq·Lkv). This is the
    exact fallback of the CPU path; compiled backends take these classes from the static
    schedule (`attncc.schedule`).
    """
    qs, ks = q_grid.token_index().to(device), kv_grid.token_index().to(device)
    nqt, sq = qs.shape
    nkt, sk = ks.shape
    per_h = "h" in free_vars(expr)
    H = heads if per_h else 1
    kflat = ks.reshape(1, 1, 1, -1)
    rows = max(1, _SLAB_ELEMS // max(1, H * sq * nkt * sk))
    env0 = {"h": torch.arange(heads, device=device).view(1, -1, 1, 1), "b": 0,
            "Q_LEN": q_len, "KV_LEN": kv_len, "HEADS": heads}
    out = torch.empty(H, nqt, nkt, dtype=torch.int8, device=device)
    for t0 in range(0, nqt, rows):
        qsl = qs[t0:t0 + rows]
        n = qsl.shape[0]
        env = dict(env0, q=qsl.reshape(1, 1, -1, 1).clamp(min=0), k=kflat.clamp(min=0))
        m = Evaluator(env, layout=layout, device=device).evaluate(expr)
        m = torch.broadcast_to(m, (1, H, n * sq, nkt * sk))[0].reshape(H, n, sq, nkt, sk)
        real = (qsl >= 0).view(1, n, sq, 1, 1) & (ks >= 0).view(1, 1, 1, nkt, sk)
        kept = (m & real).permute(0, 1, 3, 2, 4).reshape(H, n, nkt, sq * sk)
        real = real.expand(1, n, sq, nkt, sk).permute(0, 1, 3, 2, 4).reshape(1, n, nkt, sq * sk)
        hit = kept.any(-1)
        full = (kept | ~real).all(-1)
        cls = torch.where(hit, PARTIAL, EMPTY).to(torch.int8)
        cls[full & hit] = FULL
        out[:, t0:t0 + n] = cls
    return out


def _env(B: int, H: int, Lq: int, Lkv: int, dev) -> dict:
    return {"b": torch.arange(B, device=dev).view(-1, 1, 1, 1),
            "h": torch.arange(H, device=dev).view(1, -1, 1, 1),
            "Q_LEN": Lq, "KV_LEN": Lkv, "HEADS": H}


def head_weights(pattern, inputs: Mapping[str, torch.Tensor], B: int, H: int, Lq: int, Lkv: int,
                 dev) -> Optional[torch.Tensor]:
    """The `output scale` of `pattern` as float32 [B, H, Lq] (None without one)."""
    if pattern.output_scale is None:
        return None
    if "k" in free_vars(pattern.output_scale):
        raise PrepassError("output scale may depend on b, q and h only, not on k")
    env = dict(_env(B, H, Lq, Lkv, dev), q=torch.arange(Lq, device=dev).view(1, 1, -1, 1))
    w = Evaluator(env, layout=pattern.layout, inputs=inputs, device=dev).evaluate(pattern.output_scale)
    return torch.broadcast_to(w, (B, H, Lq, 1))[..., 0].to(torch.float32)


@dataclass
class PrepassStats:
    """Work done by one `blocksparse_attention` call.

    head_tiles          B · H · nQT (batch, head, query tile) triples
    skipped_head_tiles  triples not computed because their output-scale weights are all zero
    full_tiles / partial_tiles   visited (b, h, query tile, key tile) quadruples by class
    """
    head_tiles: int = 0
    skipped_head_tiles: int = 0
    full_tiles: int = 0
    partial_tiles: int = 0
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"head_tiles": self.head_tiles, "skipped_head_tiles": self.skipped_head_tiles,
                "full_tiles": self.full_tiles, "partial_tiles": self.partial_tiles, **self.extra}


def _active_tiles(weights: Optional[torch.Tensor], q_grid: TileGrid, bh: tuple[int, int],
                  dev) -> torch.Tensor:
    """bool [B, H, nQT]: (b, h, query tile) triples with a non-zero output-scale weight."""
    if weights is None:
        return torch.ones(*bh, q_grid.n_tiles, dtype=torch.bool, device=dev)
    qs = q_grid.token_index().to(dev)
    return ((weights[:, :, qs.clamp(min=0)] * (qs >= 0)) != 0).any(-1)
