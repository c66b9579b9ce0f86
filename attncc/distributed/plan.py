"""The context-parallel communication plan, derived from the pattern's schedule.

For a world of W ranks holding the sequence by a `Layout` (see `attncc.distributed.layout`),
rank r owns query rows Q_r and keys K_r. Its queries touch the query tiles that contain them;
those tiles visit key tiles (the schedule's FULL / PARTIAL lists, unioned over heads and batch
rows). Rank r must hold every key of a FULL tile; of a PARTIAL tile whose keys are not all its
own, exactly the keys some of its rows keep (the mask evaluated on that tile, rows restricted
to Q_r: token granularity). Needed keys minus K_r, cut by owner, are the ranges r fetches from
each other rank. Bytes = fetched tokens × batch × kv_heads × (head_dim + v_dim) × itemsize.

Load: the kept (query, key) pairs of Q_r (exact, summed over batch and heads) when the exact
count is affordable, and always the pairs a block-sparse kernel computes (visited tiles ×
rows). `plan(...)` with balance "auto" builds the plan of every applicable layout and keeps
the one with the lowest maximum load (within 5 %), then the fewest bytes.

Pure: no processes, no communication; any world size (this is the simulation mode).
"""
from __future__ import annotations

from dataclasses import dataclass, field
import math
from typing import Mapping, Optional

import torch

from . import layout as lay
from .layout import Layout, range_bounds
from .visits import EXACT_LIMIT, PlanError, TileVisits, build_visits

# Refinement (token-granular PARTIAL tiles) is skipped on a rank whose cross-rank PARTIAL tiles
# need more than this many mask evaluations, unless exact=True; that rank then fetches whole
# key tiles (granularity "tile", or "mixed" when only some ranks do).
REFINE_RANK_LIMIT = 1 << 27
REFINE_LIMIT = 1 << 28     # ... and on every rank when all of them together need more
BALANCE_TOLERANCE = 1.05


@dataclass(frozen=True, eq=False)
class RankPlan:
    """What one rank owns, fetches and computes.

    q_ranges / kv_ranges   global positions owned (merged half-open ranges)
    fetch_src, fetch_start, fetch_end   int64 [n]: global key ranges fetched, by source rank
                           (ascending source, then position)
    recv_tokens, send_tokens   key tokens received / sent (K and V count once per token)
    recv_bytes, send_bytes     forward bytes (K and V); backward sends the same back
    kept_pairs             exact kept pairs of its rows (Σ batch, heads), or None
    computed_pairs         pairs a block-sparse kernel computes for its rows
    """
    rank: int
    q_ranges: list
    kv_ranges: list
    rows: int
    fetch_src: torch.Tensor
    fetch_start: torch.Tensor
    fetch_end: torch.Tensor
    recv_tokens: int
    recv_bytes: int
    kept_pairs: Optional[int]
    computed_pairs: int
    send_tokens: int = 0
    send_bytes: int = 0

    def fetch(self) -> dict[int, list[tuple[int, int]]]:
        """{source rank: [(start, end), ...]} global key ranges fetched from each rank."""
        out: dict[int, list] = {}
        for s, a, b in zip(self.fetch_src.tolist(), self.fetch_start.tolist(),
                           self.fetch_end.tolist()):
            out.setdefault(s, []).append((a, b))
        return out

    def fetch_positions(self, src: int) -> torch.Tensor:
        """int64 global key positions fetched from rank `src`, ascending."""
        sel = self.fetch_src == src
        a, b = self.fetch_start[sel], self.fetch_end[sel]
        if a.numel() == 0:
            return torch.zeros(0, dtype=torch.int64)
        n = b - a
        base = torch.repeat_interleave(a - (torch.cumsum(n, 0) - n), n)
        return base + torch.arange(int(n.sum()), dtype=torch.int64)

    @property
    def load(self) -> int:
        return self.kept_pairs if self.kept_pairs is not None else self.computed_pairs


