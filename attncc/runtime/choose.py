"""The default CPU backend: which backend runs a call when none was chosen.

    choice = choose_cpu_backend(q_len=2048, kv_len=2048, heads=8, visited=0.5)
    choice.backend, choice.reason      # "dense", "... pairs ≤ ..."

The rule (`cost_rule`) compares two cost models fitted to `python bench/bench_choose.py`
(docs/BENCHMARKS.md, "Default CPU backend"; a shared 2-core CPU machine):

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

Calls that need gradients (FlexAttention has no backward on CPU) are a training step; the
training rule (`train_cost_rule`) compares

    dense  autograd through SDPA over the dense mask: t ≈ DENSE_TRAIN_NS · H·Lq·Lkv, and
           memory for several [B, H, Lq, Lkv] float32 matrices (refused past
           DENSE_TRAIN_MAX_ELEMS)
    torch  block-sparse torch with its own backward over the schedule's kept 64×64 tiles:
           t ≈ TORCH_TRAIN_FIXED_MS + TORCH_TRAIN_NS · H·Lq·Lkv·visited

with `visited` the fraction of the schedule's tiles the torch backend visits (1.0 when its
lists come from runtime data). The constants are in one unit; their ratios decide.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

# Cost model constants (ns per (head, query, key) pair; ms per call), fitted to
# `python bench/bench_choose.py` (docs/BENCHMARKS.md).
DENSE_NS = 22.0
FLEX_NS = 30.0
FLEX_GRID_NS = 400.0
FLEX_FIXED_MS = 20.0
# Above this many mask elements per head the dense mask itself is a memory problem.
DENSE_MAX_PAIRS = 1 << 26
# Training step (forward + backward) models, fitted to `python bench/bench_choose.py --train`.
DENSE_TRAIN_NS = 60.0
TORCH_TRAIN_NS = 150.0
TORCH_TRAIN_FIXED_MS = 20.0
# Dense training keeps scores, probabilities and their gradients: past this many elements per
# call (B·H·Lq·Lkv; 64 MiB per float32 matrix) it is not chosen, so that a default CPU
# training step stays within a small multiple of O(kept tiles) memory.
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
    pairs = heads * q_len * kv_len
    dense = DENSE_TRAIN_NS * pairs * 1e-6
    v = 1.0 if visited is None else float(visited)
    torch_ms = TORCH_TRAIN_FIXED_MS + TORCH_TRAIN_NS * pairs * v * 1e-6
    what = (f"torch visits {v:.1%} of tiles" if visited is not None
            else "tiles decided at run time")
    if torch_ms < dense:
        return Choice("torch", f"gradients needed, {what}: modelled {torch_ms:.1f} ms < dense "
                               f"{dense:.1f} ms")
    return Choice("dense", f"gradients needed, {what}: modelled {dense:.1f} ms <= torch "
                           f"{torch_ms:.1f} ms")


def choose_cpu_backend(*, q_len: int, kv_len: int, heads: int, visited: Optional[float] = None,
                       grid: bool = False, grad: bool = False, need_lse: bool = False,
                       float64: bool = False, batch: int = 1,
                       block_scores: bool = False) -> Choice:
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
