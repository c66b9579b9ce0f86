"""Attention of one rank's query rows against the keys it holds, at GLOBAL positions.

The pattern's mask and score modifier (lowered to torch by `attncc.ir.lower_torch`) are
evaluated at the global query / key positions of the rows and keys, so a rank computes exactly
its rows of the single-device result from local plus fetched keys. Work and memory are
O(B · Hq · rows · keys held) — the rank's rows against its own and fetched keys, never the
whole sequence. Written with differentiable torch ops: autograd gives dq, dk, dv.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional

import torch

from ..ir.lower_torch import output_scale, to_mask_mod, to_score_mod

# Query rows per step (bounds the [B, H, rows, keys] score block).
_SCORE_ELEMS = 1 << 24


def local_attention(pattern, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    q_pos: torch.Tensor, k_pos: torch.Tensor, *, q_len: int, kv_len: int,
                    inputs: Mapping[str, torch.Tensor], scale: Optional[float] = None,
                    return_lse: bool = False):
    """q [B, Hq, n, D] at global query positions q_pos int64 [n]; k [B, Hkv, m, D],
    v [B, Hkv, m, Dv] at global key positions k_pos int64 [m]; `inputs` the pattern's runtime
    tensors, global (indexed by global positions). Returns out [B, Hq, n, Dv] in q's dtype
    (and lse float32 [B, Hq, n] with return_lse). Softmax runs in float32 (float64 for
    float64 inputs); a row with no visible key gives 0 (lse -inf)."""
    B, Hq, n, D = q.shape
    Hkv = k.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    wdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    dev = q.device
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
    step = max(1, _SCORE_ELEMS // max(1, B * Hq * max(1, k.shape[2])))
    for r0 in range(0, n, step):
        qp = q_pos[r0:r0 + step].to(dev).view(1, 1, -1, 1)
        s = (q[:, :, r0:r0 + step].to(wdt) @ kf.transpose(-1, -2)) * scale
        if score_mod is not None:
            s = score_mod(s, b, h, qp, kp)
        keep = torch.broadcast_to(torch.as_tensor(mask_mod(b, h, qp, kp), device=dev), s.shape)
        s = s.masked_fill(~keep, float("-inf"))
        m = s.amax(-1, keepdim=True)
        m = torch.where(torch.isinf(m), torch.zeros_like(m), m).detach()
        p = torch.exp(s - m)
        den = p.sum(-1, keepdim=True)
        o = (p @ vf) / torch.where(den == 0, torch.ones_like(den), den)
        outs.append(o)
        lses.append((m + torch.log(den)).squeeze(-1))
    out = torch.cat(outs, 2) if outs else q.new_zeros(B, Hq, 0, v.shape[-1], dtype=wdt)
    w = output_scale(pattern, inputs, batch=B, heads=Hq, q_len=q_len, kv_len=kv_len,
                     device=dev, float_dtype=wdt)
    if w is not None:
        out = out * w[:, :, q_pos.to(dev)][..., None]
    out = out.to(q.dtype)
    if not return_lse:
        return out
    lse = torch.cat(lses, 2) if lses else q.new_zeros(B, Hq, 0, dtype=wdt)
    return out, lse.to(torch.float32)
