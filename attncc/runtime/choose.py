"""The default CPU backend: which backend runs a call when none was chosen.

    choice = choose_cpu_backend(q_len=2048, kv_len=2048, heads=8, visited=0.5)
    choice.backend, choice.reason      # "dense", "... pairs ≤ ..."

The rule (`cost_rule`) compares two cost models fitted to `python bench/bench_choose.py`
(docs/BENCHMARKS.md, "Default CPU backend"; an idle 2-core CPU machine, 2 torch threads):

    dense  SDPA over the dense bool mask computes every (query, key) pair:
           t ≈ DENSE_NS · H·Lq·Lkv
    flex   compiled FlexAttention visits only the kept 128×128 blocks, after a fixed cost:
           t ≈ FLEX_FIXED_MS + FLEX_NS · H·Lq·Lkv·visited
           (FLEX_GRID_NS instead of FLEX_NS on grid layouts, whose mask_mod derives
           coordinates by division per element and whose 1-D blocks are mostly partial)

with `visited` the fraction of (query block, key block) pairs FlexAttention's block mask
visits (1.0 when the mask depends on runtime data: then only the size can favour flex).
Float64 inputs and calls that need the log-sum-exp go to "dense" (FlexAttention's CPU path
has neither); calls asking for block scores (`return_block_scores`) go to "torch", which pools
them over its kept tiles; masks whose dense form per head would pass DENSE_MAX_PAIRS go to
"flex".

Calls that need gradients (FlexAttention has no backward on CPU) are training steps; the
training rule (`train_cost_rule`, fitted to `python bench/bench_choose.py --train`) compares

    dense  autograd through SDPA over the dense mask: t ≈ DENSE_TRAIN_NS · H·Lq·Lkv, only
           while B·H·Lq·Lkv ≤ DENSE_TRAIN_MAX_ELEMS (its memory is O(Lq·Lkv))
    torch  block-sparse torch with its own backward over the schedule's kept tiles, O(kept
           tiles) memory: t ≈ TORCH_TRAIN_FIXED_MS + TORCH_TRAIN_NS · H·Lq·Lkv·visited

with `visited` the fraction of the schedule's tiles the torch backend visits; masks whose
lists come from runtime data (documents, selections) train on torch, which skips what the
data rules out while dense pays for a per-call mask.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

# Cost model constants (ns per (head, query, key) pair; ms per call), fitted to
# `python bench/bench_choose.py` (docs/BENCHMARKS.md): dense 1.3–1.6 ns per pair on every
# case; flex 1-D 3.0 ns per visited pair after ~0.5 ms; flex on grids 8–86 ns per visited
# pair, growing with the map (60: the larger maps, where the choice matters).
DENSE_NS = 1.45
FLEX_NS = 3.0
FLEX_GRID_NS = 60.0
FLEX_FIXED_MS = 0.5
# Above this many mask elements per head the dense mask itself is a memory problem.
DENSE_MAX_PAIRS = 1 << 26
# Training steps (forward + backward), fitted to `python bench/bench_choose.py --train`: dense
# 3.9–4.6 ns per pair (6 with a per-call mask); torch 9–15 ns per visited pair (more on
# PARTIAL-heavy masks) after 2–6 ms.
DENSE_TRAIN_NS = 4.2
TORCH_TRAIN_NS = 12.0
TORCH_TRAIN_FIXED_MS = 3.0
# Dense training holds O(B·H·Lq·Lkv) values: past this many (64 MiB per float32 matrix) the
# default stays on torch, whose memory is O(kept tiles).
DENSE_TRAIN_MAX_ELEMS = 1 << 24


@dataclass(frozen=True)
class Choice:
    """The backend picked for one call, and why (shown by `attncc bench`)."""
    backend: str
    reason: str

    def __str__(self) -> str:
        return f"{self.backend} ({self.reason})"


def cost_ms(backend: str, *, q_len: int, kv_len: int, heads: int, visited: float,
            grid: bool = False) -> float:
    """Modelled cost (in the constants' unit, ms) of one forward call of `backend` ("dense"
    or "flex"); `grid` for patterns with a grid layout."""
    pairs = heads * q_len * kv_len
    if backend == "dense":
        return DENSE_NS * pairs * 1e-6
    if backend == "flex":
        return FLEX_FIXED_MS + (FLEX_GRID_NS if grid else FLEX_NS) * pairs * visited * 1e-6
    raise ValueError(f"no cost model for backend {backend!r}")


def cost_rule(*, q_len: int, kv_len: int, heads: int, visited: Optional[float],
              grid: bool = False) -> Choice:
    """"dense" or "flex" for a forward call of this shape, whichever the cost model says is
    faster; `visited` in [0, 1] is the fraction of block pairs FlexAttention visits (None when
    unknown: then only the size decides); `grid` for patterns with a grid layout."""
    pairs = q_len * kv_len
    if pairs > DENSE_MAX_PAIRS:
        return Choice("flex", f"{pairs} pairs per head is past the dense limit {DENSE_MAX_PAIRS}")
    dense = cost_ms("dense", q_len=q_len, kv_len=kv_len, heads=heads, visited=0.0, grid=grid)
    if dense <= FLEX_FIXED_MS:
        return Choice("dense", f"small: modelled {dense:.1f} ms <= flex's fixed cost "
                               f"{FLEX_FIXED_MS:.1f} ms")
    v = 1.0 if visited is None else float(visited)
    flex = cost_ms("flex", q_len=q_len, kv_len=kv_len, heads=heads, visited=v, grid=grid)
    what = f"flex visits {v:.1%} of blocks" if visited is not None else "blocks decided at run time"
    if flex < dense:
        return Choice("flex", f"{what}: modelled {flex:.1f} ms < dense {dense:.1f} ms")
    return Choice("dense", f"{what}: modelled {dense:.1f} ms <= flex {flex:.1f} ms")


def train_cost_rule(*, q_len: int, kv_len: int, heads: int, visited: Optional[float],
                    batch: int = 1) -> Choice:
    """"dense" or "torch" for a call that needs gradients (a training step), whichever the
    training cost models say is faster; `visited` in [0, 1] is the fraction of the schedule's
    tiles the torch backend visits (None when its lists come from runtime data)."""
    elems = batch * heads * q_len * kv_len
    if elems > DENSE_TRAIN_MAX_ELEMS:
        return Choice("torch", f"gradients needed: {elems} score elements is past the dense "
                               f"training limit {DENSE_TRAIN_MAX_ELEMS}")
    if visited is None:
        return Choice("torch", "gradients needed, tiles decided at run time: torch skips "
                               "what the data rules out")
    pairs = heads * q_len * kv_len
    dense = DENSE_TRAIN_NS * pairs * 1e-6
    sparse = TORCH_TRAIN_FIXED_MS + TORCH_TRAIN_NS * pairs * float(visited) * 1e-6
    what = f"torch visits {visited:.1%} of tiles"
    if sparse < dense:
        return Choice("torch", f"gradients needed, {what}: modelled {sparse:.1f} ms < dense "
                               f"{dense:.1f} ms")
    return Choice("dense", f"gradients needed, {what}: modelled {dense:.1f} ms <= torch "
                           f"{sparse:.1f} ms")


def choose_cpu_backend(*, q_len: int, kv_len: int, heads: int, visited: Optional[float] = None,
                       grid: bool = False, grad: bool = False, need_lse: bool = False,
                       float64: bool = False, block_scores: bool = False,
                       batch: int = 1) -> Choice:
    """The backend for a CPU call without an explicit backend (see the module docstring);
    with `grad`, `visited` is the torch backend's tile fraction (`train_cost_rule`)."""
    if block_scores:
        return Choice("torch", "block scores requested: block-sparse torch pools them in a "
                               "second pass over its kept tiles")
    if grad:
        return train_cost_rule(q_len=q_len, kv_len=kv_len, heads=heads, visited=visited,
                               batch=batch)
    if float64:
        return Choice("dense", "float64 inputs (FlexAttention's CPU path is float32)")
    if need_lse:
        return Choice("dense", "log-sum-exp requested (FlexAttention's CPU path has none)")
    return cost_rule(q_len=q_len, kv_len=kv_len, heads=heads, visited=visited, grid=grid)


def visited_fraction(schedule) -> Optional[float]:
    """Fraction of (query tile, key tile) pairs `schedule` visits, over all heads; None when
    the schedule's lists depend on runtime data."""
    if schedule.runtime:
        return None
    total = schedule.heads * schedule.n_q_tiles * schedule.n_kv_tiles
    if not total:
        return 0.0
    visits = sum(len(c.heads) * (c.full.nnz + c.partial.nnz) for c in schedule.classes)
    return visits / total
