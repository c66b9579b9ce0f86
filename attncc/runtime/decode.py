"""Decoding against a KV cache: `Kernel.decode`, its validation, backends and cache helpers.

    out = kern.decode(q, k_cache, v_cache, cache_seqlens, block_table=None, *, scale=None,
                      return_lse=False, **inputs)

q [B, Hq, Lq, D] holds the new queries; `cache_seqlens` int32 [B] counts each sequence's
valid cached tokens, the Lq new ones included (already written, e.g. by `append_kv`).
Contiguous cache: k_cache [B, Hkv, Lmax, D], v_cache [B, Hkv, Lmax, Dv]. Paged cache:
k_cache [num_pages, Hkv, page_size, D], v_cache [num_pages, Hkv, page_size, Dv] and
block_table int32 [B, max_pages] (the page of each logical block of each sequence).

Semantics: for sequence b with L = cache_seqlens[b], the result is the last Lq rows of the
square problem `kern(Q_b, K_b, V_b)` with Q_LEN = KV_LEN = L, K_b/V_b the first L cached
tokens in logical order and the new queries at positions L − Lq … L − 1 (so `q` in a spec is
the absolute position). Inputs declared with a `k` dimension cover cache positions
([B, Lmax, …]; Lmax = max_pages · page_size when paged); inputs with a `q` dimension are given
for the Lq new rows only; `q_blocks` / `k_blocks` dimensions both count blocks over the cache
positions (⌈Lmax/β⌉; sequence b's square gate is gate[b, :, :⌈L/β⌉, :⌈L/β⌉]).

Backends (the kernel's `backend`; None picks "triton" on CUDA and "torch" on CPU):
    triton / interpret  the generated split-KV decode kernel (`codegen/decode.py`)
    torch (or flex)     gathers only the key ranges of `schedule.decode.key_ranges`, then
                        attention in float32 with torch ops (the fast CPU path)
    reference           gathers the first L tokens, runs `attncc.reference` (float64) on the
                        square problem and takes the last Lq rows (for checking; O(L²))
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from ..ir.inputs import InputError, InputTypeError, check_inputs
from ..ir.lower_torch import _Program
from ..schedule.decode import (DecodeError, block_selection, decode_pattern, decode_schedule,
                               key_ranges, row_positions, tile_counts)

__all__ = ["decode", "check_decode", "schedule_for", "gather_kv", "decode_tiles", "DecodeCall", "append_kv", "DecodeError",
           "DECODE_BACKENDS"]

DECODE_BACKENDS = ("triton", "interpret", "torch", "flex", "reference")


def _dt(t) -> str:
    return str(t.dtype).replace("torch.", "")


@dataclasses.dataclass
class DecodeCall:
    """A validated decode call (shapes resolved)."""
    B: int
    Hq: int
    Hkv: int
    Lq: int
    D: int
    Dv: int
    capacity: int           # cache positions per sequence (Lmax, or max_pages · page_size)
    page_size: Optional[int]
    inputs: dict


def check_decode(pattern, q, k_cache, v_cache, cache_seqlens, block_table, inputs) -> DecodeCall:
    """Validate a decode call; raises InputError / InputTypeError naming the argument."""
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor):
            raise InputTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            want = ("[batch, heads, new_tokens, head_dim]" if name == "q" else
                    "[batch, kv_heads, cache_len, head_dim]" if block_table is None else
                    "[num_pages, kv_heads, page_size, head_dim]")
            raise InputError(f"{name} must be 4-D {want}, got shape {list(t.shape)}")
    B, Hq, Lq, D = q.shape
    if Lq < 1:
        raise InputError("q must hold at least one new token (q.shape[2] >= 1)")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise InputTypeError(f"q has dtype {_dt(q)}; supported: float16, bfloat16, float32, float64")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != q.dtype:
            raise InputTypeError(f"{name} has dtype {_dt(t)}, expected {_dt(q)} (the dtype of q)")
        if t.device != q.device:
            raise InputError(f"{name} is on {t.device}, expected {q.device} (the device of q)")
    Hkv = k_cache.shape[1]
    if v_cache.shape[:3] != k_cache.shape[:3]:
        raise InputError(f"v_cache has shape {list(v_cache.shape)}, expected "
                         f"{list(k_cache.shape[:3])} + [head_dim_v] (the leading dims of k_cache)")
    if k_cache.shape[3] != D:
        raise InputError(f"k_cache has head dim {k_cache.shape[3]}, expected {D} (the head dim of q)")
    if Hkv == 0 or Hq % Hkv:
        raise InputError(f"q has {Hq} heads, not a multiple of the {Hkv} heads of k_cache "
                         f"(grouped-query attention needs Hq % Hkv == 0)")
    if not isinstance(cache_seqlens, torch.Tensor):
        raise InputTypeError(f"cache_seqlens must be an int32 torch.Tensor [B], got "
                             f"{type(cache_seqlens).__name__}")
    if cache_seqlens.dtype != torch.int32:
        raise InputTypeError(f"cache_seqlens must have dtype int32, got {_dt(cache_seqlens)}")
    if tuple(cache_seqlens.shape) != (B,):
        raise InputError(f"cache_seqlens must have shape [{B}] (one length per sequence of q), "
                         f"got {list(cache_seqlens.shape)}")
    if cache_seqlens.device != q.device:
        raise InputError(f"cache_seqlens is on {cache_seqlens.device}, expected {q.device}")
    page_size = None
    if block_table is None:
        if k_cache.shape[0] != B:
            raise InputError(f"k_cache has batch size {k_cache.shape[0]}, expected {B} (the batch "
                             "size of q; pass block_table= for a paged cache)")
        capacity = k_cache.shape[2]
    else:
        if not isinstance(block_table, torch.Tensor):
            raise InputTypeError(f"block_table must be an int32 torch.Tensor [B, max_pages], "
                                 f"got {type(block_table).__name__}")
        if block_table.dtype != torch.int32:
            raise InputTypeError(f"block_table must have dtype int32, got {_dt(block_table)}")
        if block_table.dim() != 2 or block_table.shape[0] != B:
            raise InputError(f"block_table must have shape [{B}, max_pages], got "
                             f"{list(block_table.shape)}")
        if block_table.device != q.device:
            raise InputError(f"block_table is on {block_table.device}, expected {q.device}")
        page_size = k_cache.shape[2]
        capacity = block_table.shape[1] * page_size
    lens = cache_seqlens.to(torch.int64)
    if B:
        lo, hi = int(lens.min()), int(lens.max())
        if lo < Lq:
            b = int(torch.argmin(lens))
            raise InputError(f"cache_seqlens[{b}] = {lo} is less than the {Lq} new tokens of q "
                             "(cache_seqlens counts the new tokens too)")
        if hi > capacity:
            b = int(torch.argmax(lens))
            where = (f"the cache length {capacity} of k_cache" if block_table is None else
                     f"the {block_table.shape[1]} pages x {page_size} tokens of block_table")
            raise InputError(f"cache_seqlens[{b}] = {hi} exceeds {where}")
        if block_table is not None:
            need = (lens + page_size - 1) // page_size                     # pages in use
            used = torch.arange(block_table.shape[1], device=q.device)[None] < need[:, None]
            pages = block_table.to(torch.int64)
            bad = used & ((pages < 0) | (pages >= k_cache.shape[0]))
            if bool(bad.any()):
                b, j = (int(x) for x in bad.nonzero()[0])
                raise InputError(f"block_table[{b}, {j}] = {int(pages[b, j])} is not a page of "
                                 f"k_cache (expected 0 <= page < {k_cache.shape[0]})")
    declared = _call_pattern(pattern)
    inputs = check_inputs(declared, inputs, batch=B, heads=Hq, q_len=Lq, kv_len=capacity,
                          device=q.device)
    return DecodeCall(B, Hq, Hkv, Lq, D, v_cache.shape[3], capacity, page_size, inputs)


def _call_pattern(pattern):
    """Declarations as checked at a decode call: `q_blocks` counts cache blocks like `k_blocks`."""
    decls = tuple(dataclasses.replace(d, dims=tuple("k_blocks" if x == "q_blocks" else x
                                                    for x in d.dims)) for d in pattern.inputs)
    return dataclasses.replace(pattern, inputs=decls)


def schedule_for(kern, heads: int):
    """The kernel's `DecodeSchedule` for `heads` query heads (built once per head count)."""
    cache = kern.__dict__.setdefault("_decode_schedules", {})
    sched = cache.get(heads)
    if sched is None:
        sched = cache[heads] = decode_schedule(kern.pattern, heads)
    return sched


