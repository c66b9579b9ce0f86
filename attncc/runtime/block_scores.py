"""Block-level attention scores for gate training (SeerAttention, Gao et al. 2024,
"SeerAttention: Learning Intrinsic Sparse Attention in Your LLMs", arXiv 2410.13276).

SeerAttention trains its gate network against the block-level ground truth of the attention
map: the softmax probabilities P[b, h, q, k] = exp(score(q, k) - lse[q]) (0 where the mask
drops the pair) pooled over every (query block, key block) of β tokens — max-pooled as in the
paper, or the mean over the block's real (q, k) pairs:

    out, scores = kern(q, k, v, return_block_scores=64)               # max pooling
    out, scores = kern(q, k, v, return_block_scores=64, block_scores_pool="mean")
    scores: float32 [B, Hq, ceil(Lq / β), ceil(Lkv / β)], no gradient

This implementation runs the forward once for out and lse (any backend), then recomputes the
scores of β-row query blocks against all keys in torch (O(β·Lkv) memory per block, O(Lq·Lkv)
time), evaluating mask and score modifier with the dense IR evaluator; it is the reference
semantics for a fused in-kernel version. Patterns whose mask reads `route` / `blocks`
selections evaluate the full dense mask once.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..ir.inputs import InputError
from ..ir.nodes import Blocks, Route, walk

__all__ = ["block_scores", "call_with_block_scores", "POOLS"]

POOLS = ("max", "mean")


def _check(block, pool):
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise InputError(f"return_block_scores must be a positive block size in tokens, got "
                         f"{block!r}")
    if pool not in POOLS:
        raise InputError(f"block_scores_pool must be 'max' or 'mean', got {pool!r}")


def block_scores(pattern, q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, inputs: dict,
                 scale: float, block: int, pool: str = "max") -> torch.Tensor:
    """Pooled softmax probabilities float32 [B, Hq, ceil(Lq/β), ceil(Lkv/β)] for q
    [B, Hq, Lq, D], k [B, Hkv, Lkv, D] and the forward's lse [B, Hq, Lq] (rows without a kept
    key, lse -inf, have probability 0). See the module docstring."""
    from ..ir.dense import Evaluator, dense_mask
    _check(block, pool)
    if pattern.normalize == "none":
        raise InputError("return_block_scores needs softmax probabilities; pattern "
                         f"'{pattern.name}' has `normalize none`")
    B, Hq, Lq, D = q.shape
    Lkv = k.shape[2]
    dev = q.device
    group = Hq // k.shape[1]
    kf = k.detach().to(torch.float32).repeat_interleave(group, 1) if group > 1 \
        else k.detach().to(torch.float32)
    qf = q.detach().to(torch.float32)
    lse = lse.detach().to(torch.float32)
    nq, nk = -(-Lq // block), -(-Lkv // block)
    pad_k = nk * block - Lkv
    full_mask = None
    if any(isinstance(n, (Route, Blocks)) for n in walk(pattern.mask)):
        extra = dict(inputs)
        if any(isinstance(n, Route) for n in walk(pattern.mask)):
            extra.update({n: t for n, t in (("query", q), ("key", k)) if n not in extra})
        full_mask = dense_mask(pattern, q_len=Lq, kv_len=Lkv, heads=Hq, batch=B, inputs=extra,
                               device=dev)
    out = torch.zeros(B, Hq, nq, nk, dtype=torch.float32, device=dev)
    ar = lambda n, lo=0: torch.arange(lo, lo + n, device=dev)  # noqa: E731
    env = {"b": ar(B).view(-1, 1, 1, 1), "h": ar(Hq).view(1, -1, 1, 1),
           "k": ar(Lkv).view(1, 1, 1, -1), "Q_LEN": Lq, "KV_LEN": Lkv, "HEADS": Hq}
    for i in range(nq):
        r0, r1 = i * block, min(Lq, (i + 1) * block)
        s = (qf[:, :, r0:r1] @ kf.transpose(-1, -2)) * scale
        ev = Evaluator(dict(env, q=ar(r1 - r0, r0).view(1, 1, -1, 1), s=s.to(torch.float64)),
                       layout=pattern.layout, inputs=inputs, device=dev)
        keep = full_mask[:, :, r0:r1] if full_mask is not None else ev.evaluate(pattern.mask)
        if pattern.score is not None:
            s = ev.evaluate(pattern.score).to(torch.float32).expand(s.shape)
        row_lse = lse[:, :, r0:r1, None]
        p = torch.where(keep & torch.isfinite(row_lse), torch.exp(s - row_lse.nan_to_num(0.0,
                        neginf=0.0)), torch.zeros((), device=dev))
        p = torch.nn.functional.pad(p, (0, pad_k)).view(B, Hq, r1 - r0, nk, block)
        if pool == "max":
            out[:, :, i] = p.amax(dim=(2, 4))
        else:
            counts = torch.full((nk,), block, device=dev, dtype=torch.float32)
            counts[-1] = block - pad_k
            out[:, :, i] = p.sum(dim=(2, 4)) / (counts * (r1 - r0))
    return out


def call_with_block_scores(kern, q, k, v, scale: Optional[float], return_lse: bool, block,
                           pool: str, inputs: dict):
    """`kern(q, k, v, return_block_scores=block, ...)`: (out[, lse], scores)."""
    _check(block, pool)
    out, lse = kern(q, k, v, scale=scale, return_lse=True, **inputs)
    from ..ir.inputs import check_inputs
    B, Hq, Lq, D = q.shape
    checked = check_inputs(kern.pattern, inputs, batch=B, heads=Hq, q_len=Lq, kv_len=k.shape[2],
                           device=q.device)
    with torch.no_grad():
        scores = block_scores(kern.pattern, q, k, lse, checked, kern._scale(scale, D), block,
                              pool)
    return (out, lse, scores) if return_lse else (out, scores)
