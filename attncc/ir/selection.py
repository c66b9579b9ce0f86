"""Data-dependent selections of the mask IR, evaluated densely: `route` (region routing,
DESIGN §4) and `blocks` (block-score selection), as the reference defines them.

    route_selection(q, k, region, topk)     bool [B, Hq, n_q_regions, n_kv_regions]
    route_by_groups(q, k, rq, nq, rk, nk)   the same from explicit token → region maps
    select_blocks(scores, top=f)            bool [B, H, q_blocks, k_blocks]

`attncc.ir.dense` (the reference evaluator) and the runtime pre-pass both call these, so the
reference and the kernels select the same regions and blocks.
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Optional

import torch

class MaskEvalError(ValueError):
    """An IR expression has no defined value at some position its result depends on
    (division by zero, out-of-range input index), or cannot be evaluated as called."""


# ---- data-dependent selectors -------------------------------------------------------------

def region_grid(shape: tuple[int, ...], region: tuple[int, ...]) -> tuple[int, ...]:
    """Number of regions per axis: ceil(size / R) (border regions are smaller)."""
    return tuple(-(-s // r) for s, r in zip(shape, region))


def region_index(shape: tuple[int, ...], region: tuple[int, ...], device=None) -> torch.Tensor:
    """Region number of every token of a row-major grid `shape`, as int64 [prod(shape)].

    Token t has coordinates c_a = (t // stride_a) % shape_a; its region has coordinates
    c_a // region_a, numbered row-major over `region_grid(shape, region)`.
    """
    shape, region = tuple(shape), _broadcast_region(region, len(shape))
    t = torch.arange(math.prod(shape), device=device, dtype=torch.int64)
    grid = region_grid(shape, region)
    out = torch.zeros_like(t)
    stride = math.prod(shape)
    for size, r, n in zip(shape, region, grid):
        stride //= size
        out = out * n + torch.div(t, stride, rounding_mode="floor") % size // r
    return out


def _broadcast_region(region, ndim: int) -> tuple[int, ...]:
    region = (region,) if isinstance(region, int) else tuple(region)
    if len(region) == 1 and ndim > 1:
        region = region * ndim
    if len(region) != ndim or any(int(r) < 1 for r in region):
        raise MaskEvalError(f"route region {region} does not fit a {ndim}-D layout")
    return tuple(int(r) for r in region)


def _region_means(x: torch.Tensor, rid: torch.Tensor, n: int) -> torch.Tensor:
    """Mean of x [B, H, L, D] over tokens with equal rid [L] → float64 [B, H, n, D]."""
    B, H, _, D = x.shape
    sums = torch.zeros(B, H, n, D, dtype=torch.float64, device=x.device)
    sums.index_add_(2, rid, x.to(torch.float64))
    counts = torch.bincount(rid, minlength=n).to(torch.float64).clamp(min=1)
    return sums / counts[:, None]


def route_selection(q: torch.Tensor, k: torch.Tensor, region, topk: int,
                    layout_shape: Optional[tuple[int, ...]] = None, *, q_region=None,
                    causal: bool = False) -> torch.Tensor:
    """Region routing (DESIGN §4) → bool [B, Hq, n_q_regions, n_kv_regions].

    q [B, Hq, Lq, D], k [B, Hkv, Lkv, D] (query head h uses key head h // (Hq // Hkv)).
    Tokens are the row-major flattening of `layout_shape` (both sides); without a layout
    they are 1-D sequences of Lq and Lkv tokens. Key regions have `region` tokens per axis,
    query regions `q_region` (default `region`; 1 gives one region per query token, MoBA).
    Region means of q and k are taken in float64 over all D channels; affinity = q̄ k̄ᵀ per
    (b, h); each query region keeps its min(topk, n_kv_regions) highest-affinity key regions,
    ties to the lower region index.

    `causal` (1-D): with off = Lkv − Lq, query region i's own key region is
    o_i = (last query of region i + off) // region; key regions after o_i are not eligible, o_i
    is always kept (it counts towards topk) and the rest are the best eligible ones; a region
    with o_i < 0 keeps none.
    """
    B, Hq, Lq, D = q.shape
    Hkv, Lkv = k.shape[1], k.shape[2]
    if k.shape[0] != B or k.shape[3] != D or Hkv == 0 or Hq % Hkv:
        raise MaskEvalError(f"route: key {list(k.shape)} does not match query {list(q.shape)} "
                            "(need equal batch and head dim, Hq a multiple of Hkv)")
    q_shape = tuple(layout_shape) if layout_shape is not None else (Lq,)
    k_shape = tuple(layout_shape) if layout_shape is not None else (Lkv,)
    if math.prod(q_shape) != Lq or math.prod(k_shape) != Lkv:
        raise MaskEvalError(f"route: layout {q_shape} does not match Lq={Lq}, Lkv={Lkv}")
    region = _broadcast_region(region, len(q_shape))
    q_region = region if q_region is None else _broadcast_region(q_region, len(q_shape))
    if causal and len(q_shape) != 1:
        raise MaskEvalError(f"route: causal needs a 1-D sequence, not a {len(q_shape)}-D layout")
    nq, nk = math.prod(region_grid(q_shape, q_region)), math.prod(region_grid(k_shape, region))
    own = None
    if causal:
        last = torch.clamp((torch.arange(nq, device=q.device) + 1) * q_region[0], max=Lq) - 1
        own = torch.div(last + (Lkv - Lq), region[0], rounding_mode="floor")
    return route_by_groups(q, k, region_index(q_shape, q_region, q.device), nq,
                           region_index(k_shape, region, k.device), nk, topk, own=own)


def route_by_groups(q: torch.Tensor, k: torch.Tensor, rq: torch.Tensor, nq: int,
                    rk: torch.Tensor, nk: int, topk: int,
                    own: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The routing selection bool [B, Hq, nq, nk] from the region of every query (rq int64
    [Lq]) and key (rk [Lkv]): region means in float64 (0 for a region without tokens),
    affinity q̄ k̄ᵀ, the top min(topk, nk) key regions per query region (ties to the lower
    index). `own` (int64 [nq], causal routing): key regions after own[i] are not eligible
    for query region i, own[i] is always kept (it counts towards topk)."""
    B, Hq = q.shape[0], q.shape[1]
    Hkv = k.shape[1]
    qbar = _region_means(q, rq, nq)
    kbar = _region_means(k, rk, nk)
    kbar = kbar.repeat_interleave(Hq // Hkv, dim=1)
    affinity = qbar @ kbar.transpose(-1, -2)
    keep = min(int(topk), nk)
    eligible = None
    if own is not None:
        own = own[:, None]
        j = torch.arange(nk, device=q.device)[None, :]
        eligible = j <= own                                               # [nq, nk]
        affinity = torch.where(j == own, math.inf, torch.where(eligible, affinity, -math.inf))
    # Stable sort on -score keeps equal scores in index order: ties go to the lower index.
    order = torch.sort(-affinity, dim=-1, stable=True).indices[..., :keep]
    sel = torch.zeros(B, Hq, nq, nk, dtype=torch.bool, device=q.device)
    sel.scatter_(-1, order, True)
    return sel if eligible is None else sel & eligible


def blocks_keep(top: float, k_blocks: int) -> int:
    """n_keep = max(1, ceil(top · k_blocks)), at most k_blocks. The product is exact, with
    `top` read as the decimal it prints as (`repr`), so 0.1 · 10 keeps 1 block and 0.7 · 10
    keeps 7 (a binary-float product would give 2 and 8)."""
    if not top > 0:
        raise MaskEvalError(f"blocks: top must be a positive fraction, got {top!r}")
    return min(k_blocks, max(1, math.ceil(Fraction(repr(float(top))) * k_blocks)))


def select_blocks(scores: torch.Tensor, top: Optional[float] = None,
                  threshold: Optional[float] = None) -> torch.Tensor:
    """Block selection (DESIGN §4): scores [B, H, nq, nk] → bool [B, H, nq, nk].

    `top=f` keeps, per (b, h, query block), the `blocks_keep(f, nk)` highest-scoring key
    blocks (ties to the lower index); `threshold=τ` keeps blocks with score > τ.
    """
    if (top is None) == (threshold is None):
        raise MaskEvalError("blocks: give exactly one of top / threshold")
    if threshold is not None:
        return scores > threshold
    nk = scores.shape[-1]
    sel = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if nk == 0:
        return sel
    order = torch.sort(-scores.to(torch.float64), dim=-1, stable=True).indices
    return sel.scatter_(-1, order[..., :blocks_keep(top, nk)], True)
