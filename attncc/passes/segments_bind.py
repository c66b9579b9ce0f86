"""Elaboration of segmented layouts (several `layout` lines): binds the segments on an
`Elaborator` and lowers its clauses afterwards. The semantics are in `passes.segments`."""
from __future__ import annotations

import dataclasses

from ..frontend import ast
from ..ir.nodes import INDEX_VARS, LENGTH_VARS, Expr
from .neighborhood import _Ctx
from .segments import GridLengthCheck, Segment, SegmentLengthCheck, Segments, TwoGrids


def bind_two_grids(el, layouts: list) -> None:
    """`layout q_grid(...)` and `layout k_grid(...)`: separate query and key grids."""
    grids = {}
    for d in layouts:
        if d.kind not in ("q_grid", "k_grid"):
            el.error(d.loc, f"'{d.kind}' cannot be combined with q_grid / k_grid layouts")
            continue
        if d.kind in grids:
            el.error(d.loc, f"duplicate {d.kind} layout")
            continue
        el.bind_layout(dataclasses.replace(d, kind="grid"))
        grids[d.kind] = el.layout
    for kind in ("q_grid", "k_grid"):
        if kind not in grids:
            el.error(layouts[0].loc, f"separate layouts need both q_grid(...) and k_grid(...); "
                                     f"{kind} is missing")
    if el.diags.items:
        el.layout = None
        return
    el.layout = grids["q_grid"]
    el.segments = TwoGrids(grids["q_grid"], grids["k_grid"])
    el._segments_loc = layouts[0].loc

    def needs_one_layout(name):
        def refuse(bound, loc, ctx):
            el.fail(loc, f"'{name}' needs one layout for queries and keys (this pattern has "
                         "separate q_grid and k_grid)", ctx=ctx)
        return refuse
    # The Python primitives read one layout for both sides: refuse them here.
    el.prim_neighborhood = needs_one_layout("neighborhood")
    el.prim_blocked = needs_one_layout("blocked")


def bind_segments(el, layouts: list) -> None:
    """Read `layout tokens(name = size, ...)` / `layout grid(...)` lines in order into
    `el.segments`; the grid (at most one) becomes `el.layout` while clauses are elaborated."""
    if any(d.kind in ("q_grid", "k_grid") for d in layouts):
        return bind_two_grids(el, layouts)
    parts: list[Segment] = []
    start, grid, grid_start, grid_loc = 0, None, 0, None
    seen: set[str] = set()
    for d in layouts:
        if d.kind == "grid":
            if grid_loc is not None:
                el.error(d.loc, "a layout has at most one grid segment")
                continue
            grid_loc = d.loc
            el.bind_layout(d)
            grid = el.layout
            if grid is None or not grid.axes:
                continue
            clash = [a.name for a in grid.axes if a.name in seen]
            for name in clash:
                el.error(d.loc, f"grid axis '{name}' has the name of a token segment")
            parts.append(Segment("grid", start, grid.numel))
            grid_start, start = start, start + grid.numel
        elif d.kind == "tokens":
            if not d.axes:
                el.error(d.loc, "tokens(...) needs at least one segment, e.g. tokens(text = 77)")
            for kw in d.axes:
                axis_names = [a.name for a in grid.axes] if grid is not None else []
                if kw.name in seen or kw.name in INDEX_VARS + LENGTH_VARS or kw.name == "grid" \
                        or kw.name in axis_names:
                    el.error(kw.loc, f"bad segment name '{kw.name}'"
                             + (" (duplicate)" if kw.name in seen else
                                " ('grid' names the grid segment)" if kw.name == "grid" else ""))
                    continue
                seen.add(kw.name)
                size = el.constant(kw.value, _Ctx("const"), f"size of segment '{kw.name}'")
                if size is None:
                    continue
                if type(size) is not int or size < 1:
                    el.error(kw.value.loc, f"size of segment '{kw.name}' must be a positive "
                                           f"integer, got {size!r}")
                    continue
                parts.append(Segment(kw.name, start, size))
                start += size
    el.segments = Segments(tuple(parts), grid if grid_loc is not None else None, grid_start)
    el._segments_loc = layouts[0].loc


def lower_clauses(el, clauses: dict, spec: ast.Spec) -> None:
    """Rewrite the elaborated clauses over the flat token index (`Segments.lower`); reject
    coordinates where they cannot be guarded; record the call-time length check."""
    seg = el.segments
    kinds = {"mask": ast.MaskClause, "score": ast.ScoreClause, "output": ast.OutputClause}
    for key, kind in kinds.items():
        e = clauses.get(key)
        if not isinstance(e, Expr):
            continue
        why = seg.misuse(e, key)
        if why is not None:
            decl = next(d for d in spec.decls if isinstance(d, kind))
            el.error(decl.expr.loc, why)
            continue
        clauses[key] = seg.lower(e)
    el.layout = None
    if isinstance(seg, TwoGrids):
        el.checks.append(GridLengthCheck(el._segments_loc, seg.q.numel, seg.k.numel))
    else:
        el.checks.append(SegmentLengthCheck(el._segments_loc, seg.total, seg.describe()))
