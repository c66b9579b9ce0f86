"""Structural queries on mask expressions shared by the schedule, decode and runtime stages."""
from __future__ import annotations

from typing import Optional

from .nodes import Binary, Expr, Load, Var

__all__ = ["conjuncts", "document_input"]


def conjuncts(e: Expr) -> list[Expr]:
    """The terms of `e` read as a conjunction `t1 & t2 & ...` (just `[e]` for a non-`&`)."""
    if isinstance(e, Binary) and e.op == "and":
        return conjuncts(e.a) + conjuncts(e.b)
    return [e]


def document_input(e: Expr) -> Optional[str]:
    """Name of `doc` when `e` is `doc[b, q] == doc[b, k]` (either side order), else None."""
    if not (isinstance(e, Binary) and e.op == "eq" and isinstance(e.a, Load)
            and isinstance(e.b, Load) and e.a.input == e.b.input and len(e.a.index) == 2):
        return None
    sides = []
    for ld in (e.a, e.b):
        i0, i1 = ld.index
        if not (isinstance(i0, Var) and i0.name == "b" and isinstance(i1, Var)
                and i1.name in ("q", "k")):
            return None
        sides.append(i1.name)
    return e.a.input if sorted(sides) == ["k", "q"] else None