# ---- reading the cache ------------------------------------------------------------------------

def gather_kv(cache: torch.Tensor, pos: torch.Tensor, block_table: Optional[torch.Tensor]):
    """Cached vectors at logical positions `pos` int64 [B, Hkv, N] (clamped to valid slots)
    → [B, Hkv, N, D]. Contiguous cache [B, Hkv, Lmax, D] or paged [pages, Hkv, ps, D]."""
    B, Hkv, N = pos.shape
    bi = torch.arange(B, device=pos.device)[:, None, None]
    hi = torch.arange(Hkv, device=pos.device)[None, :, None]
    if block_table is None:
        return cache[bi, hi, pos.clamp(0, cache.shape[2] - 1)]
    ps = cache.shape[2]
    blk = (pos // ps).clamp(0, block_table.shape[1] - 1)
    page = block_table.to(torch.int64)[bi.expand(B, Hkv, N), blk].clamp(0, cache.shape[0] - 1)
    return cache[page, hi, pos % ps]


def _prefix(cache, b: int, L: int, block_table):
    """The first L cached tokens of sequence b in logical order: [1, Hkv, L, D]."""
    pos = torch.arange(L, device=cache.device)[None, None].expand(1, cache.shape[1], L)
    if block_table is None:
        return cache[b:b + 1, :, :L]
    return gather_kv(cache, pos, block_table[b:b + 1])


# ---- backends -----------------------------------------------------------------------------------

def _run_reference(kern, q, k_cache, v_cache, seqlens, block_table, call: DecodeCall, scale):
    from ..reference import reference
    pattern = kern.pattern
    out = torch.zeros(call.B, call.Hq, call.Lq, call.Dv, dtype=torch.float64, device=q.device)
    lse = torch.zeros(call.B, call.Hq, call.Lq, dtype=torch.float64, device=q.device)
    blocks = _block_sizes(pattern)
    for b in range(call.B):
        L = int(seqlens[b])
        qf = q.new_zeros(1, call.Hq, L, call.D)
        qf[:, :, L - call.Lq:] = q[b:b + 1]
        K, V = _prefix(k_cache, b, L, block_table), _prefix(v_cache, b, L, block_table)
        ins = {name: _square_input(pattern.input(name), t, b, L, call.Lq, blocks.get(name))
               for name, t in call.inputs.items()}
        o, l = reference(pattern, qf, K, V, scale=scale, return_lse=True, **ins)
        out[b], lse[b] = o[0, :, L - call.Lq:], l[0, :, L - call.Lq:]
    return out, lse


def _block_sizes(pattern) -> dict:
    from ..ir.inputs import block_sizes
    sizes = block_sizes(pattern)
    if len(set(sizes.values())) == 1:
        beta = next(iter(sizes.values()))
        return {d.name: sizes.get(d.name, beta) for d in pattern.inputs}
    return sizes


def _square_input(decl, t: torch.Tensor, b: int, L: int, lq: int, beta) -> torch.Tensor:
    """Sequence b's slice of input `t` for the square problem of length L."""
    index, qdims = [], []
    for i, dim in enumerate(decl.dims):
        if dim == "b":
            index.append(slice(b, b + 1))
        elif dim == "k":
            index.append(slice(0, L))
        elif dim in ("q_blocks", "k_blocks"):
            index.append(slice(0, -(-L // beta)))
        else:
            index.append(slice(None))
            if dim == "q":
                qdims.append(i)
    out = t[tuple(index)]
    for i in qdims:  # given rows sit at the end of a length-L axis; earlier rows are zeros
        shape = list(out.shape)
        shape[i] = L - lq
        out = torch.cat([out.new_zeros(shape), out], dim=i)
    return out


def _plan(kern, q, seqlens, call: DecodeCall):
    """(decode pattern, selections by input name, key ranges [B, Hkv, R, 2])."""
    sched = schedule_for(kern, call.Hq)
    forms = kern.__dict__.setdefault("_decode_patterns", {})
    if call.Lq not in forms:
        forms[call.Lq] = decode_pattern(kern.pattern, call.Lq)
    pattern, names = forms[call.Lq]
    sels_by_node = {node: block_selection(node, call.inputs[node.input], seqlens, call.Lq, call.Hq)
                    for node in names}
    ranges = key_ranges(sched, seqlens, call.Lq, call.Hkv, inputs=call.inputs,
                        selections=sels_by_node)
    selections = {names[n]: s for n, s in sels_by_node.items()}
    return pattern, selections, ranges


def _positions(ranges: torch.Tensor):
    """Flatten ranges [B, Hkv, R, 2] to positions int64 [B, Hkv, N] and validity [B, Hkv, N]
    (N = the largest number of kept keys over (sequence, key head))."""
    lo, hi = ranges[..., 0], ranges[..., 1]
    cnt = (hi - lo).clamp(min=0)
    cum = torch.cumsum(cnt, -1)
    total = cum[..., -1]
    N = max(int(total.max()) if total.numel() else 0, 1)
    j = torch.arange(N, device=ranges.device).expand(*cnt.shape[:2], N).contiguous()
    r = torch.searchsorted(cum, j, right=True).clamp(max=cnt.shape[-1] - 1)
    start = cum.gather(-1, r) - cnt.gather(-1, r)
    pos = lo.gather(-1, r) + (j - start)
    valid = j < total[..., None]
    return torch.where(valid, pos, 0), valid


def _run_torch(kern, q, k_cache, v_cache, seqlens, block_table, call: DecodeCall, scale):
    """Gather the kept key ranges, then attention in float32 (see module doc)."""
    pattern, selections, ranges = _plan(kern, q, seqlens, call)
    kern.last_decode = {"key_ranges": ranges,
                        "keys_read": int((ranges[..., 1] - ranges[..., 0]).sum())}
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    if block_table is None and ranges.shape[2] == 1 and bool((ranges == ranges[:1, :1]).all()):
        # One key range shared by every (sequence, key head): slice the cache, no copy.
        lo, hi = (int(x) for x in ranges[0, 0, 0])
        B, Hkv = ranges.shape[:2]
        pos = torch.arange(lo, hi, device=q.device).expand(B, Hkv, hi - lo)
        valid = torch.ones((), dtype=torch.bool, device=q.device).expand(B, Hkv, hi - lo)
        K, V = k_cache[:, :, lo:hi].to(work), v_cache[:, :, lo:hi].to(work)
    else:
        pos, valid = _positions(ranges)                                   # [B, Hkv, N]
        K = gather_kv(k_cache, pos, block_table).to(work)                 # [B, Hkv, N, D]
        V = gather_kv(v_cache, pos, block_table).to(work)
    B, Hkv, N = pos.shape
    G, Lq = call.Hq // Hkv, call.Lq
    qg = q.to(work).reshape(B, Hkv, G * Lq, call.D)
    s = (qg @ K.transpose(-1, -2)).view(B, Hkv, G, Lq, N) * scale
    dev = q.device
    L = seqlens.to(torch.int64).view(B, 1, 1, 1, 1)
    bi = torch.arange(B, device=dev).view(B, 1, 1, 1, 1)
    hh = (torch.arange(Hkv, device=dev).view(1, Hkv, 1) * G
          + torch.arange(G, device=dev).view(1, 1, G)).view(1, Hkv, G, 1, 1)
    qi = row_positions(seqlens, Lq).view(B, 1, 1, Lq, 1)
    ki = pos.view(B, Hkv, 1, 1, N)
    lengths = {"Q_LEN": L, "KV_LEN": L, "HEADS": call.Hq}
    ins = dict(call.inputs, **selections)
    if pattern.score is not None:
        prog = _Program(pattern.score, layout=None, inputs=ins, lengths=lengths, fdtype=work,
                        allow_score=True)
        s = torch.as_tensor(prog(bi, hh, qi, ki, s), dtype=work, device=dev).expand(s.shape)
    prog = _Program(pattern.mask, layout=None, inputs=ins, lengths=lengths, fdtype=work)
    keep = prog(bi, hh, qi, ki)
    keep = valid.view(B, Hkv, 1, 1, N) & (torch.as_tensor(keep, device=dev) if not
                                          isinstance(keep, torch.Tensor) else keep)
    s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, -1)
    empty = torch.isneginf(lse)
    p = torch.exp(s - torch.where(empty, 0.0, lse)[..., None])
    out = (p.view(B, Hkv, G * Lq, N) @ V).view(B, Hkv, G, Lq, call.Dv)
    if pattern.output_scale is not None:
        prog = _Program(pattern.output_scale, layout=None, inputs=ins, lengths=lengths,
                        fdtype=work)
        w = prog(bi, hh, qi, torch.zeros((), dtype=torch.int64, device=dev))
        out = out * torch.as_tensor(w, dtype=work, device=dev)
    return out.reshape(B, call.Hq, Lq, call.Dv), lse.reshape(B, call.Hq, Lq)


def _run_kernel(kern, q, k_cache, v_cache, seqlens, block_table, call: DecodeCall, scale):
    from .decode_launch import run_decode
    pattern, selections, ranges = _plan(kern, q, seqlens, call)
    return run_decode(kern, pattern, q, k_cache, v_cache, seqlens, block_table, ranges,
                      dict(call.inputs, **selections), scale)


_RUNNERS = {"reference": _run_reference, "torch": _run_torch, "flex": _run_torch,
            "triton": _run_kernel, "interpret": _run_kernel}


def decode(kern, q, k_cache, v_cache, cache_seqlens, block_table=None, *, scale=None,
           return_lse: bool = False, **inputs):
    """`Kernel.decode` (see the module docstring). Returns out [B, Hq, Lq, Dv] in q's dtype,
    and with `return_lse=True` also lse float32 [B, Hq, Lq] (natural log, -inf for a row
    that keeps no key)."""
    from .compile import resolve_backend
    pattern = kern.pattern
    call = check_decode(pattern, q, k_cache, v_cache, cache_seqlens, block_table, inputs)
    scale = kern._scale(scale, call.D)
    requested = kern.options.backend
    if requested is None:
        backend = "triton" if q.device.type == "cuda" else "torch"
    elif requested in ("torch", "flex"):
        backend = requested
    else:
        backend = resolve_backend(requested, q.device)
    if backend not in _RUNNERS:
        raise ValueError(f"backend {backend!r} has no decode path; expected one of "
                         f"{', '.join(DECODE_BACKENDS)}")
    if q.dtype == torch.float64 and backend in ("triton", "interpret"):
        raise InputTypeError(f"q has dtype float64; backend '{backend}' supports float16, "
                             "bfloat16 and float32 (backend='reference' takes float64)")
    schedule_for(kern, call.Hq)  # pattern errors (route, layouts) before any work
    if call.B == 0:
        out = q.new_zeros(0, call.Hq, call.Lq, call.Dv)
        lse = torch.zeros(0, call.Hq, call.Lq, dtype=torch.float32, device=q.device)
    else:
        with torch.no_grad():
            out, lse = _RUNNERS[backend](kern, q, k_cache, v_cache, cache_seqlens, block_table,
                                         call, scale)
        out, lse = out.to(q.dtype), lse.to(torch.float32)
    return (out, lse) if return_lse else out


# ---- serving-loop helpers ------------------------------------------------------------------------

def append_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              cache_seqlens: torch.Tensor, block_table: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Write new keys/values into a cache, in place, after each sequence's valid tokens.

    k [B, Hkv, Ln, D], v [B, Hkv, Ln, Dv]; cache_seqlens int32 [B] = tokens already cached.
    Contiguous cache [B, Hkv, Lmax, D(v)], or paged [num_pages, Hkv, page_size, D(v)] with
    block_table int32 [B, max_pages] (pages for the new positions must be assigned already).
    Token j of sequence b goes to logical position cache_seqlens[b] + j.
    Returns the new lengths cache_seqlens + Ln (int32), to pass to `Kernel.decode`.
    """
    for name, t, c in (("k", k, k_cache), ("v", v, v_cache)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise InputError(f"{name} must be a 4-D tensor [batch, kv_heads, new_tokens, dim]")
        if t.shape[1] != c.shape[1] or t.shape[3] != c.shape[3]:
            raise InputError(f"{name} has shape {list(t.shape)}; its heads and last dim must "
                             f"match the cache {list(c.shape)}")
    if not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.dtype != torch.int32:
        raise InputTypeError("cache_seqlens must be an int32 torch.Tensor [B]")
    B, Hkv, Ln, _ = k.shape
    if tuple(cache_seqlens.shape) != (B,) or v.shape[:3] != k.shape[:3]:
        raise InputError(f"cache_seqlens must have shape [{B}] and v the leading dims of k")
    if block_table is not None and (block_table.dtype != torch.int32 or block_table.dim() != 2
                                    or block_table.shape[0] != B):
        raise InputTypeError(f"block_table must be an int32 tensor [{B}, max_pages]")
    capacity = (k_cache.shape[2] if block_table is None
                else block_table.shape[1] * k_cache.shape[2])
    new = cache_seqlens.to(torch.int64) + Ln
    if B and int(new.max()) > capacity:
        raise InputError(f"appending {Ln} tokens exceeds the cache capacity of {capacity} "
                         f"tokens per sequence (cache_seqlens max {int(cache_seqlens.max())})")
    pos = (cache_seqlens.to(torch.int64)[:, None] + torch.arange(Ln, device=k.device))
    pos = pos[:, None].expand(B, Hkv, Ln)
    bi = torch.arange(B, device=k.device)[:, None, None].expand(B, Hkv, Ln)
    hi = torch.arange(Hkv, device=k.device)[None, :, None].expand(B, Hkv, Ln)
    for cache, t in ((k_cache, k), (v_cache, v)):
        if block_table is None:
            cache[bi, hi, pos] = t.to(cache.dtype)
        else:
            ps = cache.shape[2]
            page = block_table.to(torch.int64)[bi, pos // ps]
            cache[page, hi, pos % ps] = t.to(cache.dtype)
    return new.to(torch.int32)


def decode_tiles(ranges: torch.Tensor, block_n: int) -> int:
    """Key tiles of `block_n` tokens a decode step with `ranges` [B, Hkv, R, 2] visits."""
    return int(tile_counts(ranges, block_n).sum())

