"""Stable text form of the mask IR.

Expressions print in infix with full parenthesization of nested operators, so the text is
unambiguous and independent of construction order. `format_dag` binds every non-leaf node
used more than once to a numbered local (`%0 = ...`) in a deterministic (post-order) order.
"""
from __future__ import annotations

from collections import Counter

from .nodes import (Binary, Blocks, Const, Coord, Expr, FCall, Load, OP_SYMBOL, Route,
                    Select, Unary, Var, walk)


def _const(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        if v == float("inf"):
            return "inf"
        if v == float("-inf"):
            return "-inf"
        return repr(v)
    return str(v)


def _render(node: Expr, name) -> str:
    """Render one node, naming children with `name(child)`."""
    if isinstance(node, Const):
        return _const(node.value)
    if isinstance(node, Var):
        return node.name
    if isinstance(node, Coord):
        return f"{node.side}.{node.name}"
    if isinstance(node, Unary):
        if node.op == "neg":
            return f"-{name(node.x)}"
        if node.op == "not":
            return f"!{name(node.x)}"
        return f"{node.op}({strip_parens(name(node.x))})"
    if isinstance(node, Binary):
        if node.op in ("min", "max"):
            return f"{node.op}({strip_parens(name(node.a))}, {strip_parens(name(node.b))})"
        return f"({name(node.a)} {OP_SYMBOL[node.op]} {name(node.b)})"
    if isinstance(node, Select):
        return f"({name(node.cond)} ? {name(node.a)} : {name(node.b)})"
    if isinstance(node, FCall):
        return f"{node.fn}({', '.join(strip_parens(name(a)) for a in node.args)})"
    if isinstance(node, Load):
        return f"{node.input}[{', '.join(strip_parens(name(i)) for i in node.index)}]"
    if isinstance(node, Route):
        def size(r):
            return str(r[0]) if len(r) == 1 else "(" + ", ".join(map(str, r)) + ")"
        extra = "" if node.q_region is None else f", query_region={size(node.q_region)}"
        extra += ", causal=true" if node.causal else ""
        return f"route(region={size(node.region)}, topk={node.topk}{extra})"
    if isinstance(node, Blocks):
        sel = f"top={node.top!r}" if node.top is not None else f"threshold={node.threshold!r}"
        return f"blocks({node.input}, block={node.block}, {sel})"
    raise AssertionError(type(node).__name__)


def strip_parens(text: str) -> str:
    if text.startswith("(") and text.endswith(")"):
        depth = 0
        for i, ch in enumerate(text):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0 and i < len(text) - 1:
                return text
        return text[1:-1]
    return text


def format_expr(root: Expr) -> str:
    """One-line infix text of `root` (shared subexpressions are repeated)."""
    memo: dict[int, str] = {}
    for node in walk(root):
        memo[id(node)] = _render(node, lambda c: memo[id(c)])
    return strip_parens(memo[id(root)])


def format_dag(roots: dict[str, Expr]) -> str:
    """Text of several named roots, binding shared non-leaf subexpressions to `%n` locals.

    >>> print(format_dag({"mask": some_expr}))
    %0 = (q - k)
    mask = (%0 >= 0) & (%0 < 4)
    """
    uses: Counter = Counter()
    order: list[Expr] = []
    seen: set[int] = set()
    for root in roots.values():
        if root is None:
            continue
        for node in walk(root):
            if id(node) not in seen:
                seen.add(id(node))
                order.append(node)
                for c in node.children():
                    uses[id(c)] += 1
    names: dict[int, str] = {}
    text: dict[int, str] = {}
    lines = []
    for node in order:
        body = _render(node, lambda c: names.get(id(c)) or text[id(c)])
        text[id(node)] = body
        if uses[id(node)] > 1 and node.children():
            local = f"%{len(names)}"
            names[id(node)] = local
            lines.append(f"{local} = {strip_parens(body)}")
    for label, root in roots.items():
        if root is None:
            continue
        lines.append(f"{label} = {strip_parens(names.get(id(root)) or text[id(root)])}")
    return "\n".join(lines)
