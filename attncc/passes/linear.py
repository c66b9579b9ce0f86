"""Separability proof for `normalize none` (linear attention): when may the chunked
linear-time algorithm (Lightning Attention-2) replace the quadratic block-sparse kernels?

Pre:  an elaborated `Pattern` with `normalize == "none"`.
Post: a `LinearDecision`: `linear` True with a `LinearForm` when the spec is proved separable,
      else False with the reason in words (the pattern then runs on the ordinary quadratic
      block-sparse path, whose result is the same).

Separable means (issue 12): the mask is a causal diagonal and the score factors as

    mask   k <= q + d          d = c0 (an integer) or c0 + KV_LEN - Q_LEN (`causal`: c0 = 0)
    score  s · c_h · r_h^(q - k)      with 0 < r_h <= 1, c_h finite, both independent of q, k

so that out[q] = c_h · r_h^(-d) · Σ_{k <= p} r_h^(p - k) (q·k·scale) v[k] with p = q + d: a
decayed causal product that a running D×Dv state per head computes in O(L·D·Dv).

The proof is structural on the IR, done once per pattern (`analyze`):
  * the mask must be one comparison whose integer linear form is `k - q - d <= 0` with the
    coefficients of k and q equal to +1 and -1 (`attncc.ir.intervals.linear_form`);
  * the score (default `s`) must be a product / quotient of factors, each either `s` (exactly
    once, not in a denominator), an expression of h and the lengths only (c_h), or exp / exp2
    of an expression affine in q and k with coefficients depending on h only.
The per-head numbers (`LinearForm.per_head`) are then computed for the call's head count: the
coefficients of q and k in each exponent (evaluated by differencing, exact for affine
expressions) must be opposite, and the resulting r_h must lie in (0, 1]; a violation is a
reason to fall back (a decay above 1 would make the running state grow without bound).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..ir.intervals import linear_form
from ..ir.nodes import (INT, Binary, Blocks, Const, Coord, Expr, FCall, Load, Route, Unary, Var,
                        free_vars, walk)
from ..ir.printer import format_expr

__all__ = ["LinearForm", "LinearDecision", "analyze", "decide", "NotSeparable", "algorithm_text"]

# Variables an h-only factor may read (constants per call).
_HEAD_VARS = frozenset({"h", "HEADS", "Q_LEN", "KV_LEN"})


class NotSeparable(Exception):
    """The score or mask is not of the separable form; the message says why."""


@dataclass(frozen=True)
class LinearForm:
    """The proved form: mask `k <= q + diag (+ KV_LEN - Q_LEN if aligned)`, score
    `s · Π const_factors^±1 · Π exp(args)^±1` (see `per_head`)."""
    diag: int
    aligned: bool
    consts: tuple[tuple[Expr, int], ...]      # (h-only factor, +1 multiply | -1 divide)
    exps: tuple[tuple[Expr, int, str], ...]   # (affine exponent, ±1, "exp" | "exp2")

    def offset(self, q_len: int, kv_len: int) -> int:
        """d: query q sees keys k <= q + d."""
        return self.diag + ((kv_len - q_len) if self.aligned else 0)

    def per_head(self, heads: int, q_len: int, kv_len: int):
        """(c float64 [heads], log_r float64 [heads]) with score = s · c_h · exp(log_r_h·(q-k)).
        Raises NotSeparable when an exponent is not a function of q - k, or r_h > 1, or a
        value is not finite."""
        h = torch.arange(heads, dtype=torch.int64).view(1, -1, 1, 1)
        base = {"h": h, "HEADS": heads, "Q_LEN": q_len, "KV_LEN": kv_len}

        def ev(e: Expr, q: int = 0, k: int = 0) -> torch.Tensor:
            from ..ir.dense import eval_expr
            v = eval_expr(e, dict(base, q=q, k=k)).to(torch.float64)
            return v.reshape(-1).expand(heads) if v.numel() == 1 else v.reshape(heads)

        c = torch.ones(heads, dtype=torch.float64)
        log_r = torch.zeros(heads, dtype=torch.float64)
        for e, sign in self.consts:
            c = c * ev(e) if sign > 0 else c / ev(e)
        for e, sign, fn in self.exps:
            at0 = ev(e)
            aq, ak = ev(e, q=1) - at0, ev(e, k=1) - at0
            tol = 1e-12 * torch.maximum(aq.abs(), ak.abs()).clamp_min(1.0)
            if bool(((aq + ak).abs() > tol).any()):
                bad = int(((aq + ak).abs() > tol).nonzero()[0])
                raise NotSeparable(
                    f"{fn}({format_expr(e)}) is not a function of q - k for head {bad} "
                    f"(coefficients {float(aq[bad]):g} of q and {float(ak[bad]):g} of k)")
            ln = math.log(2.0) if fn == "exp2" else 1.0
            c = c * (torch.exp(sign * ln * at0))
            log_r = log_r + sign * ln * aq
        bad = ~torch.isfinite(c) | ~torch.isfinite(log_r)
        if bool(bad.any()):
            raise NotSeparable(f"the score factor of head {int(bad.nonzero()[0])} is not finite")
        if bool((log_r > 0).any()):
            i = int((log_r > 0).nonzero()[0])
            raise NotSeparable(f"decay r_h = {math.exp(float(log_r[i])):.6g} > 1 for head {i}: "
                               "the running state would grow")
        return c, log_r


@dataclass(frozen=True)
class LinearDecision:
    """Which algorithm a `normalize none` pattern uses, and why."""
    linear: bool
    reason: str
    form: Optional[LinearForm] = None


def _mask_form(mask: Expr) -> tuple[int, bool]:
    """(c0, aligned) for a mask `k <= q + c0 (+ KV_LEN - Q_LEN)`; raises NotSeparable."""
    if not (isinstance(mask, Binary) and mask.op in ("le", "lt", "ge", "gt")
            and mask.a.dtype == INT):
        raise NotSeparable(f"the mask {format_expr(mask)} is not a causal diagonal "
                           "`k <= q + d`")
    a, b = (mask.a, mask.b) if mask.op in ("le", "lt") else (mask.b, mask.a)
    (ca, ka), (cb, kb) = linear_form(a), linear_form(b)
    coeffs = dict(ca)
    for atom, v in cb.items():            # a - b
        coeffs[atom] = coeffs.get(atom, 0) - v
    const = ka - kb + (1 if mask.op in ("lt", "gt") else 0)   # a - b + const <= 0
    by_name = {}
    for atom, v in coeffs.items():
        if v == 0:
            continue
        if not isinstance(atom, Var):
            raise NotSeparable(f"the mask {format_expr(mask)} is not a causal diagonal "
                               f"(it depends on {format_expr(atom)})")
        by_name[atom.name] = v
    aligned = by_name.pop("KV_LEN", 0), by_name.pop("Q_LEN", 0)
    if by_name != {"k": 1, "q": -1} or aligned not in ((0, 0), (-1, 1)):
        raise NotSeparable(f"the mask {format_expr(mask)} is not a causal diagonal `k <= q + d`"
                           " (a band or other mask needs the quadratic path)")
    return -const, aligned == (-1, 1)


def _qk_free(e: Expr) -> bool:
    """True if `e` depends on h and the lengths only (no q, k, s, inputs, coordinates)."""
    return free_vars(e) <= _HEAD_VARS and not any(
        isinstance(n, (Load, Coord, Route, Blocks)) for n in walk(e))


def _affine(e: Expr) -> bool:
    """`e` (float) is affine in q and k with coefficients that depend on h only."""
    if _qk_free(e):
        return True
    if isinstance(e, Unary) and e.op == "float":
        coeffs, _ = linear_form(e.x)
        return all(isinstance(a, Var) and a.name in ("q", "k") or _qk_free(a) for a in coeffs)
    if isinstance(e, Unary) and e.op == "neg":
        return _affine(e.x)
    if isinstance(e, Binary) and e.op in ("add", "sub"):
        return _affine(e.a) and _affine(e.b)
    if isinstance(e, Binary) and e.op == "mul":
        return (_qk_free(e.a) and _affine(e.b)) or (_qk_free(e.b) and _affine(e.a))
    if isinstance(e, Binary) and e.op == "div":
        return _qk_free(e.b) and _affine(e.a)
    return False


def _factor(e: Expr, sign: int, consts: list, exps: list) -> int:
    """Collect the factors of `e` (raised to `sign`); returns the power of `s` in `e`."""
    if isinstance(e, Var) and e.name == "s":
        return 1
    if _qk_free(e):
        consts.append((e, sign))
        return 0
    if isinstance(e, Unary) and e.op == "neg":
        consts.append((Const(-1.0), 1))
        return _factor(e.x, sign, consts, exps)
    if isinstance(e, Binary) and e.op == "mul":
        return _factor(e.a, sign, consts, exps) + _factor(e.b, sign, consts, exps)
    if isinstance(e, Binary) and e.op == "div":
        p = _factor(e.a, sign, consts, exps)
        if _factor(e.b, -sign, consts, exps):
            raise NotSeparable("the score divides by an expression of s")
        return p
    if isinstance(e, FCall) and e.fn in ("exp", "exp2"):
        if "s" in free_vars(e.args[0]) or not _affine(e.args[0]):
            raise NotSeparable(f"the exponent of {format_expr(e)} is not affine in q and k "
                               "with per-head coefficients")
        exps.append((e.args[0], sign, e.fn))
        return 0
    raise NotSeparable(f"the score factor {format_expr(e)} is not s, a per-head constant or "
                       "exp/exp2 of an affine function of q - k")


def analyze(pattern) -> LinearDecision:
    """Compile-time proof for a pattern (see the module docstring)."""
    if pattern.normalize != "none":
        return LinearDecision(False, "softmax attention (no `normalize none`)")
    try:
        if pattern.output_scale is not None:
            raise NotSeparable("the linear algorithm does not apply an `output scale`")
        diag, aligned = _mask_form(pattern.mask)
        consts: list = []
        exps: list = []
        score = pattern.score if pattern.score is not None else Var("s")
        power = _factor(score, 1, consts, exps)
        if power != 1:
            raise NotSeparable("the score must contain the scaled product s exactly once as a "
                               f"factor (found it {power} times)")
    except NotSeparable as e:
        return LinearDecision(False, str(e))
    form = LinearForm(diag, aligned, tuple(consts), tuple(exps))
    d = "q" if not diag else (f"q + {diag}" if diag > 0 else f"q - {-diag}")
    d += " + (KV_LEN - Q_LEN)" if aligned else ""
    return LinearDecision(True, f"separable: mask k <= {d}, score s * c_h * r_h^(q - k) "
                                "(r_h checked in (0, 1] per call)", form)


def decide(pattern, heads: int, q_len: int, kv_len: int):
    """Call-time decision: (LinearDecision, (c [heads], log_r [heads]) or None)."""
    dec = analyze(pattern)
    if not dec.linear:
        return dec, None
    try:
        return dec, dec.form.per_head(heads, q_len, kv_len)
    except NotSeparable as e:
        return LinearDecision(False, str(e), dec.form), None


def algorithm_text(pattern, heads: int, q_len: int, kv_len: int, options=None) -> tuple[str, bool]:
    """(the lines `attncc inspect --stage schedule` prints for a `normalize none` pattern,
    whether the linear algorithm runs): the chosen algorithm and why, and for the linear one
    the per-head decays r_h, factors c_h, diagonal offset and block size."""
    dec, values = decide(pattern, heads, q_len, kv_len)
    shape = f"q_len={q_len} kv_len={kv_len} heads={heads}"
    if not dec.linear:
        return (f"algorithm: quadratic block-sparse, no softmax ({shape})\n"
                f"  why: not separable: {dec.reason}\n"), False
    c, log_r = values
    block = getattr(options, "block_m", 64)
    lines = [f"algorithm: linear, chunked (Lightning Attention-2) ({shape})",
             f"  why: {dec.reason}",
             f"  diagonal: k <= q + {dec.form.offset(q_len, kv_len)}",
             "  decay r_h: " + ", ".join(f"{math.exp(x):.6g}" for x in log_r.tolist()),
             "  factor c_h: " + ", ".join(f"{x:.6g}" for x in c.tolist()),
             f"  blocks: {block} tokens (torch), 32 (Triton); state D x Dv per head, float32",
             f"  work: O(L·(block·D + D·Dv)) instead of {q_len * kv_len} score pairs"]
    return "\n".join(lines) + "\n", True
