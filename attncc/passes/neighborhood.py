"""Layout-dependent mask primitives built in Python: `neighborhood` (NATTEN) and `blocked`.

Both act per layout axis and AND the axes together. An axis is given by the query and key
coordinate expressions `i`, `j` and its length `L` (a constant for grid layouts, or the
`Q_LEN` variable for a pattern without a layout, where the mask acts on the flat index).

`neighborhood` follows NATTEN exactly (DESIGN §4), per axis with kernel K, dilation d,
stride s:

    g = i mod d,  i' = i // d,  L_g = L // d + [g < L mod d],  keys need j mod d = g
    non-causal: leader = min((i' // s)·s + s // 2, L_g − 1)
                start  = clamp(leader − K // 2, 0, L_g − K);   start ≤ j // d < start + K
    causal:     leader = min((i' // s)·s + s − 1, L_g − 1)
                max(leader − K + 1, 0) ≤ j // d ≤ i'

Terms that are provably redundant for in-range indices are left out (d = 1 drops the
residue class; s = 1 makes the leader i' itself, because i' ≤ L_g − 1 for every valid i),
so the common cases produce small band expressions the tile analysis recognises.
"""
from __future__ import annotations

from ..ir.nodes import TRUE, Const, Expr
from .primitives import binary, builtin, const, select


def _b(op, a, b):
    return binary(op, a, b, floats=False)


def _c(v: int) -> Expr:
    return const(v)


def neighborhood_axis(i: Expr, j: Expr, L: Expr, kernel: int, dilation: int, stride: int,
                      causal: bool) -> Expr:
    """NATTEN mask along one axis (bool IR). Requires kernel·dilation ≤ L, stride ≤ kernel
    (checked by the caller)."""
    K, d, s = kernel, dilation, stride
    conds = []
    if d == 1:
        ip, jp, Lg = i, j, L
    else:
        g = _b("mod", i, _c(d))
        ip, jp = _b("floordiv", i, _c(d)), _b("floordiv", j, _c(d))
        base, rem = _b("floordiv", L, _c(d)), _b("mod", L, _c(d))
        # Group length L // d + [g < L mod d]; constant when d divides a constant L.
        Lg = base if isinstance(rem, Const) and rem.value == 0 else _group_len(base, g, rem)
        conds.append(_b("eq", _b("mod", j, _c(d)), g))
    last = _b("sub", Lg, _c(1))
    if causal:
        if s == 1:
            leader = ip
        else:
            leader = builtin("min", [_b("add", _b("mul", _b("floordiv", ip, _c(s)), _c(s)),
                                          _c(s - 1)), last], floats=False)
        lo = builtin("max", [_b("sub", leader, _c(K - 1)), _c(0)], floats=False)
        conds += [_b("le", lo, jp), _b("le", jp, ip)]
    else:
        if s == 1:
            leader = ip
        else:
            leader = builtin("min", [_b("add", _b("mul", _b("floordiv", ip, _c(s)), _c(s)),
                                          _c(s // 2)), last], floats=False)
        start = builtin("clamp", [_b("sub", leader, _c(K // 2)), _c(0), _b("sub", Lg, _c(K))],
                        floats=False)
        conds += [_b("le", start, jp), _b("lt", jp, _b("add", start, _c(K)))]
    out = conds[0]
    for c in conds[1:]:
        out = _b("and", out, c)
    return out


def _group_len(base: Expr, g: Expr, rem: Expr) -> Expr:
    """`base + (g < rem ? 1 : 0)`: the length of dilation group g."""
    return _b("add", base, select(_b("lt", g, rem), _c(1), _c(0), floats=False))


def blocked_axis(i: Expr, j: Expr, size: int) -> Expr:
    """`i // size == j // size` (same block of `size` along this axis)."""
    return _b("eq", _b("floordiv", i, _c(size)), _b("floordiv", j, _c(size)))


def conjunction(parts: list[Expr]) -> Expr:
    """AND of `parts` in order (TRUE when empty)."""
    if not parts:
        return TRUE
    out = parts[0]
    for p in parts[1:]:
        out = _b("and", out, p)
    return out
