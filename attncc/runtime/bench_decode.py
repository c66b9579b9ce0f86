"""Decode benchmarks: one decode step of a pattern against PyTorch baselines.

For one pattern, batch, cache length and number of new tokens per sequence, `bench_decode`
times

    attncc     `Kernel.decode` (on CPU the torch path: gather the kept key ranges, attend;
               on CUDA the generated split-KV kernel)
    sdpa       `scaled_dot_product_attention` over the whole cache with the pattern's bool
               mask of the new rows (every cached key read)
    flex       compiled FlexAttention with its own `create_block_mask` for the new rows
               (query positions offset to L − Lq …; build time reported apart)

and reports the median step time, new tokens per second (batch · Lq / step) and the bytes
of K and V each implementation reads (attncc: its kept keys; SDPA: the whole cache; flex:
the key blocks of its BlockMask, counted per key head).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..ir.lower_torch import _Program
from ..schedule.decode import block_selection, decode_pattern, row_positions
from .bench import _sync, time_fn


@dataclass(frozen=True)
class DecodeTiming:
    name: str
    ms: float
    bytes_read: float
    note: str = ""


@dataclass(frozen=True)
class DecodeBenchResult:
    pattern: str
    batch: int
    cache_len: int
    lq: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str
    device: str
    paged: bool
    timings: tuple
    extra: dict = field(default_factory=dict)

    def timing(self, name: str) -> DecodeTiming:
        return next(t for t in self.timings if t.name == name)

    def ratio(self, name: str) -> float:
        """time(name) / time(attncc): above 1 means attncc is faster."""
        return self.timing(name).ms / self.timing("attncc").ms

    def rows(self) -> list:
        out = []
        for t in self.timings:
            if math.isnan(t.ms):
                out.append(f"| {t.name} | – | – | – | – | {t.note} |")
                continue
            tps = self.batch * self.lq / (t.ms / 1e3)
            out.append(f"| {t.name} | {t.ms:.3f} | {tps:,.0f} | {t.bytes_read / 2**20:,.1f} | "
                       f"{self.ratio(t.name):.2f} | {t.note} |")
        return out

    def __str__(self) -> str:
        head = (f"{self.pattern} decode: B={self.batch} cache={self.cache_len} Lq={self.lq} "
                f"Hq={self.heads} Hkv={self.kv_heads} D={self.head_dim} {self.dtype} on "
                f"{self.device}{' paged' if self.paged else ''}")
        lines = [head, "| impl | ms/step | tokens/s | MiB K+V read | x attncc time | note |",
                 "|---|---|---|---|---|---|"] + self.rows()
        lines += [f"{k}: {v:.1f}" if isinstance(v, float) else f"{k}: {v}"
                  for k, v in self.extra.items()]
        return "\n".join(lines)


def decode_mask(kern, seqlens: torch.Tensor, lq: int, heads: int, Lmax: int,
                inputs: dict) -> torch.Tensor:
    """bool [B, heads, lq, Lmax]: which cached keys each new row keeps (keys ≥ L false)."""
    pattern, names = decode_pattern(kern.pattern, lq)
    ins = dict(inputs)
    for node, nm in names.items():
        ins[nm] = block_selection(node, inputs[node.input], seqlens, lq, heads)
    B = seqlens.shape[0]
    dev = seqlens.device
    L = seqlens.to(torch.int64).view(B, 1, 1, 1)
    prog = _Program(pattern.mask, layout=None, inputs=ins,
                    lengths={"Q_LEN": L, "KV_LEN": L, "HEADS": heads})
    b = torch.arange(B, device=dev).view(B, 1, 1, 1)
    h = torch.arange(heads, device=dev).view(1, heads, 1, 1)
    q = row_positions(seqlens, lq).view(B, 1, lq, 1)
    k = torch.arange(Lmax, device=dev).view(1, 1, 1, Lmax)
    keep = prog(b, h, q, k)
    keep = torch.as_tensor(keep, device=dev) & (k < L)
    return keep.expand(B, heads, lq, Lmax)


def bench_decode(pattern, *, batch: int = 1, cache_len: int = 4096, lq: int = 1, heads: int = 8,
                 kv_heads: int = 2, head_dim: int = 128, dtype=torch.float32, device="cpu",
                 page_size: Optional[int] = None, warmup: int = 1, reps: int = 5,
                 baselines=("sdpa", "flex"), options=None, seed: int = 0) -> DecodeBenchResult:
    """Time one decode step (every sequence full: cache_seqlens = cache_len)."""
    from .compile import CompileOptions, Kernel
    from .decode import check_decode
    from .verify import random_inputs
    device = torch.device(device)
    kern = Kernel(pattern, options or CompileOptions())
    gen = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=gen).to(dtype).to(device)  # noqa: E731
    q = mk(batch, heads, lq, head_dim)
    k, v = mk(batch, kv_heads, cache_len, head_dim), mk(batch, kv_heads, cache_len, head_dim)
    seqlens = torch.full((batch,), cache_len, dtype=torch.int32, device=device)
    table, kc, vc = None, k, v
    if page_size:
        n = cache_len // page_size
        perm = torch.randperm(batch * n, generator=gen)
        table = perm.view(batch, n).to(torch.int32).to(device)
        kc = torch.empty(batch * n, kv_heads, page_size, head_dim, dtype=dtype, device=device)
        vc = torch.empty_like(kc)
        src = perm.view(batch, n)
        kc[src.flatten()] = k.view(batch, kv_heads, n, page_size, head_dim).transpose(1, 2).flatten(0, 1)
        vc[src.flatten()] = v.view(batch, kv_heads, n, page_size, head_dim).transpose(1, 2).flatten(0, 1)
    inputs = random_inputs(pattern, batch=batch, heads=heads, q_len=cache_len, kv_len=cache_len,
                           generator=gen)
    for d in pattern.inputs:
        if "q" in d.dims:
            i = d.dims.index("q")
            inputs[d.name] = inputs[d.name].narrow(i, cache_len - lq, lq).contiguous()
    inputs = {n: t.to(device) for n, t in inputs.items()}
    check_decode(pattern, q, kc, vc, seqlens, table, inputs)
    elem = torch.finfo(dtype).bits // 8
    per_key = kv_heads * 2 * head_dim * elem

    timings = []
    ms = time_fn(lambda: kern.decode(q, kc, vc, seqlens, table, **inputs), device,
                 warmup=warmup, reps=reps)
    keys = kern.last_decode["keys_read"]
    timings.append(DecodeTiming("attncc", ms, keys * 2 * head_dim * elem,
                                "kept key ranges only"))
    extra = {}
    if "sdpa" in baselines:
        mask = decode_mask(kern, seqlens, lq, heads, cache_len, inputs)
        kx = k.repeat_interleave(heads // kv_heads, 1)
        vx = v.repeat_interleave(heads // kv_heads, 1)
        sdpa = torch.nn.functional.scaled_dot_product_attention
        ms = time_fn(lambda: sdpa(q, kx, vx, attn_mask=mask), device, warmup=warmup, reps=reps)
        timings.append(DecodeTiming("sdpa", ms, batch * cache_len * per_key,
                                    "whole cache, bool mask of the new rows"))
    if "flex" in baselines:
        timings.append(_bench_flex(kern, q, k, v, inputs, cache_len, lq, per_key, device,
                                   warmup, reps, extra))
    return DecodeBenchResult(pattern.name, batch, cache_len, lq, heads, kv_heads, head_dim,
                             str(dtype).replace("torch.", ""), str(device), table is not None,
                             tuple(timings), extra)


def _bench_flex(kern, q, k, v, inputs, L, lq, per_key, device, warmup, reps, extra):
    try:
        from torch.nn.attention.flex_attention import create_block_mask

        from ..ir.lower_torch import check_flex_supported, to_mask_mod, to_score_mod
        from .backends.flex import compiled_flex_attention
        check_flex_supported(kern.pattern)
        if any("q" in d.dims for d in kern.pattern.inputs):
            raise ValueError("inputs indexed by q are given for the new rows only")
    except (ImportError, ValueError) as e:
        return DecodeTiming("flex", float("nan"), float("nan"), f"not run: {e}")
    B, H = q.shape[:2]
    lower = dict(q_len=L, kv_len=L, heads=H)
    off = L - lq
    mm = to_mask_mod(kern.pattern, inputs, **lower)
    sm = to_score_mod(kern.pattern, inputs, **lower)
    mask_mod = lambda b, h, qi, ki: mm(b, h, qi + off, ki)  # noqa: E731
    score_mod = None if sm is None else (lambda s, b, h, qi, ki: sm(s, b, h, qi + off, ki))
    t0 = time.perf_counter()
    bm = create_block_mask(mask_mod, None, None, lq, L, device=str(device))
    _sync(device)
    extra["flex create_block_mask ms"] = (time.perf_counter() - t0) * 1e3
    flex = compiled_flex_attention()
    blocks = int(bm.kv_num_blocks.sum()) + (int(bm.full_kv_num_blocks.sum())
                                           if bm.full_kv_num_blocks is not None else 0)
    keys = min(blocks * bm.BLOCK_SIZE[1], L)
    fn = lambda: flex(q, k, v, score_mod=score_mod, block_mask=bm, enable_gqa=True)  # noqa: E731
    try:
        ms = time_fn(fn, device, warmup=max(1, warmup), reps=reps)
    except Exception as e:  # noqa: BLE001 - reported as a note
        return DecodeTiming("flex", float("nan"), float("nan"),
                            f"failed: {type(e).__name__}: {str(e)[:80]}")
    return DecodeTiming("flex", ms, B * keys * per_key,
                        f"compiled flex_attention, BlockMask of {blocks} key blocks")


def bench_decode_cli(pattern, args) -> str:
    """`attncc bench SPEC --decode`: one `bench_decode` run from parsed CLI arguments."""
    from .compile import CompileOptions
    dtype = getattr(torch, args.dtype) if getattr(args, "dtype", None) else torch.float32
    options = CompileOptions(block_n=args.block_n) if getattr(args, "block_n", None) else None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    res = bench_decode(pattern, batch=args.batch, cache_len=args.kv_len or 4096,
                       lq=args.q_len or 1, heads=args.heads or 8,
                       kv_heads=getattr(args, "kv_heads", None) or 2,
                       head_dim=args.head_dim, dtype=dtype, device=device,
                       page_size=getattr(args, "page_size", None), options=options,
                       baselines=("sdpa",) if getattr(args, "no_flex", False) else ("sdpa", "flex"))
    return str(res)
