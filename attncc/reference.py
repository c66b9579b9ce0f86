"""`attncc.reference`: dense float64 attention for a pattern — the oracle for every backend.

Independent of tiling and codegen: the mask comes from the dense IR evaluator
(`attncc.ir.dense.dense_mask`) and attention is computed in float64 with plain torch ops.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .ir.dense import Evaluator, dense_mask
from .ir.inputs import check_qkv
from .ir.nodes import Route, walk
from .ir.pattern import Pattern

# Elements of one float64 [B, heads-chunk, Lq, Lkv] score block.
_SCORE_ELEMS = 1 << 24


def _pattern_of(p) -> Pattern:
    if isinstance(p, Pattern):
        return p
    inner = getattr(p, "pattern", None)
    if isinstance(inner, Pattern):
        return inner
    raise TypeError(f"expected an attncc Pattern (or an object with a .pattern), got "
                    f"{type(p).__name__}")


def reference(p, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
              scale: Optional[float] = None, return_lse: bool = False, **inputs):
    """Dense attention of pattern `p` in float64.

    q [B, Hq, Lq, D], k [B, Hkv, Lkv, D], v [B, Hkv, Lkv, Dv] (Hq % Hkv == 0; query head h
    uses key/value head h // (Hq // Hkv)); `inputs` are the pattern's runtime inputs.

    s = (q · kᵀ) · scale (default 1/sqrt(D)); the `score` modifier is applied to s (its input
    reads must be in range at the pairs the mask keeps; elsewhere they do not matter); entries
    outside the mask become -inf; softmax over keys; out = P · v. Rows with no visible key
    give output 0 and log-sum-exp -inf (never NaN). The `output scale` expression w[b, q, h]
    multiplies each head's output rows (not the lse).

    Returns out float64 [B, Hq, Lq, Dv] on q's device, or (out, lse [B, Hq, Lq]) with
    `return_lse=True` (natural log).

    `normalize none` (linear attention): no softmax, out[q] = Σ_k keep(q, k) · score(q, k) ·
    v[k], with score = s when the pattern has no score clause. There is no normaliser, so the
    log-sum-exp has no meaning; `return_lse=True` gives the log of the implicit normaliser 1:
    0 for a row with at least one kept key and -inf for a row with none (whose output is 0).
    """
    pattern = _pattern_of(p)
    B, Hq, Hkv, Lq, Lkv, D, Dv = check_qkv(q, k, v)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    dev = q.device
    mask_inputs = dict(inputs)
    if any(isinstance(n, Route) for n in walk(pattern.mask)):
        declared = {d.name for d in pattern.inputs}
        mask_inputs.update({n: t for n, t in (("query", q), ("key", k)) if n not in declared})
    mask = dense_mask(pattern, q_len=Lq, kv_len=Lkv, heads=Hq, batch=B, inputs=mask_inputs,
                      device=dev)

    ratio = Hq // Hkv
    qf, kf, vf = q.to(torch.float64), k.to(torch.float64), v.to(torch.float64)
    out = torch.empty(B, Hq, Lq, Dv, dtype=torch.float64, device=dev)
    lse = torch.empty(B, Hq, Lq, dtype=torch.float64, device=dev)
    ar = lambda n: torch.arange(n, device=dev, dtype=torch.int64)  # noqa: E731
    step = max(1, _SCORE_ELEMS // max(1, B * Lq * Lkv))
    for h0 in range(0, Hq, step):
        h1 = min(Hq, h0 + step)
        heads = ar(h1 - h0) + h0
        kv_heads = torch.div(heads, ratio, rounding_mode="floor")
        s = qf[:, h0:h1] @ kf[:, kv_heads].transpose(-1, -2) * scale
        env = {"b": ar(B).view(-1, 1, 1, 1), "h": heads.view(1, -1, 1, 1),
               "q": ar(Lq).view(1, 1, -1, 1), "k": ar(Lkv).view(1, 1, 1, -1),
               "Q_LEN": Lq, "KV_LEN": Lkv, "HEADS": Hq}
        if pattern.score is not None:
            # Reads in the score need to be in range only at pairs the mask keeps.
            ev = Evaluator(dict(env, s=s), layout=pattern.layout, inputs=inputs, device=dev)
            s = ev.evaluate(pattern.score, where=mask[:, h0:h1]).to(torch.float64).expand(s.shape)
        if pattern.normalize == "none":
            keep = mask[:, h0:h1]
            o = torch.where(keep, s, torch.zeros((), dtype=s.dtype, device=dev)) @ vf[:, kv_heads]
            row_lse = torch.where(keep.any(-1), 0.0, float("-inf")).to(torch.float64)
            row_lse = row_lse.expand(B, h1 - h0, Lq)
        else:
            o, row_lse = _softmax_attend(s, mask[:, h0:h1], vf[:, kv_heads])
        if pattern.output_scale is not None:
            row_env = {n: env[n] for n in ("b", "h", "q", "Q_LEN", "KV_LEN", "HEADS")}
            ev = Evaluator(row_env, layout=pattern.layout, inputs=inputs, device=dev)
            o = o * ev.evaluate(pattern.output_scale).to(torch.float64)
        out[:, h0:h1] = o
        lse[:, h0:h1] = row_lse
    return (out, lse) if return_lse else out


def _softmax_attend(s, keep, vf):
    """Softmax over keys of the scores `s` kept by `keep` (float64), times `vf`:
    (out, row log-sum-exp); empty rows give 0 and -inf."""
    s = s.masked_fill(~keep, float("-inf"))
    row_lse = torch.logsumexp(s, dim=-1)
    empty = torch.isneginf(row_lse)
    probs = torch.exp(s - torch.where(empty, torch.zeros_like(row_lse), row_lse)[..., None])
    return probs @ vf, row_lse
