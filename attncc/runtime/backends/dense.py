"""`backend="dense"`: attention over the pattern's dense mask with PyTorch SDPA.

For small shapes on CPU this is the fastest path: one `scaled_dot_product_attention` call with
a bool mask `[B|1, H|1, Lq, Lkv]` (shared over batch and heads when the mask does not depend
on them; cached per shape for static masks). Patterns with a `score` modifier, calls that
need the log-sum-exp, and float64 inputs compute scores explicitly instead (q·kᵀ, the score
modifier lowered to torch, masked softmax in float32, or float64 for float64 inputs). Rows
with no visible key give 0 and lse −inf. Any device; differentiable through autograd; memory
O(Lq·Lkv) per (batch, head) — the cost rule (`attncc.runtime.choose`) only picks it for small
shapes.
"""
from __future__ import annotations

import functools
import math
from typing import Mapping, Optional

import torch

from ...ir.nodes import Blocks, Load, Route, Var, walk

__all__ = ["dense_forward", "mask_is_shared"]


def mask_is_shared(pattern) -> bool:
    """True when the mask is the same for every batch and head (no b, h, inputs, selectors)."""
    for n in walk(pattern.mask):
        if isinstance(n, (Load, Route, Blocks)) or (isinstance(n, Var) and n.name in ("b", "h")):
            return False
    return True


@functools.lru_cache(maxsize=16)
def _static_mask(pattern, q_len: int, kv_len: int, device: str) -> torch.Tensor:
    return pattern.dense_mask(q_len, kv_len, heads=1, batch=1, device=device)


@torch.no_grad()  # a bool mask: routing means of q and k need no autograd graph
def _mask(pattern, q, k, inputs) -> torch.Tensor:
    B, H, Lq = q.shape[:3]
    Lkv = k.shape[2]
    if mask_is_shared(pattern) and not pattern.inputs:
        return _static_mask(pattern, Lq, Lkv, str(q.device))
    extra = {}
    if any(isinstance(n, Route) for n in walk(pattern.mask)):
        declared = {d.name for d in pattern.inputs}
        extra = {n: t for n, t in (("query", q), ("key", k)) if n not in declared}
    return pattern.dense_mask(Lq, Lkv, heads=H, batch=B, inputs={**inputs, **extra},
                              device=q.device)


def dense_forward(pattern, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                  scale: Optional[float] = None, inputs: Mapping[str, torch.Tensor] = {},
                  need_lse: bool = False):
    """Dense masked attention: q [B, Hq, Lq, D], k [B, Hkv, Lkv, D], v [B, Hkv, Lkv, Dv]
    (Hq % Hkv == 0), inputs already checked. Returns (out [B, Hq, Lq, Dv] in q's dtype,
    lse float32 [B, Hq, Lq] or None when not `need_lse` and SDPA served the call)."""
    B, Hq, Lq, D = q.shape
    Hkv = k.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    mask = _mask(pattern, q, k, inputs)
    fast = (pattern.score is None and not need_lse and q.dtype != torch.float64)
    if fast:
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=scale, enable_gqa=Hq != Hkv)
        out = out.masked_fill(~mask.any(-1, keepdim=True), 0)
        lse = None
    else:
        from ...ir.lower_torch import to_score_mod
        fdtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        r = Hq // Hkv
        kk = k.to(fdtype).repeat_interleave(r, 1) if r > 1 else k.to(fdtype)
        vv = v.to(fdtype).repeat_interleave(r, 1) if r > 1 else v.to(fdtype)
        s = q.to(fdtype) @ kk.transpose(-1, -2) * scale
        score_mod = to_score_mod(pattern, inputs, q_len=Lq, kv_len=k.shape[2], heads=Hq,
                                 float_dtype=fdtype)
        if score_mod is not None:
            dev = q.device
            ar = lambda n: torch.arange(n, device=dev)  # noqa: E731
            s = score_mod(s, ar(B).view(-1, 1, 1, 1), ar(Hq).view(1, -1, 1, 1),
                          ar(Lq).view(1, 1, -1, 1), ar(k.shape[2]).view(1, 1, 1, -1))
        s = s.masked_fill(~mask, float("-inf"))
        lse = torch.logsumexp(s, dim=-1)
        empty = torch.isneginf(lse)
        p = torch.exp(s - torch.where(empty, torch.zeros_like(lse), lse)[..., None])
        out = (p @ vv).to(q.dtype)
        lse = lse.to(torch.float32)
    if pattern.output_scale is not None:
        from ...ir.lower_torch import output_scale
        w = output_scale(pattern, inputs, batch=B, heads=Hq, q_len=Lq, kv_len=k.shape[2],
                         device=q.device)
        out = out * w[..., None].to(out.dtype)
    return out, lse
