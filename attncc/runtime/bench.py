"""Forward (and forward + backward) benchmarks: a pattern's attncc kernel against PyTorch
baselines.

For one pattern and shape, `bench_forward` times

    attncc          the compiled kernel (backend "triton" on CUDA; on CPU, "flex": the
                    pattern lowered to FlexAttention with attncc's analytic BlockMask — the
                    Triton interpreter is a verification tool, not a CPU fast path)
    sdpa            `scaled_dot_product_attention` without a mask (every pair computed)
    sdpa+mask       SDPA with the pattern's dense bool mask [B|1, H|1, Lq, Lkv]
    flex            compiled FlexAttention with a BlockMask from its own `create_block_mask`
                    over attncc's `mask_mod` lowering (its build time is reported apart)

and reports the median time of `reps` runs after `warmup` runs, the throughput counted on the
pairs the pattern keeps, 2·(D + Dv)·kept_pairs FLOP (so a dense kernel that computes masked
pairs gets no credit for them), and each time relative to attncc's.

With `backward=True` every implementation is timed as one training step: the forward, then
`out.backward(dout)` into q, k and v (gradients reset before each step), counted as
2·(4·D + 3·Dv)·kept_pairs FLOP (the forward's two products plus the backward's five: S
recomputed, dP, dV, dQ, dK). FlexAttention has no backward on CPU, so its row says so there.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..ir.nodes import Blocks, Load, Route, Var, walk
from ..ir.pattern import Pattern

# Dense bool masks above this many elements are not built for the SDPA+mask baseline.
MAX_DENSE_MASK_ELEMS = 1 << 33


@dataclass(frozen=True)
class Timing:
    """One measured implementation: median milliseconds, TFLOP/s on kept pairs, or a note
    saying why it was not measured (ms is NaN then)."""
    name: str
    ms: float
    tflops: float
    note: str = ""


@dataclass(frozen=True)
class BenchResult:
    pattern: str
    shape: tuple[int, ...]   # (batch, heads, q_len, kv_len, head_dim)
    dtype: str
    device: str
    backend: str
    kept_pairs: int
    density: float
    timings: tuple[Timing, ...]
    extra: dict = field(default_factory=dict)   # e.g. {"flex create_block_mask ms": ...}
    mode: str = "forward"                        # or "forward + backward" (a training step)

    def timing(self, name: str) -> Timing:
        for t in self.timings:
            if t.name == name:
                return t
        raise KeyError(name)

    def ratio(self, name: str) -> float:
        """time(name) / time(attncc): above 1 means attncc is faster."""
        return self.timing(name).ms / self.timing("attncc").ms

    def rows(self) -> list[str]:
        """Markdown table rows: | impl | ms | TFLOP/s | × attncc time | note |"""
        out = []
        for t in self.timings:
            if math.isnan(t.ms):
                out.append(f"| {t.name} | – | – | – | {t.note} |")
                continue
            r = t.ms / self.timing("attncc").ms
            out.append(f"| {t.name} | {t.ms:.3f} | {t.tflops:.4g} | {r:.2f} | {t.note} |")
        return out

    def __str__(self) -> str:
        B, H, Lq, Lkv, D = self.shape
        head = (f"{self.pattern} ({self.mode}): B={B} H={H} Lq={Lq} Lkv={Lkv} D={D} {self.dtype} on "
                f"{self.device}, attncc backend {self.backend}, density {self.density:.4f}")
        lines = [head, "", "| impl | ms | TFLOP/s (kept pairs) | time / attncc | note |",
                 "|---|---|---|---|---|", *self.rows()]
        lines += [f"{k}: {v:.3f}" for k, v in self.extra.items()]
        return "\n".join(lines)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device, *, warmup: int = 2, reps: int = 5) -> float:
    """Median wall time of `fn()` in milliseconds (CUDA: synchronized around each run)."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _mask_is_shared(pattern: Pattern) -> bool:
    """True when the mask is the same for every batch and head (no b, h, inputs, selectors)."""
    for n in walk(pattern.mask):
        if isinstance(n, (Load, Route, Blocks)) or (isinstance(n, Var) and n.name in ("b", "h")):
            return False
    return True


