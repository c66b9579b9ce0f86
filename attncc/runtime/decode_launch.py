"""Launching the generated split-KV decode kernel (`codegen/decode.py`) and merging its splits.

`run_decode` turns the key ranges of a decode step (`schedule.decode.key_ranges`) into the
kernel's launch tensors (the list of key tiles to visit, int32), picks the number of
splits, launches one program per (sequence · key head, split, row block) and merges the
per-split results by log-sum-exp:

    lse = log Σ_s exp(lse_s),   out = Σ_s exp(lse_s − lse) · out_s

(splits that kept nothing have lse_s = −inf and weight 0; a row no split kept has out 0 and
lse −inf). Generated modules are shared process-wide per (decode IR, options, interpreter).
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch

from ..schedule.decode import tile_counts
from . import cache
from .launch import _block_d, _interpreted, load_kernel

__all__ = ["decode_module", "run_decode", "decode_launch_tensors", "pick_splits", "decode_config",
           "merge_splits", "decode_case"]

_MODULES: dict = {}


def decode_module(kern, pattern):
    """The loaded decode kernel module of decode-form `pattern` for `kern`'s options."""
    from .compile import interpreter_enabled
    key = (pattern.ir_hash(), kern.options.key(), interpreter_enabled())
    module = _MODULES.get(key)
    if module is None:
        from ..codegen.decode import generate_decode
        source = generate_decode(pattern, kern.options)
        ckey = cache.cache_key(pattern.ir_hash(), kern.options.key(), "decode")
        path = cache.store_kernel(ckey, source, pattern.ir_text(), "decode kernel\n")
        module = _MODULES[key] = load_kernel(source, None if path is None else str(path))
    return module


def decode_launch_tensors(ranges: torch.Tensor, block_n: int):
    """(tiles int32 [B, Hkv, T, 2], counts int32 [B, Hkv]) for the kernel: the key tiles of
    `ranges` [B, Hkv, R, 2] (BLOCK_N-aligned; a tile shared by two ranges appears once per
    range), each as the keys [lo, hi) of its range inside it, in key order."""
    tc = tile_counts(ranges, block_n)                                     # [B, Hkv, R]
    cum = torch.cumsum(tc, -1)
    total = cum[..., -1] if cum.shape[-1] else torch.zeros(tc.shape[:2], dtype=torch.int64)
    T = max(int(total.max()) if total.numel() else 0, 1)
    j = torch.arange(T, device=ranges.device).expand(*tc.shape[:2], T).contiguous()
    r = torch.searchsorted(cum, j, right=True).clamp(max=tc.shape[-1] - 1)
    lo, hi = ranges[..., 0].gather(-1, r), ranges[..., 1].gather(-1, r)
    n = lo // block_n + (j - (cum.gather(-1, r) - tc.gather(-1, r)))
    t_lo = torch.maximum(lo, n * block_n)
    t_hi = torch.minimum(hi, (n + 1) * block_n)
    valid = j < total[..., None]
    tiles = torch.stack([torch.where(valid, t_lo, 0), torch.where(valid, t_hi, 0)], -1)
    return tiles.to(torch.int32).contiguous(), total.to(torch.int32).contiguous()


