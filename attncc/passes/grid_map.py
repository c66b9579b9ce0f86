"""`neighborhood`, `blocked` and `route` with separate query and key grids.

With a query grid Q and a key grid K that have the same axes (names, in the same order, sizes
free), each query is placed on the key grid axis by axis: coordinate i of a query axis of
length Q_a maps to the key cell

    c_a(i) = ⌊(2·i + 1)·K_a / (2·Q_a)⌋

the key cell that contains the centre of the query's cell when both grids cover the same
extent. It is ⌊i / r⌋ when Q_a = r·K_a (keys pooled by r: HiLo, pooled-key cross attention),
i itself when the sizes match, and r·i + ⌊r/2⌋ when K_a = r·Q_a (coarse queries over fine
keys), so an even window `neighborhood(r)` covers exactly the r fine cells under the query.
The primitives then act on the key grid as if the query sat at c:

    neighborhood(kernel, dilation, stride, causal)   NATTEN (DESIGN §4) on axis length K_a
                                                     with query coordinate c_a
    blocked(size)                                    ⌊c_a / size_a⌋ == ⌊k.a / size_a⌋
    route(region, topk)                              regions of `region` key cells per axis;
                                                     a query belongs to the region of c

All sizes (kernel, block, region) count key-grid cells. Misuse is a located error: a side
without a grid, axes that differ, a kernel longer than the key axis.
"""
from __future__ import annotations

from ..frontend import ast
from ..ir.nodes import Coord, Route
from ..ir.segmented import mapped_cell_expr
from .neighborhood import _Failed, blocked_axis, conjunction, neighborhood_axis
from .primitives import const


def _axes(el, layout, name, loc, ctx):
    """[(query coordinate mapped onto the key grid, key coordinate, key axis length, label)]."""
    qg, kg = layout.q.grid, layout.k.grid
    for g, which in ((qg, "query"), (kg, "key")):
        if g is None:
            el.fail(loc, f"'{name}' needs a query grid and a key grid (the {which} layout has "
                         "no grid)", ctx=ctx)
    qn, kn = [a.name for a in qg.axes], [a.name for a in kg.axes]
    if qn != kn:
        el.fail(loc, f"'{name}' places each query on the key grid axis by axis: the query and "
                     f"key grids need the same axes (query grid: {', '.join(qn)}; key grid: "
                     f"{', '.join(kn)})", ctx=ctx)
    out = []
    for a, (qa, ka) in enumerate(zip(qg.axes, kg.axes)):
        c = mapped_cell_expr(Coord("q", a, qa.name), qa.size, ka.size)
        out.append((c, Coord("k", a, ka.name), const(ka.size), ka.name))
    return out


def bind_grid_primitives(el, layout) -> None:
    """Install the separate-grid `neighborhood` / `blocked` / `route` on elaborator `el`
    (whose `layout` is the key grid while clauses are elaborated)."""

    def neighborhood(bound, loc, ctx):
        axes = _axes(el, layout, "neighborhood", loc, ctx)
        kern = el.axes_values("neighborhood", "kernel", bound["kernel"], ctx)
        dil = el.axes_values("neighborhood", "dilation", bound.get("dilation", ast.Num(1)), ctx)
        stride = el.axes_values("neighborhood", "stride", bound.get("stride", ast.Num(1)), ctx)
        caus = el.axes_values("neighborhood", "causal", bound.get("causal", ast.Bool(False)),
                              ctx, kind=bool)
        parts, bad = [], False
        for (i, j, L, label), K, d, s, c in zip(axes, kern, dil, stride, caus):
            if s > K:
                el.error(loc, f"neighborhood stride {s} exceeds the kernel size {K} on axis "
                              f"'{label}'", "NATTEN requires stride <= kernel", ctx=ctx)
                bad = True
            if K * d > L.value:
                el.error(loc, f"neighborhood kernel {K} x dilation {d} = {K * d} exceeds the "
                              f"length {L.value} of axis '{label}' of the key grid", ctx=ctx)
                bad = True
            parts.append(neighborhood_axis(i, j, L, K, d, s, c))
        if bad:
            raise _Failed
        return el.build_all(conjunction, loc, ctx, parts)

    def blocked(bound, loc, ctx):
        axes = _axes(el, layout, "blocked", loc, ctx)
        sizes = el.axes_values("blocked", "size", bound["size"], ctx)
        return conjunction([blocked_axis(i, j, sz) for (i, j, _, _), sz in zip(axes, sizes)])

    def route(bound, loc, ctx):
        axes = _axes(el, layout, "route", loc, ctx)
        region = el.axes_values("route", "region", bound["region"], ctx)
        topk = el.constant(bound["topk"], ctx, "'topk' of 'route'")
        if topk is None:
            raise _Failed
        if type(topk) is not int or topk < 1:
            el.fail(bound["topk"].loc, f"'topk' of 'route' must be an integer >= 1, got "
                                       f"{topk!r}", ctx=ctx)
        del axes
        return Route(tuple(region), topk)

    el.prim_neighborhood = neighborhood
    el.prim_blocked = blocked
    el.prim_route = route
