"""Library primitives implemented in Python: `neighborhood` (NATTEN), `blocked`, `route`,
`blocks` (they depend on the layout or select from runtime data), plus the small shared
state types of elaboration.

Both act per layout axis and AND the axes together. An axis is given by the query and key
coordinate expressions `i`, `j` and its length `L` (a constant for grid layouts, or the
`Q_LEN` variable for a pattern without a layout, where the mask acts on the flat index;
NATTEN is self-attention, so keys at or beyond Q_LEN fall outside every window).

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

from dataclasses import dataclass, field
from typing import Optional, Union

from ..frontend import ast
from ..frontend.errors import suggest
from ..ir.nodes import FLOAT, TRUE, Blocks, Const, Coord, Expr, Route, Var
from .primitives import BuildError, binary, builtin, const, select


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


# ---- shared elaboration state and the Python-implemented primitives --------------------------

#: Primitives implemented in Python: name -> ((param, default-or-REQUIRED), ...).
REQUIRED = object()
PY_PRIMITIVES = {
    "neighborhood": (("kernel", REQUIRED), ("dilation", 1), ("stride", 1), ("causal", False)),
    "blocked": (("size", REQUIRED),),
    "route": (("region", REQUIRED), ("topk", REQUIRED), ("query_region", None),
              ("causal", False)),
    "blocks": (("scores", REQUIRED), ("block", REQUIRED), ("top", None), ("threshold", None)),
}


@dataclass(frozen=True)
class LengthCheck:
    """A NATTEN constraint `kernel * dilation <= Q_LEN` deferred to call time."""
    loc: Optional[ast.Loc]
    kernel: int
    dilation: int


@dataclass(frozen=True)
class TupleValue:
    """`(a, b, ...)`: a per-axis argument, only meaningful to primitives."""
    items: tuple


Value = Union[Expr, TupleValue]


@dataclass
class _Ctx:
    clause: str                      # 'const' | 'mask' | 'score' | 'output'
    env: dict = field(default_factory=dict)   # def parameters in scope
    site: Optional[ast.Loc] = None   # report errors here (inside prelude expansions)
    stack: tuple = ()                # defs being expanded (recursion check)

    @property
    def floats(self) -> bool:
        return self.clause in ("const", "score", "output")


class _Failed(Exception):
    """Internal: the current expression already produced a diagnostic."""


class PythonPrimitives:
    """Mixin of `Elaborator`: the primitives implemented in Python (`PY_PRIMITIVES`). Each
    `prim_<name>(bound, loc, ctx)` gets its arguments as AST nodes keyed by parameter name
    and returns IR; it uses the elaborator's `expr`, `constant`, `fail`, `error`, `build`."""

    def axes_values(self, fname, pname, e, ctx, kind=int, lo=1):
        """A per-axis constant argument: one value per layout axis (scalars broadcast)."""
        n = len(self.layout.axes) if self.layout is not None else 1
        v = self.expr(e, _Ctx("const", ctx.env, ctx.site, ctx.stack))
        items = v.items if isinstance(v, TupleValue) else (v,) * n
        if isinstance(v, TupleValue) and len(items) != n:
            where = (f"the layout has {n} axes ({', '.join(a.name for a in self.layout.axes)})"
                     if self.layout is not None else "the pattern has no layout (one axis)")
            self.fail(e.loc, f"'{pname}' of '{fname}' has {len(items)} values but {where}", ctx=ctx)
        out = []
        for x in items:
            if not isinstance(x, Const):
                self.fail(e.loc, f"'{pname}' of '{fname}' must be a constant", ctx=ctx)
            x = x.value
            if kind is bool:
                if not isinstance(x, bool):
                    self.fail(e.loc, f"'{pname}' of '{fname}' must be true or false", ctx=ctx)
            elif type(x) is not int or x < lo:
                self.fail(e.loc, f"'{pname}' of '{fname}' must be an integer >= {lo}, got {x!r}",
                          ctx=ctx)
            out.append(x)
        return out

    def axis_exprs(self):
        """Per axis: (query coordinate, key coordinate, length expression, axis label)."""
        if self.layout is None:
            return [(Var("q"), Var("k"), Var("Q_LEN"), None)]
        return [(Coord("q", i, a.name), Coord("k", i, a.name), const(a.size), a.name)
                for i, a in enumerate(self.layout.axes)]

    def prim_neighborhood(self, bound, loc, ctx):
        kern = self.axes_values("neighborhood", "kernel", bound["kernel"], ctx)
        dil = self.axes_values("neighborhood", "dilation", bound.get("dilation", ast.Num(1)), ctx)
        stride = self.axes_values("neighborhood", "stride", bound.get("stride", ast.Num(1)), ctx)
        caus = self.axes_values("neighborhood", "causal", bound.get("causal", ast.Bool(False)),
                                ctx, kind=bool)
        parts, bad = [], False
        for (i, j, L, label), K, d, s, c in zip(self.axis_exprs(), kern, dil, stride, caus):
            where = f" on axis '{label}'" if label else ""
            if s > K:
                self.error(loc, f"neighborhood stride {s} exceeds the kernel size {K}{where}",
                           "NATTEN requires stride <= kernel", ctx=ctx)
                bad = True
            if isinstance(L, Const) and K * d > L.value:
                self.error(loc, f"neighborhood kernel {K} x dilation {d} = {K * d} exceeds the "
                                f"length {L.value} of axis '{label}'", ctx=ctx)
                bad = True
            elif not isinstance(L, Const):
                self.checks.append(LengthCheck(ctx.site or loc, K, d))
            parts.append(neighborhood_axis(i, j, L, K, d, s, c))
        if bad:
            raise _Failed
        return self.build_all(conjunction, loc, ctx, parts)

    def build_all(self, fn, loc, ctx, *args):
        try:
            return fn(*args)
        except BuildError as e:
            self.fail(loc, str(e), ctx=ctx)

    def prim_blocked(self, bound, loc, ctx):
        sizes = self.axes_values("blocked", "size", bound["size"], ctx)
        parts = [blocked_axis(i, j, sz) for (i, j, _, _), sz in zip(self.axis_exprs(), sizes)]
        if self.layout is not None and len(self.layout.axes) == 1 \
                and getattr(self, "segmented", None) is None:  # a 1-D grid is the token index
            parts = [blocked_axis(Var("q"), Var("k"), sizes[0])]
        return conjunction(parts)

    def prim_route(self, bound, loc, ctx):
        region = self.axes_values("route", "region", bound["region"], ctx)
        topk = self.constant(bound["topk"], ctx, "'topk' of 'route'")
        if topk is None:
            raise _Failed
        if type(topk) is not int or topk < 1:
            self.fail(bound["topk"].loc, f"'topk' of 'route' must be an integer >= 1, got {topk!r}",
                      ctx=ctx)
        q_region = None
        if bound.get("query_region") is not None:
            q_region = tuple(self.axes_values("route", "query_region", bound["query_region"], ctx))
        causal = False
        if bound.get("causal") is not None:
            causal = self.axes_values("route", "causal", bound["causal"], ctx, kind=bool)[0]
            if causal and self.layout is not None and len(self.layout.axes) > 1:
                self.fail(bound["causal"].loc, "'causal' of 'route' needs a 1-D sequence; the "
                                               f"layout {self.layout} has "
                                               f"{len(self.layout.axes)} axes", ctx=ctx)
        return Route(tuple(region), topk, q_region if q_region != tuple(region) else None,
                     bool(causal))

    def prim_blocks(self, bound, loc, ctx):
        src = bound["scores"]
        if not isinstance(src, ast.Name):
            self.fail(src.loc, "the first argument of 'blocks' must be the name of an input "
                               "declared float[b, h, q_blocks, k_blocks]", ctx=ctx)
        decl = self.inputs.get(src.id)
        if decl is None:
            self.fail(src.loc, f"unknown input '{src.id}'", suggest(src.id, self.inputs), ctx=ctx)
        if decl.dtype != FLOAT or decl.dims != ("b", "h", "q_blocks", "k_blocks"):
            self.fail(src.loc, f"'blocks' needs an input declared float[b, h, q_blocks, k_blocks]; "
                               f"'{src.id}' is {decl.dtype}[{', '.join(map(str, decl.dims))}]",
                      ctx=ctx)
        block = self.constant(bound["block"], ctx, "'block' of 'blocks'")
        if block is None:
            raise _Failed
        if type(block) is not int or block < 1:
            self.fail(bound["block"].loc, "'block' of 'blocks' must be an integer >= 1", ctx=ctx)
        top, thr = bound.get("top"), bound.get("threshold")
        if (top is None) == (thr is None):
            self.fail(loc, "'blocks' needs exactly one of 'top' and 'threshold'", ctx=ctx)
        if top is not None:
            f = self.constant(top, ctx, "'top' of 'blocks'")
            if f is None:
                raise _Failed
            if isinstance(f, bool) or not 0 < f <= 1:
                self.fail(top.loc, f"'top' of 'blocks' must be a fraction in (0, 1], got {f!r}",
                          ctx=ctx)
            return Blocks(src.id, block, top=float(f))
        t = self.constant(thr, ctx, "'threshold' of 'blocks'")
        if t is None or isinstance(t, bool):
            self.fail(thr.loc, "'threshold' of 'blocks' must be a number", ctx=ctx)
        return Blocks(src.id, block, threshold=float(t))