@dataclass(frozen=True, eq=False)
class Plan:
    """A context-parallel plan for `world` ranks (see the module docstring).

    balance        the layout kind chosen; `candidates` every kind compared, as
                   {kind: (max load / mean load, total bytes)}
    bytes_per_token  batch × kv_heads × (head_dim + v_dim) × itemsize
    granularity    "token" (PARTIAL tiles refined to the keys kept), "tile" or "mixed"
    load_kind      "kept" or "computed" (what `RankPlan.load` counts)
    """
    world: int
    q_len: int
    kv_len: int
    balance: str
    q_layout: Layout
    kv_layout: Layout
    ranks: tuple
    bytes_per_token: int
    granularity: str
    load_kind: str
    candidates: dict = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(r.recv_bytes for r in self.ranks)

    @property
    def max_recv_bytes(self) -> int:
        return max(r.recv_bytes for r in self.ranks)

    @property
    def imbalance(self) -> float:
        """max load / mean load (1.0 = perfectly balanced)."""
        loads = [r.load for r in self.ranks]
        mean = sum(loads) / len(loads)
        return max(loads) / mean if mean else 1.0

    def allgather_bytes(self) -> int:
        """Total bytes all-gather CP (or ring attention) moves: every rank receives every
        other rank's K/V."""
        return sum(self.kv_len - len(o) for o in self.kv_layout.owned) * self.bytes_per_token

    def __str__(self) -> str:
        lines = [f"context-parallel plan: {self.world} ranks, q_len={self.q_len}, "
                 f"kv_len={self.kv_len}, balance={_name(self.q_layout)}, "
                 f"granularity={self.granularity}",
                 f"  load ({self.load_kind} pairs) max/mean {self.imbalance:.3f}; bytes moved "
                 f"{self.total_bytes} (all-gather / ring: {self.allgather_bytes()})"]
        for r in self.ranks:
            fetch = "; ".join(f"{s}: " + ",".join(f"{a}:{b}" for a, b in rs)
                              for s, rs in r.fetch().items())
            lines.append(f"  rank {r.rank}: rows {r.rows} {_fmt(r.q_ranges)}  load {r.load}  "
                         f"recv {r.recv_bytes} B  fetch [{fetch}]")
        if self.candidates:
            lines.append("  candidates: " + ", ".join(
                f"{k} (imbalance {v[0]:.3f}, {v[1]} B)" for k, v in self.candidates.items()))
        return "\n".join(lines)


def _fmt(ranges) -> str:
    s = ",".join(f"{a}:{b}" for a, b in ranges[:4])
    return s + (",..." if len(ranges) > 4 else "")


# ---- range utilities ------------------------------------------------------------------------

def merge_ranges(starts: torch.Tensor, ends: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Union of half-open ranges → sorted, disjoint, non-adjacent ranges."""
    keep = ends > starts
    starts, ends = starts[keep], ends[keep]
    if starts.numel() == 0:
        return starts, ends
    order = torch.argsort(starts, stable=True)
    starts, ends = starts[order], ends[order]
    reach = torch.cummax(ends, 0).values
    new = torch.ones_like(starts, dtype=torch.bool)
    new[1:] = starts[1:] > reach[:-1]
    group = torch.cumsum(new.to(torch.int64), 0) - 1
    n = int(group[-1]) + 1
    out_s = starts[new]
    out_e = torch.zeros(n, dtype=ends.dtype).scatter_reduce(0, group, ends, "amax",
                                                             include_self=False)
    return out_s, out_e


def owner_runs(layout: Layout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(starts, ends, rank) of the maximal single-owner runs of a layout, ascending."""
    o = layout.owner
    if o.numel() == 0:
        z = torch.zeros(0, dtype=torch.int64)
        return z, z, z
    brk = torch.nonzero(o[1:] != o[:-1]).flatten() + 1
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), brk])
    ends = torch.cat([brk, torch.tensor([o.numel()])])
    return starts, ends, o[starts]


def cut_by_owner(starts, ends, runs):
    """Split ranges at owner boundaries → (start, end, owner) pieces."""
    rs, re_, rr = runs
    lo = torch.searchsorted(re_, starts, right=True)
    hi = torch.searchsorted(rs, ends, right=False)
    cnt = (hi - lo).clamp(min=0)
    idx = torch.repeat_interleave(torch.arange(starts.numel()), cnt)
    run = torch.repeat_interleave(lo - (torch.cumsum(cnt, 0) - cnt), cnt) \
        + torch.arange(int(cnt.sum()), dtype=torch.int64)
    a = torch.maximum(starts[idx], rs[run])
    b = torch.minimum(ends[idx], re_[run])
    return a, b, rr[run]


# ---- planning ---------------------------------------------------------------------------------

