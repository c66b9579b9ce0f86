"""Head classes: heads whose specialized masks are identical share one schedule.

Pre: a pattern's mask IR and a shape (q_len, kv_len, heads). Post: the mask specialized to
the shape (`Q_LEN`, `KV_LEN`, `HEADS` substituted, simplified) and, when it uses `h`, once
per head with `h` substituted; heads whose simplified IR is the *same node* (IR nodes are
hash-consed, so identity is structural equality) form one class. A mask without `h` gives
a single class of all heads.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..ir.nodes import Expr, free_vars
from .simplify import simplify, substitute


@dataclass(frozen=True, eq=False)
class HeadGroup:
    """One head class: the heads (ascending) and their common specialized mask."""
    heads: tuple[int, ...]
    mask: Expr


def specialize(mask: Expr, q_len: int, kv_len: int, heads: int) -> Expr:
    """`mask` with the lengths substituted and simplified."""
    return simplify(substitute(mask, {"Q_LEN": q_len, "KV_LEN": kv_len, "HEADS": heads}))


def head_classes(mask: Expr, q_len: int, kv_len: int, heads: int) -> tuple[HeadGroup, ...]:
    """Group heads 0..heads-1 by their specialized mask (classes ordered by first head)."""
    if heads < 1:
        raise ValueError(f"heads must be a positive int, got {heads!r}")
    base = specialize(mask, q_len, kv_len, heads)
    if "h" not in free_vars(base):
        return (HeadGroup(tuple(range(heads)), base),)
    groups: dict[int, list[int]] = {}
    masks: dict[int, Expr] = {}
    for h in range(heads):
        m = simplify(substitute(base, {"h": h}))
        groups.setdefault(id(m), []).append(h)
        masks[id(m)] = m
    return tuple(HeadGroup(tuple(hs), masks[key]) for key, hs in groups.items())
