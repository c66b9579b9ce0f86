"""Symbolic differentiation of float IR expressions (the chain rule of score modifiers).

`derivative(expr, wrt)` returns an IR expression equal to ∂expr/∂wrt, where `wrt` is a leaf
of the DAG: the score variable `Var("s")` or one `Load` node of a float input table (the
backward kernels differentiate the `score` clause w.r.t. the raw score and w.r.t. each table
element it reads, and render the results like the forward's expressions).

Rules (everything else — integers, booleans, other leaves — has derivative 0):
    a ± b, a · b, a / b, -a        the usual ones
    min(a, b), max(a, b)           the derivative of the chosen operand (at a tie: the first
                                   operand's, where torch.minimum/maximum split evenly)
    abs(a)                         sign(a) · a'  (0 at a = 0, like torch.abs)
    c ? a : b                      c ? a' : b'   (the condition is piecewise constant)
    tanh, exp, exp2, log, sqrt     1 - tanh², exp, exp2 · ln 2, 1 / a, 1 / (2 sqrt)
    float(int)                     0
The result is built from interned nodes with 0/1 folded, so a shared subexpression of the
forward (e.g. the tanh of softcap) is the same node in the derivative and renders once.
"""
from __future__ import annotations

import math

from ..ir.nodes import (FLOAT, Binary, Const, Expr, FCall, Load, Select, Unary, Var, walk)

__all__ = ["derivative", "float_loads", "DeriveError"]

ZERO, ONE = Const(0.0), Const(1.0)


class DeriveError(ValueError):
    """An expression has no derivative rule."""


def _is(c: Expr, v: float) -> bool:
    return isinstance(c, Const) and c.dtype == FLOAT and c.value == v


def _add(a: Expr, b: Expr) -> Expr:
    if _is(a, 0.0):
        return b
    if _is(b, 0.0):
        return a
    return Binary("add", a, b)


def _sub(a: Expr, b: Expr) -> Expr:
    if _is(b, 0.0):
        return a
    if _is(a, 0.0):
        return _neg(b)
    return Binary("sub", a, b)


def _neg(a: Expr) -> Expr:
    if _is(a, 0.0):
        return ZERO
    if isinstance(a, Unary) and a.op == "neg":
        return a.x
    return Unary("neg", a)


def _mul(a: Expr, b: Expr) -> Expr:
    if _is(a, 0.0) or _is(b, 0.0):
        return ZERO
    if _is(a, 1.0):
        return b
    if _is(b, 1.0):
        return a
    return Binary("mul", a, b)


def _div(a: Expr, b: Expr) -> Expr:
    if _is(a, 0.0):
        return ZERO
    if _is(b, 1.0):
        return a
    return Binary("div", a, b)


def _select(c: Expr, a: Expr, b: Expr) -> Expr:
    if a is b:
        return a
    return Select(c, a, b)


def derivative(expr: Expr, wrt: Expr) -> Expr:
    """∂expr/∂wrt as a float IR expression (see the module docstring for the rules).

    expr  a float IR expression (e.g. a pattern's `score`)
    wrt   `Var("s")` or a float `Load` node occurring in `expr`
    """
    if expr.dtype != FLOAT:
        raise DeriveError(f"cannot differentiate a {expr.dtype} expression")
    memo: dict[int, Expr] = {}
    for n in walk(expr):
        memo[id(n)] = _rule(n, wrt, memo)
    return memo[id(expr)]


def _rule(n: Expr, wrt: Expr, memo: dict) -> Expr:
    if n is wrt:
        return ONE
    if n.dtype != FLOAT or not any(c is wrt for c in walk(n)):
        return ZERO
    d = lambda c: memo[id(c)]  # noqa: E731
    if isinstance(n, Unary):
        if n.op == "neg":
            return _neg(d(n.x))
        if n.op == "abs":
            dx = d(n.x)
            return _select(Binary("gt", n.x, ZERO), dx,
                           _select(Binary("lt", n.x, ZERO), _neg(dx), ZERO))
        if n.op == "float":
            return d(n.x) if n.x.dtype == FLOAT else ZERO
    if isinstance(n, Binary):
        a, b = n.a, n.b
        if n.op == "add":
            return _add(d(a), d(b))
        if n.op == "sub":
            return _sub(d(a), d(b))
        if n.op == "mul":
            return _add(_mul(d(a), b), _mul(a, d(b)))
        if n.op == "div":
            return _sub(_div(d(a), b), _div(_mul(a, d(b)), _mul(b, b)))
        if n.op == "min":
            return _select(Binary("le", a, b), d(a), d(b))
        if n.op == "max":
            return _select(Binary("ge", a, b), d(a), d(b))
    if isinstance(n, Select):
        return _select(n.cond, d(n.a), d(n.b))
    if isinstance(n, FCall):
        x = n.args[0]
        dx = d(x)
        if n.fn == "tanh":
            return _mul(_sub(ONE, _mul(n, n)), dx)
        if n.fn == "exp":
            return _mul(n, dx)
        if n.fn == "exp2":
            return _mul(_mul(n, Const(math.log(2.0))), dx)
        if n.fn == "log":
            return _div(dx, x)
        if n.fn == "sqrt":
            return _div(dx, _mul(Const(2.0), n))
    raise DeriveError(f"no derivative rule for {type(n).__name__} "
                      f"{getattr(n, 'op', getattr(n, 'fn', ''))}")


def float_loads(expr: Expr) -> list[Load]:
    """The float `Load` nodes of `expr` whose value the expression depends on smoothly
    (i.e. not only through conditions), in walk order."""
    if expr is None:
        return []
    out = []
    for n in walk(expr):
        if isinstance(n, Load) and n.elem == FLOAT and derivative(expr, n) is not ZERO:
            out.append(n)
    return out


def uses_s(expr: Expr) -> bool:
    return any(isinstance(n, Var) and n.name == "s" for n in walk(expr))