def _tile_owner(tokens: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """int64 [n_tiles]: the single owner of each tile's tokens, -1 when shared."""
    ok = tokens >= 0
    o = owner[tokens.clamp(min=0)]
    big = torch.iinfo(torch.int64).max
    lo = torch.where(ok, o, big).amin(1)
    hi = torch.where(ok, o, -1).amax(1)
    return torch.where(lo == hi, lo, torch.full_like(lo, -1))


def _needed(v: TileVisits, q_layout: Layout, k_tile_owner: torch.Tensor, refine,
            stride: int):
    """For every rank at once: the key ranges its rows need beyond its own key tiles, as
    (starts, ends) in a rank-offset space (rank r's position p is r·stride + p, so ranges of
    different ranks never merge), plus computed pairs per rank and the ranks refined to token
    granularity."""
    world = q_layout.world
    qtile_of = v.q_tile_of()
    nq = v.q_grid.n_tiles
    pair = q_layout.owner * nq + qtile_of                     # (rank, query tile) per row
    pairs, rows_per = torch.unique(pair, return_counts=True)
    p_rank = torch.div(pairs, nq, rounding_mode="floor")
    p_tile = pairs - p_rank * nq
    computed = torch.zeros(world, dtype=torch.int64).index_add_(0, p_rank,
                                                                v.work[p_tile] * rows_per)
    idx, which = _rows_of_pairs(v, p_tile)
    e_rank, e_qt = p_rank[which], p_tile[which]
    kt, full = v.kt[idx], v.full[idx]
    foreign = k_tile_owner[kt] != e_rank
    area = v.q_tokens.shape[1] * v.kv_tokens.shape[1] * v.batch * len(v.heads)
    if refine is None:   # token granularity unless a rank's refinement is too costly
        cost = torch.zeros(world, dtype=torch.int64).index_add_(
            0, e_rank, (foreign & ~full).to(torch.int64)) * area
        refined = cost <= REFINE_RANK_LIMIT
        if int(cost[refined].sum()) > REFINE_LIMIT:
            refined[:] = False
    else:
        refined = torch.full((world,), bool(refine))
    whole = foreign & (full | ~refined[e_rank])
    part = foreign & ~whole
    starts, ends = [], []
    if bool(whole.any()):
        s, e = _tile_token_ranges(v, e_rank[whole], kt[whole], stride)
        starts.append(s), ends.append(e)
    if bool(part.any()):
        pq, pk, pr = e_qt[part], kt[part], e_rank[part]
        qtok = v.q_tokens[pq]
        rows = (q_layout.owner[qtok.clamp(min=0)] == pr[:, None]) & (qtok >= 0)
        kept = v.evaluate(pq, pk, rows).any(1)              # [n, k slots]
        tok = v.kv_tokens[pk]
        keys = torch.unique((pr[:, None] * stride + tok)[kept])
        s, e = range_bounds(keys)
        starts.append(s), ends.append(e)
    if not starts:
        z = torch.zeros(0, dtype=torch.int64)
        return z, z, computed, refined
    s, e = merge_ranges(torch.cat(starts), torch.cat(ends))
    return s, e, computed, refined


def _rows_of_pairs(v: TileVisits, tiles: torch.Tensor):
    """(entry indices, index into `tiles`) of the CSR rows `tiles` (repeats allowed)."""
    starts, ends = v.offsets[tiles], v.offsets[tiles + 1]
    counts = ends - starts
    which = torch.repeat_interleave(torch.arange(tiles.numel()), counts)
    base = torch.repeat_interleave(starts - (torch.cumsum(counts, 0) - counts), counts)
    return base + torch.arange(int(counts.sum()), dtype=torch.int64), which


def _tile_token_ranges(v: TileVisits, rank: torch.Tensor, kt: torch.Tensor, stride: int):
    """Rank-offset token ranges of the key tiles (rank[i], kt[i])."""
    nk = v.kv_grid.n_tiles
    if len(v.kv_grid.shape) == 1:
        bn, L = v.kv_grid.tile[0], v.kv_grid.shape[0]
        keys = torch.unique(rank * (nk + 1) + kt)          # +1: runs never cross ranks
        ks, ke = range_bounds(keys)
        r = torch.div(ks, nk + 1, rounding_mode="floor")
        a, b = ks - r * (nk + 1), ke - r * (nk + 1)
        return r * stride + a * bn, r * stride + torch.clamp(b * bn, max=L)
    pairs = torch.unique(rank * nk + kt)
    r = torch.div(pairs, nk, rounding_mode="floor")
    tok = v.kv_tokens[pairs - r * nk]
    keys = (r[:, None] * stride + tok)[tok >= 0]
    return range_bounds(torch.unique(keys))


def plan_layouts(v: TileVisits, q_layout: Layout, kv_layout: Layout, bytes_per_token: int,
                 refine) -> tuple[list[RankPlan], str]:
    """Per-rank plans for fixed layouts (vectorized over ranks)."""
    world = q_layout.world
    stride = kv_layout.length + 1
    k_tile_owner = _tile_owner(v.kv_tokens, kv_layout.owner)
    s, e, computed, refined = _needed(v, q_layout, k_tile_owner, refine, stride)
    rank = torch.div(s, stride, rounding_mode="floor")
    a, b, src = cut_by_owner(s - rank * stride, e - rank * stride, owner_runs(kv_layout))
    rank = torch.repeat_interleave(rank, _pieces(s - rank * stride, e - rank * stride,
                                                 owner_runs(kv_layout)))
    keep = src != rank
    a, b, src, rank = a[keep], b[keep], src[keep], rank[keep]
    order = torch.argsort((rank * world + src) * stride + a)
    a, b, src, rank = a[order], b[order], src[order], rank[order]
    n = b - a
    recv = torch.zeros(world, dtype=torch.int64).index_add_(0, rank, n).tolist()
    send = torch.zeros(world, dtype=torch.int64).index_add_(0, src, n).tolist()
    counts = torch.bincount(rank, minlength=world).tolist()
    kept = None
    if v.row_kept is not None:
        kept = torch.zeros(world, dtype=torch.int64).index_add_(
            0, q_layout.owner, v.row_kept).tolist()
    computed = computed.tolist()
    q_ranges, kv_ranges = _ranges_by_rank(q_layout), _ranges_by_rank(kv_layout)
    ranks = []
    for r, (pa, pb, ps) in enumerate(zip(torch.split(a, counts), torch.split(b, counts),
                                         torch.split(src, counts))):
        ranks.append(RankPlan(r, q_ranges[r], kv_ranges[r], int(q_layout.owned[r].numel()),
                              ps, pa, pb, recv[r], recv[r] * bytes_per_token,
                              None if kept is None else kept[r], computed[r], send[r],
                              send[r] * bytes_per_token))
    n_ref = int(refined.sum())
    return ranks, ("token" if n_ref == world else "tile" if n_ref == 0 else "mixed")


def _ranges_by_rank(layout: Layout) -> list[list[tuple[int, int]]]:
    s, e, r = owner_runs(layout)
    order = torch.argsort(r, stable=True)
    counts = torch.bincount(r, minlength=layout.world).tolist()
    s, e = s[order].tolist(), e[order].tolist()
    out, i = [], 0
    for c in counts:
        out.append(list(zip(s[i:i + c], e[i:i + c])))
        i += c
    return out


def _pieces(starts, ends, runs) -> torch.Tensor:
    """Number of owner runs each range overlaps (what `cut_by_owner` splits it into)."""
    rs, re_, _ = runs
    lo = torch.searchsorted(re_, starts, right=True)
    hi = torch.searchsorted(rs, ends, right=False)
    return (hi - lo).clamp(min=0)


def make_plan(kern, q_len: Optional[int] = None, kv_len: Optional[int] = None, *, world: int,
              balance: str = "auto", heads: int = 1, kv_heads: Optional[int] = None,
              batch: int = 1, head_dim: int = 128, v_dim: Optional[int] = None,
              dtype: torch.dtype = torch.bfloat16,
              inputs: Optional[Mapping[str, torch.Tensor]] = None,
              exact: Optional[bool] = None, layouts: Optional[tuple[Layout, Layout]] = None,
              exact_limit: int = EXACT_LIMIT) -> Plan:
    """The plan of `kern` for `world` ranks (see the module docstring).

    q_len / kv_len   global lengths (q_len defaults to the grid layout's size, kv_len to q_len)
    balance          "auto" | "contiguous" | "headtail" | "document" | "grid"
    heads, kv_heads, batch, head_dim, v_dim, dtype   the call's shape (bytes and load)
    inputs           global runtime inputs (document ids) for patterns whose mask reads them
    exact            True: token-granular fetch lists always; False: whole key tiles; None:
                     token-granular except on ranks where that costs more than
                     REFINE_RANK_LIMIT mask evaluations (on none past REFINE_LIMIT in all)
    layouts          (q_layout, kv_layout) to plan for, bypassing `balance`
    """
    if q_len is None:
        if kern.pattern.layout is None:
            raise ValueError(f"pattern '{kern.pattern.name}' has no layout: pass q_len")
        q_len = kern.pattern.fixed_length
        kv_len = kern.pattern.fixed_kv_length if kv_len is None else kv_len
    kv_len = q_len if kv_len is None else kv_len
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"world size must be a positive int, got {world!r}")
    kv_heads = heads if kv_heads is None else kv_heads
    v_dim = head_dim if v_dim is None else v_dim
    itemsize = torch.empty(0, dtype=dtype).element_size()
    bpt = batch * kv_heads * (head_dim + v_dim) * itemsize
    v = build_visits(kern, q_len, kv_len, heads=heads, batch=batch, inputs=inputs,
                     exact_limit=exact_limit)
    refine = exact
    if layouts is not None:
        ranks, gran = plan_layouts(v, layouts[0], layouts[1], bpt, refine)
        return Plan(world, q_len, kv_len, layouts[0].kind, layouts[0], layouts[1], tuple(ranks),
                    bpt, gran, "kept" if v.row_kept is not None else "computed")
    options = layouts_for(kern, q_len, kv_len, world, balance, inputs)
    plans = []
    for ql, kl in options:
        ranks, gran = plan_layouts(v, ql, kl, bpt, refine)
        plans.append(Plan(world, q_len, kv_len, ql.kind, ql, kl, tuple(ranks), bpt, gran,
                          "kept" if v.row_kept is not None else "computed"))
    best = choose(plans)
    cands = {_name(p.q_layout): (p.imbalance, p.total_bytes) for p in plans}
    return Plan(best.world, q_len, kv_len, best.balance, best.q_layout, best.kv_layout,
                best.ranks, bpt, best.granularity, best.load_kind, cands)