def dense_mask_for(pattern: Pattern, q, k, inputs: dict) -> torch.Tensor:
    """bool [B|1, H|1, Lq, Lkv] on q's device: the pattern's mask (collapsed over batch and
    heads when it does not depend on them)."""
    B, H, Lq = q.shape[:3]
    Lkv = k.shape[2]
    extra = {}
    if any(isinstance(n, Route) for n in walk(pattern.mask)):
        extra = {"query": q, "key": k}
    if _mask_is_shared(pattern):
        return pattern.dense_mask(Lq, Lkv, heads=1, batch=1, device=q.device)
    return pattern.dense_mask(Lq, Lkv, heads=H, batch=B, inputs={**inputs, **extra},
                              device=q.device)


def bench_forward(pattern: Pattern, *, batch: int = 1, heads: int = 8, q_len: Optional[int] = None,
                  kv_len: Optional[int] = None, head_dim: int = 64, dtype=None, device=None,
                  backend: Optional[str] = None, options=None, inputs: Optional[dict] = None,
                  warmup: Optional[int] = None, reps: Optional[int] = None,
                  baselines: tuple[str, ...] = ("sdpa", "sdpa+mask", "flex"),
                  seed: int = 0, backward: bool = False) -> BenchResult:
    """Time `pattern` on q [batch, heads, q_len, head_dim], k, v [batch, heads, kv_len,
    head_dim] (random N(0, 1)); see the module docstring for what is measured.

    Defaults: device CUDA when available; dtype bfloat16 on CUDA, float32 on CPU; backend
    "triton" on CUDA, on CPU the per-call default (`attncc.runtime.choose`: the attncc row's
    note says which backend the rule picked and why); lengths the layout's size (grid patterns) or 1024;
    warmup/reps 5/20 on CUDA, 1/3 on CPU. `inputs` overrides the random runtime inputs.
    `backward`: time forward + backward of q, k, v (see the module docstring).
    """
    from .compile import compile as compile_pattern
    from .verify import random_inputs

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    dtype = dtype or (torch.bfloat16 if gpu else torch.float32)
    backend = backend or ("triton" if gpu else None)  # CPU: the per-call default choice
    warmup = (5 if gpu else 1) if warmup is None else warmup
    reps = (20 if gpu else 3) if reps is None else reps
    if pattern.fixed_length is not None:  # a grid or segmented layout fixes the lengths
        q_len, kv_len = pattern.fixed_length, pattern.fixed_kv_length
    q_len = q_len or 1024
    kv_len = kv_len or q_len

    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, n, head_dim, generator=gen).to(device, dtype)
               .requires_grad_(backward) for n in (q_len, kv_len, kv_len))
    dout = torch.randn(batch, heads, q_len, head_dim, generator=gen).to(device, dtype)
    rand = random_inputs(pattern, batch=batch, heads=heads, q_len=q_len, kv_len=kv_len,
                         device=device, generator=gen)
    rand.update(inputs or {})

    mask_elems = (1 if _mask_is_shared(pattern) else batch * heads) * q_len * kv_len
    if mask_elems > MAX_DENSE_MASK_ELEMS:
        raise ValueError(f"pattern '{pattern.name}': counting kept pairs needs a dense mask of "
                         f"{mask_elems} elements (limit {MAX_DENSE_MASK_ELEMS}); use smaller shapes")
    mask = dense_mask_for(pattern, q, k, rand)
    kept = int(mask.sum()) * (batch * heads if mask.shape[:2] == (1, 1) else 1)
    total = batch * heads * q_len * kv_len
    flop = 2 * ((4 * head_dim + 3 * head_dim) if backward else (head_dim + head_dim)) * kept

    def tf(ms: float) -> float:
        return flop / (ms * 1e-3) / 1e12 if ms > 0 else float("nan")

    def step(fn):
        """fn() as timed: the forward alone, or forward + backward into fresh gradients."""
        if not backward:
            return fn

        def train():
            q.grad = k.grad = v.grad = None
            fn().backward(dout)
        return train

    kern = compile_pattern(pattern, backend=backend, options=options)
    ms = time_fn(step(lambda: kern(q, k, v, **rand)), device, warmup=warmup, reps=reps)
    note = f"backend {kern.last_backend}"
    if kern.last_choice is not None:  # chosen per call shape (attncc.runtime.choose)
        note += f", chosen: {kern.last_choice.reason}"
    backend = kern.last_backend
    timings = [Timing("attncc", ms, tf(ms), note)]
    extra: dict = {}
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if "sdpa" in baselines:
        timings.append(_guarded("sdpa", step(lambda: sdpa(q, k, v)), device, warmup, reps, tf,
                                "no mask: every pair computed"))
    if "sdpa+mask" in baselines:
        timings.append(_guarded("sdpa+mask", step(lambda: sdpa(q, k, v, attn_mask=mask)), device,
                                warmup, reps, tf, "dense bool mask"))
    if "flex" in baselines:
        if backward and not gpu:
            timings.append(Timing("flex", float("nan"), float("nan"),
                                  "not run: FlexAttention has no backward on CPU"))
        else:
            timings.append(_bench_flex(pattern, q, k, v, rand, device, warmup, reps, tf, extra,
                                       step))
    return BenchResult(pattern=pattern.name, shape=(batch, heads, q_len, kv_len, head_dim),
                       dtype=str(dtype).replace("torch.", ""), device=str(device),
                       backend=backend, kept_pairs=kept, density=kept / max(total, 1),
                       timings=tuple(timings), extra=extra,
                       mode="forward + backward" if backward else "forward")


