"""Attention of one rank's query rows against the keys it holds, at GLOBAL positions.

The pattern's mask and score modifier (lowered to torch by `attncc.ir.lower_torch`) are
evaluated at the global query / key positions of the rows and keys, so a rank computes exactly
its rows of the single-device result. It does so per key source — its own keys first (while
the fetched ones are in flight), then the fetched keys — and merges the partial results with
their log-sum-exp. Work and memory are O(B · Hq · rows · keys held): the rank's rows against
its own and fetched keys, never the whole sequence. Written with differentiable torch ops:
autograd gives dq, dk, dv.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional

import torch

from ..ir.lower_torch import output_scale, to_mask_mod, to_score_mod

# Query rows per step (bounds the [B, H, rows, keys] score block).
_SCORE_ELEMS = 1 << 24


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax precision: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def partial_attention(pattern, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      q_pos: torch.Tensor, k_pos: torch.Tensor, *, q_len: int, kv_len: int,
                      inputs: Mapping[str, torch.Tensor], scale: Optional[float] = None):
    """Attention of q [B, Hq, n, D] at global query positions q_pos int64 [n] over the keys
    k [B, Hkv, m, D], v [B, Hkv, m, Dv] at global key positions k_pos int64 [m] only.

    Returns (out, lse): out [B, Hq, n, Dv] normalized over these keys, lse [B, Hq, n] their
    log-sum-exp (-inf, and out 0, for a row that keeps none of them), both in the working
    dtype (`working_dtype`). The output scale is not applied (see `finish`)."""
    B, Hq, n, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    wdt = working_dtype(q.dtype)
    dev = q.device
    if n == 0 or k.shape[2] == 0:
        return (q.new_zeros(B, Hq, n, Dv, dtype=wdt),
                torch.full((B, Hq, n), float("-inf"), dtype=wdt, device=dev))
    mask_mod = to_mask_mod(pattern, inputs, q_len=q_len, kv_len=kv_len, heads=Hq)
    score_mod = to_score_mod(pattern, inputs, q_len=q_len, kv_len=kv_len, heads=Hq,
                             float_dtype=wdt)
    ratio = Hq // Hkv
    kf = k.to(wdt).repeat_interleave(ratio, 1) if ratio > 1 else k.to(wdt)
    vf = v.to(wdt).repeat_interleave(ratio, 1) if ratio > 1 else v.to(wdt)
    b = torch.arange(B, device=dev).view(B, 1, 1, 1)
    h = torch.arange(Hq, device=dev).view(1, Hq, 1, 1)
    kp = k_pos.to(dev).view(1, 1, 1, -1)
    outs, lses = [], []
    step = max(1, _SCORE_ELEMS // max(1, B * Hq * k.shape[2]))
    for r0 in range(0, n, step):
        qp = q_pos[r0:r0 + step].to(dev).view(1, 1, -1, 1)
        s = (q[:, :, r0:r0 + step].to(wdt) @ kf.transpose(-1, -2)) * scale
        if score_mod is not None:
            s = score_mod(s, b, h, qp, kp)
        keep = torch.broadcast_to(torch.as_tensor(mask_mod(b, h, qp, kp), device=dev), s.shape)
        s = s.masked_fill(~keep, float("-inf"))
        m = s.amax(-1, keepdim=True).detach()
        m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
        p = torch.exp(s - m)
        den = p.sum(-1, keepdim=True)
        empty = den == 0
        safe = torch.where(empty, torch.ones_like(den), den)
        outs.append((p @ vf) / safe)
        lse = torch.where(empty, torch.full_like(den, float("-inf")), m + torch.log(safe))
        lses.append(lse.squeeze(-1))
    return torch.cat(outs, 2), torch.cat(lses, 2)


def merge(parts: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine partial (out, lse) over disjoint key sets into the result over their union."""
    if len(parts) == 1:
        return parts[0]
    lses = torch.stack([lse for _, lse in parts])              # [P, B, H, n]
    top = lses.amax(0).detach()
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    w = torch.exp(lses - top)                                   # 0 for a part with no key
    total = w.sum(0)
    safe = torch.where(total == 0, torch.ones_like(total), total)
    out = sum(o * (wi / safe)[..., None] for (o, _), wi in zip(parts, w))
    lse = torch.where(total == 0, torch.full_like(total, float("-inf")), top + torch.log(safe))
    return out, lse


def finish(pattern, out: torch.Tensor, lse: torch.Tensor, q_pos: torch.Tensor, *, dtype,
           q_len: int, kv_len: int, inputs, return_lse: bool = False):
    """Apply the `output scale` at the rows' global positions and cast to `dtype`."""
    B, Hq = out.shape[:2]
    w = output_scale(pattern, inputs, batch=B, heads=Hq, q_len=q_len, kv_len=kv_len,
                     device=out.device, float_dtype=out.dtype)
    if w is not None:
        out = out * w[:, :, q_pos.to(out.device)][..., None]
    out = out.to(dtype)
    return (out, lse.detach().to(torch.float32)) if return_lse else out


def local_attention(pattern, q, k, v, q_pos, k_pos, *, q_len: int, kv_len: int, inputs,
                    scale: Optional[float] = None, return_lse: bool = False):
    """Rows q at q_pos against keys k, v at k_pos (one part): out [B, Hq, n, Dv] in q's dtype
    (and lse float32 [B, Hq, n] with return_lse)."""
    out, lse = partial_attention(pattern, q, k, v, q_pos, k_pos, q_len=q_len, kv_len=kv_len,
                                 inputs=inputs, scale=scale)
    return finish(pattern, out, lse, q_pos, dtype=q.dtype, q_len=q_len, kv_len=kv_len,
                  inputs=inputs, return_lse=return_lse)
