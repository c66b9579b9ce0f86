"""Autotuning of the Triton forward on CUDA: tile sizes, warps and stages, per shape class.

`CompileOptions(autotune=True)` makes the "triton" backend time a small set of candidate
options (`candidate_options`) at the first call of each *shape class* (`shape_class`: the
pattern, head dims, dtype, device and the log2 buckets of the query and key lengths) and keep
the fastest in `Kernel._tuned`; later calls of that class, whatever their exact lengths, run
the kept options without timing. Candidates that fail to launch (e.g. shared memory) are
passed over (`compile.pick_fastest`).

Without tuning the kernel runs its own options; the library default (64×64 tiles, 4 warps,
2 stages) is the configuration the ahead-of-time gate (tests/test_aot.py) keeps free of
register spills on sm_80 and sm_90 at head dims 64 and 128.
"""
from __future__ import annotations

import threading
import weakref
from typing import Callable, Optional

from .options import CompileOptions

__all__ = ["BLOCK_CONFIGS", "shape_class", "candidate_options", "choose", "tuned_forward"]

# (block_m, block_n) tried for 1-D tiles; 128×128 only at head dims <= 64 (registers).
BLOCK_CONFIGS = ((64, 64), (128, 64), (128, 128))
_LOCK = threading.Lock()
_SIBLINGS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _bucket(n: int) -> int:
    """ceil(log2(n)) for n >= 1 (0 for n <= 1): lengths 513..1024 share bucket 10."""
    return max(0, (int(n) - 1).bit_length())


def shape_class(pattern, q, k, v) -> tuple:
    """Key of the tuning cache for q [B, Hq, Lq, D], k [B, Hkv, Lkv, D], v [.., Dv]:
    (pattern IR hash, D, Dv, dtype, device, ceil(log2 Lq), ceil(log2 Lkv)). Batch and head
    counts are left out (they scale the grid, not the per-program work)."""
    return (pattern.ir_hash(), int(q.shape[3]), int(v.shape[3]), str(q.dtype), str(q.device),
            _bucket(q.shape[2]), _bucket(k.shape[2]))


def _one_d(pattern, options: CompileOptions) -> bool:
    """Whether the kernel's tiles are 1-D (block_m / block_n apply)."""
    return getattr(pattern, "layout", None) is None or options.tile_1d


def candidate_options(base: CompileOptions, pattern, head_dim: int,
                      configs: Optional[tuple] = None) -> list:
    """Options to time: `base` first, then (block_m, block_n) from BLOCK_CONFIGS (1-D tiles
    only; 128×128 only for head_dim <= 64) × (num_warps, num_stages) from `configs`
    (default `compile.AUTOTUNE_CONFIGS`; 128-row tiles with 8 warps or <= 3 stages, where 4
    warps and deep pipelines run out of registers / shared memory). Without duplicates; every
    candidate has autotune off."""
    if configs is None:
        from .compile import AUTOTUNE_CONFIGS as configs
    base = base.replace(autotune=False)
    blocks = [(base.block_m, base.block_n)]
    if _one_d(pattern, base):
        blocks += [b for b in BLOCK_CONFIGS if head_dim <= 64 or b != (128, 128)]
    out = [base]
    for bm, bn in dict.fromkeys(blocks):
        for w, s in configs:
            if bm * bn > 64 * 64 and (s > 3 or (bm * bn >= 128 * 128 and w < 8)):
                continue
            c = base.replace(block_m=bm, block_n=bn, num_warps=w, num_stages=s)
            if c not in out:
                out.append(c)
    return out


def choose(cache: dict, key, candidates: list, run: Callable, timer: Callable):
    """The options kept for `key` in `cache`, timing `candidates` with
    `timer(lambda: run(c))` (`compile.pick_fastest`) on the first request of the key."""
    with _LOCK:
        hit = cache.get(key)
    if hit is not None:
        return hit
    from .compile import pick_fastest
    best = pick_fastest(candidates, run, timer)
    with _LOCK:
        return cache.setdefault(key, best)


def _sibling(kern, options: CompileOptions):
    """A Kernel of `kern.pattern` with `options` (kept per kernel, so schedules and loaded
    modules are reused across calls)."""
    from .compile import Kernel
    with _LOCK:
        per = _SIBLINGS.setdefault(kern, {})
        sib = per.get(options)
        if sib is None:
            sib = per[options] = Kernel(kern.pattern, options)
    return sib


def tuned_forward(kern, q, k, v, inputs: dict, scale: float, need_lse: bool,
                  timer: Optional[Callable] = None):
    """Forward of `kern` on CUDA tensors with the options tuned for the call's shape class
    (timing the candidates on its first call). Returns (out, lse) like the "triton" runner.
    `timer(fn) -> seconds` defaults to `runtime.bench.time_fn` (1 warm-up, 3 repetitions)."""
    from .compile import _run_triton
    if timer is None:
        from .bench import time_fn

        def timer(fn):
            return time_fn(fn, q.device, warmup=1, reps=3)

    def run(options):
        sib = _sibling(kern, options)
        result = _run_triton(sib, q, k, v, inputs, scale, need_lse)
        if sib.last_stats is not None:
            kern.last_stats = sib.last_stats
        return result

    key = shape_class(kern.pattern, q, k, v)
    best = choose(kern._tuned, key, candidate_options(kern.options, kern.pattern, q.shape[3]),
                  run, timer)
    return run(best)

