"""Interval arithmetic over the mask IR, vectorized over many index boxes at once.

A *box* gives every index variable an interval: `q ∈ [q0, q1]`, `k ∈ [k0, k1]` (and, for
multi-dimensional tiles of a grid layout, every coordinate `q.a`, `k.a` its own interval).
The bounds are float64 tensors that broadcast against each other, so one call analyses a
whole row-band of tiles (e.g. q bounds `[R, 1]`, k bounds `[1, C]` give results `[R, C]`).

Results
    int / float node  →  (lo, hi) with lo ≤ value ≤ hi for every point of the box
    bool node         →  (always, possible) bool tensors: `always` = true at every point
                         of the box, `~possible` = false at every point, else unknown

Soundness is the only hard requirement (the tile classifier relies on it); precision comes
from three devices:

* **Linear forms.** Every int node built from `+ - neg` and multiplication by a constant is
  kept as an affine combination `c + Σ aᵢ·atomᵢ` of atoms (`q`, `k`, coordinates, and
  non-affine subexpressions). Its interval is computed from the combination, so correlated
  terms cancel: `(q + 5) - q` is exactly `[5, 5]` and `q - k` over a tile is exact.
  Comparisons evaluate the linear form of `a - b`.
* **Residues.** `x % m` (m > 0 constant) is the exact shifted interval when `x`'s interval
  lies within one period, else `[0, m-1]`; `x // m` is `[⌊lo/m⌋, ⌊hi/m⌋]`.
* **Unknowns.** `Load` (runtime tensor elements) is `(-inf, inf)` / unknown bool; `Route`
  and `Blocks` are unknown bools; float functions and true division are `(-inf, inf)`.

Arithmetic is float64 with ±inf for unbounded ends. Integer results are exact below 2**52;
larger magnitudes are widened to ±inf (never narrowed), which keeps everything sound.
`//` and `%` are floor division and modulo (DESIGN §4); division by an interval that
contains 0 is `(-inf, inf)` (the value is undefined there and the dense reference errors).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from .nodes import (BOOL, Binary, Blocks, Const, Coord, Expr, FCall, Load, Route, Select,
                    Unary, Var, walk)
from .segmented import coord_terms

INF = math.inf
_BIG = float(2 ** 52)

Interval = tuple[torch.Tensor, torch.Tensor]


# ---- linear forms (pure Python, on IR nodes) ---------------------------------------------

_AFFINE_OPS = ("add", "sub")


def linear_form(node: Expr, memo: Optional[dict] = None) -> tuple[dict, int]:
    """`node` (an int expression) as `(coeffs, const)`: `node == const + Σ coeffs[a]·a` where
    the atoms `a` are IR nodes that are not `+`, `-`, `neg`, or a product with a constant
    (those are expanded). Coefficients are nonzero ints; the dict is keyed by atom node."""
    memo = {} if memo is None else memo
    for n in walk(node):
        if id(n) in memo:
            continue
        memo[id(n)] = _linear_step(n, memo)
    return memo[id(node)]


def _linear_step(n: Expr, memo: dict) -> tuple[dict, int]:
    if isinstance(n, Const) and n.dtype == "int":
        return {}, n.value
    if isinstance(n, Unary) and n.op == "neg" and n.dtype == "int":
        c, k = memo[id(n.x)]
        return {a: -v for a, v in c.items()}, -k
    if isinstance(n, Binary) and n.dtype == "int":
        if n.op in _AFFINE_OPS:
            (ca, ka), (cb, kb) = memo[id(n.a)], memo[id(n.b)]
            sign = 1 if n.op == "add" else -1
            out = dict(ca)
            for a, v in cb.items():
                out[a] = out.get(a, 0) + sign * v
                if out[a] == 0:
                    del out[a]
            return out, ka + sign * kb
        if n.op == "mul":
            (ca, ka), (cb, kb) = memo[id(n.a)], memo[id(n.b)]
            if not cb:
                return ({a: v * kb for a, v in ca.items() if v * kb}, ka * kb)
            if not ca:
                return ({a: v * ka for a, v in cb.items() if v * ka}, ka * kb)
    return {n: 1}, 0


def form_is_const(form: tuple[dict, int]) -> bool:
    return not form[0]


# ---- boxes ----------------------------------------------------------------------------------

@dataclass
class Box:
    """Index intervals for a batch of boxes (float64 tensors, broadcastable).

    vars    name → (lo, hi) for q, k, h, b and lengths (missing lengths/b/h are unbounded
            non-negative ints)
    coords  (side, axis) → (lo, hi) for grid coordinates; a coordinate not listed here is
            derived from the flat index interval and `layout` (row-major flattening)
    """
    vars: dict = field(default_factory=dict)
    coords: dict = field(default_factory=dict)
    layout: object = None


def _t(x) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.tensor(float(x), dtype=torch.float64)


def _widen(lo: torch.Tensor, hi: torch.Tensor) -> Interval:
    """Replace magnitudes beyond exact float range by ±inf (lo down, hi up)."""
    lo = torch.where(lo < -_BIG, torch.full_like(lo, -INF), torch.clamp(lo, max=_BIG))
    hi = torch.where(hi > _BIG, torch.full_like(hi, INF), torch.clamp(hi, min=-_BIG))
    return lo, hi


def _mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # 0 · inf = 0 here: an infinite end stands for an unbounded *finite* value.
    p = a * b
    return torch.where(torch.isnan(p), torch.zeros_like(p), p)


def _floordiv(a, b):
    return torch.floor(a / b)


class IntervalEval:
    """Evaluates intervals of IR nodes over one `Box` (memoized by node)."""

    def __init__(self, box: Box):
        self.box = box
        self.memo: dict[int, Interval] = {}
        self.lin: dict = {}

    def interval(self, root: Expr) -> Interval:
        for n in walk(root):
            if id(n) not in self.memo:
                self.memo[id(n)] = self._eval(n)
        return self.memo[id(root)]

    def decide(self, root: Expr) -> tuple[torch.Tensor, torch.Tensor]:
        """For a bool root: (always_true, always_false) as bool tensors."""
        lo, hi = self.interval(root)
        return lo, ~hi

    # -- helpers ------------------------------------------------------------------------
    def _form_interval(self, form) -> Interval:
        coeffs, const = form
        terms = []
        bound = abs(float(const))
        exact = True
        for atom, c in coeffs.items():
            alo, ahi = self.memo[id(atom)] if id(atom) in self.memo else self.interval(atom)
            terms.append((c, alo, ahi))
            if exact:
                m = max(alo.abs().max().item(), ahi.abs().max().item()) if alo.numel() else 0.0
                bound += abs(c) * m
                exact = math.isfinite(bound) and bound < _BIG
        lo = hi = None
        for c, alo, ahi in terms:
            a, b = (alo, ahi) if c > 0 else (ahi, alo)
            if exact:
                ta, tb = (a, b) if c == 1 else (a * float(c), b * float(c))
            else:
                ta, tb = _mul(a, _t(float(c))), _mul(b, _t(float(c)))
            lo = ta if lo is None else lo + ta
            hi = tb if hi is None else hi + tb
        if lo is None:
            return _t(float(const)), _t(float(const))
        if const:
            lo, hi = lo + float(const), hi + float(const)
        if exact:
            return lo, hi
        lo = torch.where(torch.isnan(lo), torch.full_like(lo, -INF), lo)
        hi = torch.where(torch.isnan(hi), torch.full_like(hi, INF), hi)
        return _widen(lo, hi)

    def _var(self, name: str) -> Interval:
        if name in self.box.vars:
            lo, hi = self.box.vars[name]
            return _t(lo), _t(hi)
        if name == "s":
            return _t(-INF), _t(INF)
        return _t(0.0), _t(INF)

    def _coord(self, n: Coord) -> Interval:
        key = (n.side, n.axis)
        if key in self.box.coords:
            lo, hi = self.box.coords[key]
            return _t(lo), _t(hi)
        terms = coord_terms(self.box.layout, n.side, n.axis)
        if terms is None:
            return _t(-INF), _t(INF)
        start, stride, size = terms
        lo, hi = self._var(n.side)
        if start:
            lo, hi = lo - start, hi - start
        return self._mod_const(_floordiv(lo, stride), _floordiv(hi, stride), size)

    @staticmethod
    def _mod_const(lo, hi, m: int) -> Interval:
        """x % m for x in [lo, hi], m a nonzero int constant (floor semantics)."""
        if m > 0:
            base = torch.floor(lo / m)
            same = (base == torch.floor(hi / m)) & torch.isfinite(lo) & torch.isfinite(hi)
            return (torch.where(same, lo - base * m, torch.zeros_like(lo)),
                    torch.where(same, hi - base * m, torch.full_like(hi, m - 1)))
        base = torch.floor(lo / m)
        same = (base == torch.floor(hi / m)) & torch.isfinite(lo) & torch.isfinite(hi)
        # With m < 0 the result lies in (m, 0]; floor(x/m) decreases as x grows.
        return (torch.where(same, lo - base * m, torch.full_like(lo, m + 1)),
                torch.where(same, hi - base * m, torch.zeros_like(hi)))

    # -- nodes --------------------------------------------------------------------------
    def _eval(self, n: Expr) -> Interval:
        if isinstance(n, Const):
            if n.dtype == BOOL:
                return torch.tensor(n.value), torch.tensor(n.value)
            v = float(n.value)
            if abs(v) > _BIG:   # not exactly representable: unbounded on that side
                return (_t(-INF), _t(INF))
            return _t(v), _t(v)
        if isinstance(n, Var):
            return self._var(n.name)
        if isinstance(n, Coord):
            return self._coord(n)
        if isinstance(n, (Route, Blocks)) or (isinstance(n, Load) and n.dtype == BOOL):
            return torch.tensor(False), torch.tensor(True)
        if isinstance(n, Load):
            return _t(-INF), _t(INF)
        if isinstance(n, FCall):
            return _t(-INF), _t(INF)
        if n.dtype == "int" and (
                (isinstance(n, Binary) and n.op in ("add", "sub", "mul"))
                or (isinstance(n, Unary) and n.op == "neg")):
            form = linear_form(n, self.lin)
            if len(form[0]) != 1 or form[0].get(n) is None:
                return self._form_interval(form)
        if isinstance(n, Unary):
            return self._unary(n)
        if isinstance(n, Select):
            (clo, chi), (alo, ahi), (blo, bhi) = (self.memo[id(c)] for c in n.children())
            if n.dtype == BOOL:
                return (torch.where(clo, alo, torch.where(~chi, blo, alo & blo)),
                        torch.where(clo, ahi, torch.where(~chi, bhi, ahi | bhi)))
            lo = torch.where(clo, alo, torch.where(~chi, blo, torch.minimum(alo, blo)))
            hi = torch.where(clo, ahi, torch.where(~chi, bhi, torch.maximum(ahi, bhi)))
            return lo, hi
        if isinstance(n, Binary):
            return self._binary(n)
        return _t(-INF), _t(INF)

    def _unary(self, n: Unary) -> Interval:
        lo, hi = self.memo[id(n.x)]
        if n.op == "neg":
            return -hi, -lo
        if n.op == "not":
            return ~hi, ~lo
        if n.op == "abs":
            alo = torch.where(lo > 0, lo, torch.where(hi < 0, -hi, torch.zeros_like(lo)))
            return alo, torch.maximum(lo.abs(), hi.abs())
        return lo, hi  # float(x)

    def _binary(self, n: Binary) -> Interval:
        op = n.op
        (alo, ahi), (blo, bhi) = self.memo[id(n.a)], self.memo[id(n.b)]
        if op == "and":
            return alo & blo, ahi & bhi
        if op == "or":
            return alo | blo, ahi | bhi
        if op in ("lt", "le", "gt", "ge", "eq", "ne"):
            return self._compare(n, alo, ahi, blo, bhi)
        if op == "min":
            return torch.minimum(alo, blo), torch.minimum(ahi, bhi)
        if op == "max":
            return torch.maximum(alo, blo), torch.maximum(ahi, bhi)
        if op in ("add", "sub", "mul"):
            if op == "add":
                lo, hi = alo + blo, ahi + bhi
            elif op == "sub":
                lo, hi = alo - bhi, ahi - blo
            else:
                ps = [_mul(x, y) for x in (alo, ahi) for y in (blo, bhi)]
                lo = torch.minimum(torch.minimum(ps[0], ps[1]), torch.minimum(ps[2], ps[3]))
                hi = torch.maximum(torch.maximum(ps[0], ps[1]), torch.maximum(ps[2], ps[3]))
            lo = torch.where(torch.isnan(lo), torch.full_like(lo, -INF), lo)
            hi = torch.where(torch.isnan(hi), torch.full_like(hi, INF), hi)
            return _widen(lo, hi) if n.dtype == "int" else (lo, hi)
        if op == "floordiv":
            if isinstance(n.b, Const) and n.b.value != 0:
                m = float(n.b.value)
                lo, hi = (_floordiv(alo, m), _floordiv(ahi, m)) if m > 0 else \
                    (_floordiv(ahi, m), _floordiv(alo, m))
                return lo, hi
            pos, neg = blo > 0, bhi < 0
            qs = [_floordiv(x, y) for x in (alo, ahi) for y in (blo, bhi)]
            qs = [torch.where(torch.isnan(v), torch.zeros_like(v), v) for v in qs]
            lo = torch.minimum(torch.minimum(qs[0], qs[1]), torch.minimum(qs[2], qs[3]))
            hi = torch.maximum(torch.maximum(qs[0], qs[1]), torch.maximum(qs[2], qs[3]))
            ok = pos | neg
            # Unbounded ends make the quotient bounds unreliable: widen.
            inf_a = ~torch.isfinite(alo) | ~torch.isfinite(ahi)
            lo = torch.where(ok & ~inf_a, lo, torch.full_like(lo, -INF))
            hi = torch.where(ok & ~inf_a, hi, torch.full_like(hi, INF))
            return lo, hi
        if op == "mod":
            if isinstance(n.b, Const) and n.b.value != 0:
                return self._mod_const(alo, ahi, int(n.b.value))
            pos, neg = blo > 0, bhi < 0
            lo = torch.where(pos, torch.zeros_like(blo), torch.where(neg, blo + 1, -INF))
            hi = torch.where(pos, bhi - 1, torch.where(neg, torch.zeros_like(bhi), INF))
            return lo, hi
        return _t(-INF), _t(INF)  # float division

    def _compare(self, n: Binary, alo, ahi, blo, bhi) -> Interval:
        op = n.op
        if n.a.dtype == BOOL:
            known = (alo == ahi) & (blo == bhi)
            same = known & (alo == blo)
            diff = known & (alo != blo)
            return (same, ~diff) if op == "eq" else (diff, ~same)
        if n.a.dtype == "int":
            fa, fb = linear_form(n.a, self.lin), linear_form(n.b, self.lin)
            coeffs = dict(fa[0])
            for a, v in fb[0].items():
                coeffs[a] = coeffs.get(a, 0) - v
                if coeffs[a] == 0:
                    del coeffs[a]
            dlo, dhi = self._form_interval((coeffs, fa[1] - fb[1]))
        else:
            dlo, dhi = alo - bhi, ahi - blo
            dlo = torch.where(torch.isnan(dlo), torch.full_like(dlo, -INF), dlo)
            dhi = torch.where(torch.isnan(dhi), torch.full_like(dhi, INF), dhi)
        if op == "lt":
            t, f = dhi < 0, dlo >= 0
        elif op == "le":
            t, f = dhi <= 0, dlo > 0
        elif op == "gt":
            t, f = dlo > 0, dhi <= 0
        elif op == "ge":
            t, f = dlo >= 0, dhi < 0
        else:
            zero = (dlo == 0) & (dhi == 0)
            nonzero = (dlo > 0) | (dhi < 0)
            t, f = (zero, nonzero) if op == "eq" else (nonzero, zero)
        return t, ~f


def analyze(expr: Expr, box: Box) -> Interval:
    """Interval of `expr` over `box` (see module docstring)."""
    return IntervalEval(box).interval(expr)