def pick_splits(max_tiles: int, programs: int, device: torch.device) -> int:
    """Splits of each (sequence, key head)'s tiles: enough programs to fill a GPU (about
    two per streaming multiprocessor), at least two tiles per split. On CPU (the interpreter)
    two splits whenever there are two tiles, so the merge is always exercised."""
    if max_tiles <= 1:
        return 1
    if device.type != "cuda":
        return 2
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = math.ceil(2 * sms / max(programs, 1))
    return max(1, min(want, max_tiles // 2, 64))


def decode_config(options, D: int, Dv: int) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) of a decode program: the options' tile and warps, at
    least 3 stages, and for head dims of 128 and more key tiles of at most 32 tokens and 8
    warps, so that K, V and the P·V accumulator fit the registers without spilling on sm_80
    and sm_90 (swept over the library by `bench/bench_decode.py --aot`; a smaller gate in
    tests/test_decode_aot.py)."""
    stages = max(int(options.num_stages), 3)
    if max(D, Dv) >= 128:
        return min(int(options.block_n), 32), max(int(options.num_warps), 8), stages
    return int(options.block_n), int(options.num_warps), stages


def run_decode(kern, pattern, q, k_cache, v_cache, seqlens, block_table, ranges, inputs: dict,
               scale: float, *, splits: Optional[int] = None):
    """Run the decode kernel: q [B, Hq, Lq, D], caches and seqlens as validated by
    `runtime.decode.check_decode`, `ranges` int64 [B, Hkv, R, 2] from `key_ranges`,
    `inputs` the decode-form pattern's inputs (selections included).
    Returns (out float32 [B, Hq, Lq, Dv], lse float32 [B, Hq, Lq])."""
    module = decode_module(kern, pattern)
    meta = module.META
    B, Hq, Lq, D = q.shape
    Hkv, Dv = k_cache.shape[1], v_cache.shape[3]
    G = Hq // Hkv
    block_n, warps, stages = decode_config(kern.options, D, Dv)
    tiles, counts = decode_launch_tensors(ranges, block_n)
    kern.last_decode = {"key_ranges": ranges, "tiles": int(counts.sum()),
                        "block_n": block_n,
                        "keys_read": int((ranges[..., 1] - ranges[..., 0]).sum())}
    block_m = max(16, min(128, 1 << max(0, (G * Lq - 1).bit_length())))
    m_blocks = -(-G * Lq // block_m)
    max_tiles = int(counts.max()) if counts.numel() else 0
    S = splits or pick_splits(max_tiles, B * Hkv * m_blocks, q.device)
    o_part = torch.empty(B, Hq, Lq, S, Dv, dtype=torch.float32, device=q.device)
    l_part = torch.empty(B, Hq, Lq, S, dtype=torch.float32, device=q.device)
    in_args = []
    for name, nd in zip(meta["inputs"], meta["input_dims"]):
        t = inputs[name]
        if t.dtype == torch.bool:
            t = t.to(torch.int8)
        in_args += [t, *t.stride(), *t.shape]
    paged = block_table is not None
    table = block_table if paged else seqlens
    page_size = k_cache.shape[2] if paged else 1
    grid = (B * Hkv, S, m_blocks)
    module.KERNEL[grid](
        q, k_cache, v_cache, o_part, l_part, seqlens, tiles, counts, table,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *o_part.stride(), *l_part.stride(),
        *tiles.stride()[:3], *counts.stride(), table.stride()[0],
        *in_args,
        Hq, Hkv, G, Lq, S, page_size, D, Dv, float(scale),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_block_d(D), BLOCK_DV=_block_d(Dv),
        PAGED=paged, DOT_FP32=_interpreted(module) and q.dtype == torch.bfloat16,
        num_warps=warps, num_stages=stages)
    return merge_splits(o_part, l_part)


def merge_splits(o_part: torch.Tensor, l_part: torch.Tensor):
    """Log-sum-exp merge of per-split results [..., S, Dv] / [..., S] → ([..., Dv], [...])."""
    lse = torch.logsumexp(l_part, -1)
    empty = torch.isneginf(lse)
    w = torch.exp(l_part - torch.where(empty, 0.0, lse)[..., None])
    w = torch.where(torch.isneginf(l_part), 0.0, w)
    out = (w[..., None] * o_part).sum(-2)
    return out, lse


# ---- ahead-of-time compile entry (attncc.runtime.aot) ------------------------------------------

def decode_case(spec: str, *, params: Optional[dict] = None, head_dim: int = 128,
                dtype: str = "bfloat16", batch: int = 2, heads: int = 32, kv_heads: int = 8,
                lq: int = 1, cache_len: int = 4096, page_size: Optional[int] = None,
                options: Optional[dict] = None, seed: int = 0) -> None:
    """Run the CUDA decode launch path on CPU tensors (launches are captured by
    `attncc.runtime.aot.capture_launches`; the kernel itself does not run): q [batch, heads,
    lq, head_dim] of `dtype`, a contiguous cache of `cache_len` tokens or, with `page_size`,
    a paged one with a shuffled block table, full sequences, the pattern's random inputs."""
    from .. import api
    from .compile import CompileOptions, Kernel
    from .decode import _run_kernel, check_decode
    from .verify import random_inputs
    pattern = api.load(spec, **(params or {})) if os.path.exists(str(spec)) \
        else api.parse(spec, **(params or {}))
    kern = Kernel(pattern, CompileOptions(**(options or {})))
    dt = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, lq, head_dim, generator=gen).to(dt)
    table = None
    if page_size:
        pages = batch * (cache_len // page_size)
        kc = torch.randn(pages, kv_heads, page_size, head_dim, generator=gen).to(dt)
        table = torch.randperm(pages, generator=gen).view(batch, -1).to(torch.int32)
    else:
        kc = torch.randn(batch, kv_heads, cache_len, head_dim, generator=gen).to(dt)
    vc = torch.randn(kc.shape, generator=gen).to(dt)
    seqlens = torch.full((batch,), cache_len, dtype=torch.int32)
    inputs = random_inputs(pattern, batch=batch, heads=heads, q_len=cache_len, kv_len=cache_len,
                           generator=gen)
    for d in pattern.inputs:  # q-dimension inputs cover the new rows only
        if "q" in d.dims:
            i = d.dims.index("q")
            inputs[d.name] = inputs[d.name].narrow(i, cache_len - lq, lq).contiguous()
    call = check_decode(pattern, q, kc, vc, seqlens, table, inputs)
    _run_kernel(kern, q, kc, vc, seqlens, table, call, head_dim ** -0.5)
