"""Typed IR builders shared by the spec elaborator and the decorator frontend.

Every user-level operation (`a + b`, `a < b`, `c ? a : b`, `abs(x)`, `tanh(x)` ...) goes
through one function here, so a spec and the equivalent traced Python function build the
*same* hash-consed IR node. The builders

* check operand types and raise `BuildError(message)` for user type errors (the caller
  attaches the source location: the elaborator its AST span, the tracer the user's frame);
* promote `int` to `float` (inserting `Unary('float', x)`) only where float arithmetic is
  allowed (`floats=True`: score and output clauses, constant expressions);
* fold operations whose operands are all constants, with Python's floor `//` and `%`.

Nothing else is rewritten: simplification is a separate pass.
"""
from __future__ import annotations

import math

from ..ir.nodes import (BOOL, FLOAT, INT, OP_SYMBOL, Binary, Const, Expr, FCall, Select,
                        Unary)

#: Builtin functions of the language: name -> arity.
BUILTINS = {"abs": 1, "min": 2, "max": 2, "clamp": 3,
            "tanh": 1, "exp": 1, "exp2": 1, "log": 1, "sqrt": 1}
FLOAT_FUNCTIONS = ("tanh", "exp", "exp2", "log", "sqrt")

_FLOAT_ONLY = "float arithmetic is only allowed in score and output clauses"

# Surface spelling of IR ops, for messages.
SYMBOL = {**OP_SYMBOL, "and": "&", "or": "|", "min": "min", "max": "max"}


class BuildError(Exception):
    """A user-level type error; `str(err)` is the message without location."""


def const(value) -> Const:
    """A literal (int, float or bool) as an IR constant."""
    if isinstance(value, float) and not math.isfinite(value):
        raise BuildError(f"constant {value!r} is not finite")
    return Const(value)


def _is_const(*xs: Expr) -> bool:
    return all(isinstance(x, Const) for x in xs)


def to_float(x: Expr) -> Expr:
    """`x` as a float: constants convert directly, int expressions get `Unary('float', x)`."""
    if x.dtype == FLOAT:
        return x
    if x.dtype != INT:
        raise BuildError(f"expected a number, got {x.dtype}")
    if isinstance(x, Const):
        return Const(float(x.value))
    return Unary("float", x)


def _unify(a: Expr, b: Expr, floats: bool, what: str) -> tuple[Expr, Expr]:
    """Bring two numeric operands to one type (int -> float promotion where allowed)."""
    ta, tb = a.dtype, b.dtype
    if ta == tb:
        return a, b
    if {ta, tb} == {INT, FLOAT}:
        if not floats:
            raise BuildError(f"{what} mixes int and float; {_FLOAT_ONLY}")
        return to_float(a), to_float(b)
    raise BuildError(f"{what} of {ta} and {tb}")


def _fold(op: str, x, y):
    if op == "add":
        return x + y
    if op == "sub":
        return x - y
    if op == "mul":
        return x * y
    if op in ("floordiv", "mod", "div"):
        if y == 0:
            raise BuildError("division by zero")
        return x // y if op == "floordiv" else x % y if op == "mod" else x / y
    if op == "min":
        return min(x, y)
    if op == "max":
        return max(x, y)
    if op == "and":
        return x and y
    if op == "or":
        return x or y
    return {"lt": x < y, "le": x <= y, "gt": x > y, "ge": x >= y,
            "eq": x == y, "ne": x != y}[op]


