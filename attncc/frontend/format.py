"""AST → canonical `.attn` text (the inverse of `attncc.frontend.parser`).

Postcondition: for every AST `x` the parser can produce, `parse(format(x)) == x` (locations
aside) and formatting is idempotent. Parentheses are emitted only where precedence requires
them; binary operators get one space on each side; keyword arguments and parameters print as
`name = value`; one declaration per line, `and`/`or`/`not` print as `&`/`|`/`!`.

Precedence, lowest to highest (matches grammar/attn.lark):
ternary < `|` < `&` < `!` < comparison chain < `+ -` < `* / // %` < unary `-` < postfix < atom.
"""
from __future__ import annotations

import math

from . import ast

__all__ = ["format_spec", "format_expr", "format_decl"]

_TERNARY, _OR, _AND, _NOT, _CMP, _SUM, _PROD, _NEG, _POSTFIX, _ATOM = range(10)

_BINARY_PREC = {"|": _OR, "&": _AND, "+": _SUM, "-": _SUM,
                "*": _PROD, "/": _PROD, "//": _PROD, "%": _PROD}


def _prec(e: ast.Expr) -> int:
    if isinstance(e, ast.Ternary):
        return _TERNARY
    if isinstance(e, ast.Binary):
        return _BINARY_PREC[e.op]
    if isinstance(e, ast.Unary):
        return _NOT if e.op == "!" else _NEG
    if isinstance(e, ast.Compare):
        return _CMP
    if isinstance(e, (ast.Call, ast.Index, ast.Attr)):
        return _POSTFIX
    if isinstance(e, ast.Num) and (e.value < 0 or (isinstance(e.value, float) and math.copysign(1, e.value) < 0)):
        return _NEG  # not produced by the parser; printed so that it reads back as `-x`
    return _ATOM


def _num(value) -> str:
    if isinstance(value, bool):
        raise TypeError("Num holds int or float, not bool")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"non-finite float {value!r} has no spelling in the language")
        return repr(value)  # e.g. '0.1', '1e-05', '2.0': the parser reads each back exactly
    return str(int(value))


def format_expr(e: ast.Expr) -> str:
    """Canonical text of one expression, with minimal parentheses."""
    return _fmt(e, _TERNARY)


def _fmt(e: ast.Expr, need: int) -> str:
    text = _raw(e)
    return f"({text})" if _prec(e) < need else text


def _raw(e: ast.Expr) -> str:
    if isinstance(e, ast.Num):
        return _num(e.value)
    if isinstance(e, ast.Bool):
        return "true" if e.value else "false"
    if isinstance(e, ast.Name):
        return e.id
    if isinstance(e, ast.Attr):
        # `(3).y`: a number followed by `.` would read as one (malformed) number literal.
        need = _ATOM + 1 if isinstance(e.value, ast.Num) else _POSTFIX
        return f"{_fmt(e.value, need)}.{e.attr}"
    if isinstance(e, ast.Unary):
        if e.op == "!":
            return "!" + _fmt(e.operand, _NOT)
        if e.op == "-":
            return "-" + _fmt(e.operand, _NEG)
        raise ValueError(f"unknown unary operator {e.op!r}")
    if isinstance(e, ast.Binary):
        p = _BINARY_PREC[e.op]  # left-associative: the right operand binds tighter
        return f"{_fmt(e.left, p)} {e.op} {_fmt(e.right, p + 1)}"
    if isinstance(e, ast.Compare):
        if len(e.operands) != len(e.ops) + 1 or not e.ops:
            raise ValueError("Compare needs len(operands) == len(ops) + 1 >= 2")
        parts = [_fmt(e.operands[0], _SUM)]
        for op, x in zip(e.ops, e.operands[1:]):
            parts += [op, _fmt(x, _SUM)]
        return " ".join(parts)
    if isinstance(e, ast.Ternary):
        return f"{_fmt(e.cond, _OR)} ? {_fmt(e.then, _TERNARY)} : {_fmt(e.orelse, _TERNARY)}"
    if isinstance(e, ast.Call):
        args = [format_expr(a) for a in e.args] + [_keyword(k) for k in e.kwargs]
        return f"{e.func}({', '.join(args)})"
    if isinstance(e, ast.Index):
        return f"{e.name}[{', '.join(format_expr(i) for i in e.indices)}]"
    if isinstance(e, ast.Tuple):
        if len(e.items) < 2:
            raise ValueError("Tuple needs at least two items")
        return f"({', '.join(format_expr(i) for i in e.items)})"
    raise TypeError(f"not an expression node: {type(e).__name__}")


def _keyword(k: ast.Keyword) -> str:
    return f"{k.name} = {format_expr(k.value)}"


def _params(params) -> str:
    return ", ".join(p.name if p.default is None else f"{p.name} = {format_expr(p.default)}"
                     for p in params)


def format_decl(d) -> str:
    """One declaration (or the header) as a single line, without the newline."""
    if isinstance(d, ast.Header):
        return f"pattern {d.name}({_params(d.params)})" if d.params else f"pattern {d.name}"
    if isinstance(d, ast.LayoutDecl):
        return f"layout {d.kind}({', '.join(_keyword(k) for k in d.axes)})"
    if isinstance(d, ast.InputDecl):
        return f"input {d.name}: {d.dtype}[{', '.join(format_expr(x) for x in d.dims)}]"
    if isinstance(d, ast.Def):
        head = f"def {d.name}({_params(d.params)})" if d.params else f"def {d.name}"
        return f"{head} = {format_expr(d.body)}"
    if isinstance(d, ast.MaskClause):
        return f"mask {format_expr(d.expr)}"
    if isinstance(d, ast.ScoreClause):
        return f"score {format_expr(d.expr)}"
    if isinstance(d, ast.NormalizeClause):
        return f"normalize {d.kind}"
    if isinstance(d, ast.OutputClause):
        return f"output {d.kind} {format_expr(d.expr)}"
    raise TypeError(f"not a declaration node: {type(d).__name__}")


def format_spec(spec: ast.Spec) -> str:
    """Canonical text of a whole spec: the header (if any), then one declaration per line,
    ending with a newline."""
    lines = [format_decl(spec.header)] if spec.header is not None else []
    lines += [format_decl(d) for d in spec.decls]
    return "".join(line + "\n" for line in lines)
