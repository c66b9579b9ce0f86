"""Tile visits of a pattern for context-parallel planning, from its schedule (or, for
data-dependent document patterns, from the per-call tile classes).

`TileVisits` is the union over heads and batch rows of the tile pairs a block-sparse kernel
visits: CSR by query tile of key tiles, a flag per pair telling whether some (batch, head) keeps
every pair of it (FULL: every key of the tile is needed by every row), per-query-tile work
(keys in visited tiles, summed over batch and heads — the kernel's computed pairs per query
row) and, when cheap enough, the exact number of kept keys per query row. Nothing here is
O(Lq·Lkv): costs scale with the schedule's visited tiles (plus exact evaluation of PARTIAL
tiles, bounded by `exact_limit`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import torch

from ..ir.lower_torch import to_mask_mod
from ..ir.nodes import Blocks, Load, Route, free_vars, walk
from ..schedule.schedule import TileClass, TileGrid

FULL = int(TileClass.FULL)
# Elements of one evaluated slab [B, H, tiles, tile rows, tile keys].
_SLAB = 1 << 22
# Default bound on mask evaluations for the exact per-row kept counts.
EXACT_LIMIT = 1 << 25


class PlanError(ValueError):
    """A pattern or call that context parallelism cannot plan."""


@dataclass(frozen=True, eq=False)
class TileVisits:
    """Visited tile pairs, unioned over batch rows and heads (see the module docstring).

    offsets  int64 [nQT + 1]   CSR row pointers by query tile
    kt       int64 [nnz]       key tiles, ascending within a row
    full     bool [nnz]        some (batch, head) keeps every pair of the tile
    work     int64 [nQT]       Σ over (batch, head) of keys in its visited tiles (per row)
    row_kept int64 [Lq] | None exact kept keys per query row summed over (batch, head)
    mask_fn  (b, h, q, k) -> bool on broadcast global indices
    """
    q_grid: TileGrid
    kv_grid: TileGrid
    offsets: torch.Tensor
    kt: torch.Tensor
    full: torch.Tensor
    work: torch.Tensor
    row_kept: Optional[torch.Tensor]
    mask_fn: Callable
    batch: int       # batch rows the mask distinguishes (1 when it does not read b)
    heads: tuple     # head indices to evaluate (one per head class for static masks)
    weight: torch.Tensor  # float64 [len(heads)]: heads represented by each
    q_tokens: torch.Tensor   # int64 [nQT, tile]: flat token of each slot, -1 padding
    kv_tokens: torch.Tensor
    kv_valid: torch.Tensor   # int64 [nKT]: real tokens per key tile

    def q_tile_of(self) -> torch.Tensor:
        """int64 [Lq]: the query tile of each query position (cached)."""
        cached = self.__dict__.get("_q_tile_of")
        if cached is None:
            tok = self.q_tokens
            cached = torch.empty(self.q_grid.numel, dtype=torch.int64)
            ids = torch.arange(tok.shape[0]).view(-1, 1).expand(tok.shape)
            ok = tok >= 0
            cached[tok[ok]] = ids[ok]
            object.__setattr__(self, "_q_tile_of", cached)
        return cached

    @property
    def nnz(self) -> int:
        return self.kt.numel()

    def evaluate(self, qt: torch.Tensor, kt: torch.Tensor,
                 rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """bool [n, q slots, k slots]: pairs of tile pairs (qt[i], kt[i]) kept by some
        (batch, head) — or, with `rows` bool [n, q slots], kept for those rows only; padding
        slots are False."""
        qtok, ktok = self.q_tokens[qt], self.kv_tokens[kt]
        out = torch.zeros(qt.numel(), qtok.shape[1], ktok.shape[1], dtype=torch.bool)
        per = max(1, _SLAB // max(1, self.batch * len(self.heads) * qtok.shape[1] * ktok.shape[1]))
        b = torch.arange(self.batch).view(-1, 1, 1, 1, 1)
        h = torch.tensor(self.heads, dtype=torch.int64).view(1, -1, 1, 1, 1)
        for i in range(0, qt.numel(), per):
            qs, ks = qtok[i:i + per], ktok[i:i + per]
            m = self.mask_fn(b, h, qs.clamp(min=0)[None, None, :, :, None],
                             ks.clamp(min=0)[None, None, :, None, :])
            m = torch.broadcast_to(torch.as_tensor(m, dtype=torch.bool),
                                   (self.batch, len(self.heads), qs.shape[0], qs.shape[1],
                                    ks.shape[1])).any(1).any(0)
            valid = (qs >= 0)[:, :, None] & (ks >= 0)[:, None, :]
            if rows is not None:
                valid &= rows[i:i + per, :, None]
            out[i:i + per] = m & valid
        return out


def _valid_counts(tokens: torch.Tensor) -> torch.Tensor:
    return (tokens >= 0).sum(1).to(torch.int64)


def _segment_sum(values: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    c = torch.cat([torch.zeros(1, dtype=values.dtype), torch.cumsum(values, 0)])
    return c[offsets[1:]] - c[offsets[:-1]]


def _union(nq: int, nk: int, parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
    """Union of COO (qt, kt, full) lists → CSR (offsets, kt, full-any)."""
    qt = torch.cat([p[0] for p in parts]) if parts else torch.zeros(0, dtype=torch.int64)
    kt = torch.cat([p[1] for p in parts]) if parts else torch.zeros(0, dtype=torch.int64)
    fl = torch.cat([p[2] for p in parts]) if parts else torch.zeros(0, dtype=torch.bool)
    key = qt * nk + kt
    uniq, inv = torch.unique(key, return_inverse=True)
    full = torch.zeros(uniq.numel(), dtype=torch.int8).scatter_reduce(
        0, inv, fl.to(torch.int8), "amax", include_self=True).bool()
    rows = torch.div(uniq, nk, rounding_mode="floor")
    offsets = torch.zeros(nq + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.bincount(rows, minlength=nq), 0)
    return offsets, uniq - rows * nk, full


def _mask_fn(pattern, inputs, q_len, kv_len, heads):
    if any(isinstance(n, (Route, Blocks)) for n in walk(pattern.mask)):
        raise PlanError(f"pattern '{pattern.name}' selects tiles at run time from q/k or a "
                        "score tensor (route/blocks); context parallelism supports static "
                        "masks and document ids")
    return to_mask_mod(pattern, inputs, q_len=q_len, kv_len=kv_len, heads=heads)


def reads_inputs(pattern) -> bool:
    return any(isinstance(n, Load) for n in walk(pattern.mask))


def build_visits(kern, q_len: int, kv_len: int, *, heads: int = 1, batch: int = 1,
                 inputs: Optional[Mapping[str, torch.Tensor]] = None,
                 exact_limit: int = EXACT_LIMIT) -> TileVisits:
    """Tile visits of `kern` (an attncc Kernel) for one shape. Patterns whose mask reads
    runtime inputs (document ids) need `inputs` (global, [batch, ...]); their classes come
    from `attncc.runtime.conjuncts.pattern_classes`."""
    pattern = kern.pattern
    sched = kern.schedule(q_len, kv_len, heads)
    qg, kg = sched.q_grid, sched.kv_grid
    nq, nk = qg.n_tiles, kg.n_tiles
    q_tokens, kv_tokens = qg.token_index(), kg.token_index()
    kv_valid = _valid_counts(kv_tokens)
    dynamic = reads_inputs(pattern)
    if dynamic:
        missing = [d.name for d in pattern.inputs if d.name not in (inputs or {})]
        if missing:
            raise PlanError(f"pattern '{pattern.name}' reads runtime input(s) "
                            f"{', '.join(missing)} in its mask: pass them (global, "
                            f"[batch, length]) to plan")
    mask_fn = _mask_fn(pattern, dict(inputs or {}), q_len, kv_len, heads)
    parts, partial_parts = [], []
    work = torch.zeros(nq, dtype=torch.int64)
    if not dynamic:
        per_b = "b" not in free_vars(pattern.mask)
        eval_batch = 1 if per_b else batch
        reps, weights = [], []
        for c in sched.classes:
            n_h = len(c.heads) * (batch if per_b else 1)
            for csr, is_full in ((c.full, True), (c.partial, False)):
                cnt = csr.counts.to(torch.int64)
                qt = torch.repeat_interleave(torch.arange(nq), cnt)
                kt = csr.indices.to(torch.int64)
                parts.append((qt, kt, torch.full_like(kt, is_full, dtype=torch.bool)))
                work += _segment_sum(kv_valid[kt], csr.offsets.to(torch.int64)) * n_h
                if not is_full:
                    partial_parts.append((qt, kt, len(reps)))
            reps.append(c.heads[0])
            weights.append(float(n_h))
        heads_eval, weight = tuple(reps), torch.tensor(weights, dtype=torch.float64)
    else:
        from ..runtime.conjuncts import pattern_classes
        q = torch.empty(batch, heads, q_len, 0)
        k = torch.empty(batch, 1, kv_len, 0)
        cls, _ = pattern_classes(pattern, q, k, dict(inputs), qg, kg, static=sched)
        visited = cls > 0                                   # [B, H, nq, nk]
        count = visited.sum((0, 1))
        work = (count.to(torch.int64) * kv_valid[None, :]).sum(1)
        anyv = count > 0
        fullany = (cls == FULL).any(1).any(0)
        qt, kt = anyv.nonzero(as_tuple=True)
        parts.append((qt, kt, fullany[qt, kt]))
        eval_batch = batch
        heads_eval = tuple(range(heads))
        weight = torch.ones(heads, dtype=torch.float64)
        pq, pk = (anyv & ~(cls == FULL).all(1).all(0)).nonzero(as_tuple=True)
        partial_parts = [(pq, pk, None)]
    offsets, kt, full = _union(nq, nk, parts)
    visits = TileVisits(qg, kg, offsets, kt, full, work, None, mask_fn, eval_batch, heads_eval,
                        weight, q_tokens, kv_tokens, kv_valid)
    row_kept = _row_kept(visits, sched, partial_parts, q_len, batch, heads, dynamic, exact_limit)
    object.__setattr__(visits, "row_kept", row_kept)
    return visits


def _row_kept(v: TileVisits, sched, partial_parts, q_len, batch, heads, dynamic, limit):
    """Exact kept keys per query row (Σ batch, heads), or None past `limit` evaluations."""
    area = v.q_tokens.shape[1] * v.kv_tokens.shape[1]
    pairs = v.nnz if dynamic else sum(p[0].numel() for p in partial_parts)
    n_eval = pairs * area * v.batch * len(v.heads)
    if n_eval > limit:
        return None
    row = torch.zeros(q_len, dtype=torch.float64)
    if dynamic:
        # kept counts per (b, h) straight from the mask on visited tiles (FULL ones included)
        qt = torch.repeat_interleave(torch.arange(v.q_grid.n_tiles), v.offsets[1:] - v.offsets[:-1])
        kt = v.kt
        b = torch.arange(batch).view(-1, 1, 1, 1, 1)
        h = torch.arange(heads).view(1, -1, 1, 1, 1)
        per = max(1, _SLAB // max(1, batch * heads * area))
        for i in range(0, qt.numel(), per):
            qs, ks = v.q_tokens[qt[i:i + per]], v.kv_tokens[kt[i:i + per]]
            m = v.mask_fn(b, h, qs.clamp(min=0)[None, None, :, :, None],
                          ks.clamp(min=0)[None, None, :, None, :])
            m = torch.broadcast_to(torch.as_tensor(m, dtype=torch.bool),
                                   (batch, heads) + qs.shape + (ks.shape[1],))
            m = m & (ks >= 0)[None, None, :, None, :]
            cnt = m.sum((0, 1, 4)).to(torch.float64)      # [n, q slots]
            ok = qs >= 0
            row.index_add_(0, qs[ok], cnt[ok])
        return row.round().to(torch.int64)
    # static: FULL tiles count every key; PARTIAL tiles are evaluated per head class
    for c, w in zip(sched.classes, v.weight.tolist()):
        cnt = _segment_sum(v.kv_valid[c.full.indices.to(torch.int64)], c.full.offsets.to(torch.int64))
        tok = v.q_tokens
        per_slot = (cnt.to(torch.float64) * w)[:, None].expand(tok.shape)
        ok = tok >= 0
        row.index_add_(0, tok[ok], per_slot[ok])
    b = torch.zeros(1, dtype=torch.int64).view(1, 1, 1, 1, 1)
    for (qt, kt, ci) in partial_parts:
        h = torch.tensor([v.heads[ci]]).view(1, 1, 1, 1, 1)
        w = float(v.weight[ci])
        per = max(1, _SLAB // max(1, area))
        for i in range(0, qt.numel(), per):
            qs, ks = v.q_tokens[qt[i:i + per]], v.kv_tokens[kt[i:i + per]]
            m = v.mask_fn(b, h, qs.clamp(min=0)[None, None, :, :, None],
                          ks.clamp(min=0)[None, None, :, None, :])
            m = torch.broadcast_to(torch.as_tensor(m, dtype=torch.bool),
                                   (1, 1) + qs.shape + (ks.shape[1],))[0, 0]
            cnt = (m & (ks >= 0)[:, None, :]).sum(2).to(torch.float64) * w
            ok = qs >= 0
            row.index_add_(0, qs[ok], cnt[ok])
    return row.round().to(torch.int64)