def _guarded(name, fn, device, warmup, reps, tf, note) -> Timing:
    """Time `fn`; an out-of-memory error becomes a note instead of ending the run."""
    try:
        ms = time_fn(fn, device, warmup=warmup, reps=reps)
    except torch.OutOfMemoryError:
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
        return Timing(name, float("nan"), float("nan"), "out of memory")
    return Timing(name, ms, tf(ms), note)


def _bench_flex(pattern, q, k, v, inputs, device, warmup, reps, tf, extra, step) -> Timing:
    try:
        from torch.nn.attention.flex_attention import create_block_mask

        from ..ir.lower_torch import check_flex_supported, to_mask_mod, to_score_mod
        from .backends.flex import compiled_flex_attention
        check_flex_supported(pattern)
    except (ImportError, ValueError) as e:
        return Timing("flex", float("nan"), float("nan"), f"not run: {e}")
    B, H, Lq = q.shape[:3]
    Lkv = k.shape[2]
    fdtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    lower = dict(q_len=Lq, kv_len=Lkv, heads=H, float_dtype=fdtype)
    mask_mod = to_mask_mod(pattern, inputs, **lower)
    score_mod = to_score_mod(pattern, inputs, **lower)
    shared = _mask_is_shared(pattern)
    bm_b, bm_h = (None, None) if shared else (B, H)

    def build():
        return create_block_mask(mask_mod, bm_b, bm_h, Lq, Lkv, device=str(device))

    t0 = time.perf_counter()
    block_mask = build()
    _sync(device)
    extra["flex create_block_mask ms (first call)"] = (time.perf_counter() - t0) * 1e3
    flex = compiled_flex_attention()
    fn = step(lambda: flex(q, k, v, score_mod=score_mod, block_mask=block_mask))
    return _guarded("flex", fn, device, max(1, warmup), reps, tf,
                    "compiled flex_attention, own create_block_mask")


def bench_cli(pattern: Pattern, args) -> str:
    """`attncc bench SPEC`: one `bench_forward` run from parsed CLI arguments, as text."""
    from .options import CompileOptions
    dtype = getattr(torch, args.dtype) if getattr(args, "dtype", None) else None
    options = CompileOptions(block_m=args.block_m, block_n=args.block_n, tile_1d=args.tile_1d)
    res = bench_forward(pattern, batch=args.batch, heads=args.heads or 8, q_len=args.q_len,
                        kv_len=args.kv_len, head_dim=args.head_dim, dtype=dtype,
                        backend=args.backend, options=options,
                        backward=bool(getattr(args, "backward", False)))
    return str(res)