def binary(op: str, a: Expr, b: Expr, *, floats: bool) -> Expr:
    """`a <op> b` with the language's typing rules (see module docstring)."""
    sym = SYMBOL[op]
    ta, tb = a.dtype, b.dtype
    if op in ("and", "or"):
        if ta != BOOL or tb != BOOL:
            raise BuildError(f"operands of '{sym}' must be boolean, got {ta} and {tb}")
    elif op in ("eq", "ne"):
        if BOOL in (ta, tb) and ta != tb:
            raise BuildError(f"cannot compare {ta} with {tb} using '{sym}'")
        a, b = _unify(a, b, floats, f"comparison '{sym}'")
    elif op in ("lt", "le", "gt", "ge"):
        if BOOL in (ta, tb):
            raise BuildError(f"'{sym}' is not defined on booleans (only == and != are)")
        a, b = _unify(a, b, floats, f"comparison '{sym}'")
    else:
        if BOOL in (ta, tb):
            raise BuildError(f"arithmetic '{sym}' on bool")
        if op in ("floordiv", "mod"):
            if ta != INT or tb != INT:
                raise BuildError(f"'{sym}' needs int operands, got {ta} and {tb}")
            if isinstance(b, Const) and b.value == 0:
                raise BuildError("division by zero")
        elif op == "div":
            if not floats:
                raise BuildError("'/' is only allowed on floats in score and output clauses; "
                                 "use '//' for integer division")
            if ta == INT and tb == INT:
                raise BuildError("'/' needs a float operand; use '//' for integer division")
            a, b = to_float(a), to_float(b)
        else:
            if FLOAT in (ta, tb) and not floats:
                raise BuildError(_FLOAT_ONLY)
            a, b = _unify(a, b, floats, f"'{sym}'")
    if _is_const(a, b):
        return const(_fold(op, a.value, b.value))
    return Binary(op, a, b)


def unary(op: str, x: Expr, *, floats: bool) -> Expr:
    """`-x` (neg), `!x` (not), `abs(x)`; constants fold."""
    t = x.dtype
    if op == "not":
        if t != BOOL:
            raise BuildError(f"operand of '!' must be boolean, got {t}")
        return Const(not x.value) if isinstance(x, Const) else Unary("not", x)
    if t == BOOL:
        raise BuildError(f"{'negation' if op == 'neg' else op} of bool")
    if t == FLOAT and not floats:
        raise BuildError(_FLOAT_ONLY)
    if isinstance(x, Const):
        return const(-x.value if op == "neg" else abs(x.value))
    return Unary(op, x)


def select(cond: Expr, a: Expr, b: Expr, *, floats: bool) -> Expr:
    """`cond ? a : b`; a constant condition picks its branch."""
    if cond.dtype != BOOL:
        raise BuildError(f"condition of '?:' must be boolean, got {cond.dtype}")
    if a.dtype != b.dtype:
        if {a.dtype, b.dtype} == {INT, FLOAT} and floats:
            a, b = to_float(a), to_float(b)
        else:
            raise BuildError(f"branches of '?:' have different types: {a.dtype} and {b.dtype}")
    if isinstance(cond, Const):
        return a if cond.value else b
    return Select(cond, a, b)


def builtin(name: str, args: list[Expr], *, floats: bool) -> Expr:
    """Builtin function call (`BUILTINS`); the caller has checked the arity."""
    if name == "abs":
        return unary("abs", args[0], floats=floats)
    if name in ("min", "max"):
        return binary(name, args[0], args[1], floats=floats)
    if name == "clamp":
        x, lo, hi = args
        return binary("min", binary("max", x, lo, floats=floats), hi, floats=floats)
    # Float functions.
    if not floats:
        raise BuildError(f"'{name}' is a float function; {_FLOAT_ONLY}")
    x = args[0]
    if x.dtype == BOOL:
        raise BuildError(f"'{name}' of bool")
    x = to_float(x)
    if isinstance(x, Const):
        fn = {"tanh": math.tanh, "exp": math.exp, "exp2": lambda v: 2.0 ** v,
              "log": math.log, "sqrt": math.sqrt}[name]
        try:
            return const(float(fn(x.value)))
        except (ValueError, OverflowError):
            raise BuildError(f"{name}({x.value!r}) is undefined") from None
    return FCall(name, (x,))