def _name(layout: Layout) -> str:
    return layout.kind + (f" {layout.detail}" if layout.detail else "")


def choose(plans: list[Plan]) -> Plan:
    """Lowest max load (within BALANCE_TOLERANCE of the best), then fewest bytes, then the
    earlier candidate."""
    maxes = [max(r.load for r in p.ranks) for p in plans]
    best = min(maxes)
    ok = [i for i, m in enumerate(maxes) if m <= best * BALANCE_TOLERANCE]
    return plans[min(ok, key=lambda i: (plans[i].total_bytes, i))]


def document_ids(pattern, inputs) -> Optional[torch.Tensor]:
    """The document-id tensor of a `doc[b, q] == doc[b, k]` pattern, if given."""
    from ..runtime.conjuncts import conjuncts, document_input
    for term in conjuncts(pattern.mask):
        name = document_input(term)
        if name is not None and inputs and name in inputs:
            return inputs[name]
    return None


def layouts_for(kern, q_len: int, kv_len: int, world: int, balance: str,
                inputs=None) -> list[tuple[Layout, Layout]]:
    """(q_layout, kv_layout) candidates of `balance` ("auto": every applicable kind)."""
    pattern = kern.pattern
    one_grid = pattern.layout is not None and not hasattr(pattern.layout, "q")
    grid_shape = pattern.layout.shape if one_grid else None  # segmented: flat layouts
    doc = document_ids(pattern, inputs)
    if balance == "auto":
        kinds = ["contiguous"] + (["headtail"] if world > 1 else [])
        if world > 1 and grid_shape is not None and len(grid_shape) > 1:
            kinds.append("grid")
        if world > 1 and doc is not None:
            kinds.append("document")
    elif balance in lay.BALANCES:
        kinds = [balance]
    else:
        raise ValueError(f"balance must be 'auto' or one of {', '.join(lay.BALANCES)}, "
                         f"got {balance!r}")
    out: list = []
    for kind in kinds:
        if kind == "document" and q_len != kv_len:
            if balance != "auto":
                raise PlanError("balance='document' needs q_len == kv_len")
            continue
        if kind == "grid" and grid_shape is not None and len(grid_shape) > 1 \
                and q_len == kv_len == math.prod(grid_shape):
            # a few factorizations: the plan measures which halo is smallest
            out += [(g, g) for g in (lay.grid(grid_shape, world, f) for f in
                                     lay.grid_factor_options(grid_shape, world))]
            continue
        ql = lay.make_layout(kind, q_len, world, grid_shape=grid_shape, doc=doc)
        kl = ql if kv_len == q_len else lay.make_layout(kind, kv_len, world,
                                                        grid_shape=grid_shape, doc=doc)
        if ql is None or kl is None:
            if balance != "auto":
                why = ("document ids (pass the pattern's document input)" if kind == "document"
                       else f"a grid layout whose size factors over {world} ranks")
                raise PlanError(f"balance={kind!r} needs {why}")
            continue
        out.append((ql, kl))
    return out


__all__ = ["Plan", "RankPlan", "make_plan", "layouts_for", "choose", "merge_ranges",
           "owner_runs", "cut_by_owner", "PlanError", "document_ids"]
