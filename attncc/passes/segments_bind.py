"""Elaboration of segmented and separate layouts (several `layout` lines): reads them into a
`Segmented` layout on an `Elaborator`, then guards and checks its clauses. The semantics are
in `attncc.passes.segments` and `attncc.ir.segmented`."""
from __future__ import annotations

import dataclasses

from ..frontend import ast
from ..ir.nodes import INDEX_VARS, LENGTH_VARS, Expr
from ..ir.segmented import Segment, Segmented, SideLayout
from .neighborhood import _Ctx
from .segments import SegmentLengthCheck, guard, misuse

SHARED_KINDS = ("tokens", "grid")
SIDE_KINDS = ("q_tokens", "q_grid", "k_tokens", "k_grid")


def side_segments(items: list) -> tuple[list, list]:
    """Segments of one side from its layout items in order, and the errors.

    items  [("grid", Layout) | ("tokens", [(name, size), ...])]; sizes already checked to be
           positive ints
    Returns (segments, errors) with each error (item index, entry index or None, message).
    Shared by the spec elaborator (errors at the layout lines) and the decorator."""
    parts: list[Segment] = []
    errors: list = []
    start, grid_seen = 0, False
    names: set[str] = set()
    axis_names: set[str] = set()
    for i, (kind, value) in enumerate(items):
        if kind == "grid":
            if grid_seen:
                errors.append((i, None, "at most one grid segment per side"))
                continue
            grid_seen = True
            for a in value.axes:
                if a.name in names:
                    errors.append((i, None, f"grid axis '{a.name}' has the name of a token "
                                            "segment"))
                axis_names.add(a.name)
            parts.append(Segment("grid", start, value.numel, value))
            start += value.numel
            continue
        for j, (name, size) in enumerate(value):
            if name in names or name in INDEX_VARS + LENGTH_VARS or name == "grid" \
                    or name in axis_names:
                errors.append((i, j, f"bad segment name '{name}'"
                               + (" (duplicate)" if name in names else
                                  " ('grid' names the grid segment)" if name == "grid" else "")))
                continue
            names.add(name)
            parts.append(Segment(name, start, size))
            start += size
    return parts, errors


def _side_segments(el, decls: list, what: str) -> list:
    """Segments of one side from its layout lines (in order); errors go to `el`."""
    items, locs = [], []
    for d in decls:
        if d.kind.endswith("grid"):
            el.layout = None
            el.bind_layout(dataclasses.replace(d, kind="grid"))
            if el.layout is not None and el.layout.axes:
                items.append(("grid", el.layout))
                locs.append((d, []))
            continue
        if not d.axes:
            el.error(d.loc, f"{d.kind}(...) needs at least one segment, e.g. {d.kind}(text = 77)")
        entries, kws = [], []
        for kw in d.axes:
            size = el.constant(kw.value, _Ctx("const"), f"size of segment '{kw.name}'")
            if size is None:
                continue
            if type(size) is not int or size < 1:
                el.error(kw.value.loc, f"size of segment '{kw.name}' must be a positive "
                                       f"integer, got {size!r}")
                continue
            entries.append((kw.name, size))
            kws.append(kw)
        items.append(("tokens", entries))
        locs.append((d, kws))
    parts, errors = side_segments(items)
    for i, j, msg in errors:
        d, kws = locs[i]
        if msg.startswith("at most one grid"):
            msg = f"{what} has at most one grid segment"
        el.error(d.loc if j is None else kws[j].loc, msg)
    return parts


def bind_segments(el, layouts: list) -> None:
    """Read the `layout` lines of a spec into `el.segmented` (a `Segmented`). While clauses
    are elaborated `el.layout` is the grid the primitives act on: the shared grid, or with
    separate layouts the key grid (`attncc.passes.grid_map` maps queries onto it)."""
    separate = [d for d in layouts if d.kind in SIDE_KINDS]
    if separate:
        for d in layouts:
            if d.kind not in SIDE_KINDS:
                el.error(d.loc, f"'{d.kind}' cannot be combined with q_grid / k_grid layouts")
        q_decls = [d for d in separate if d.kind.startswith("q_")]
        k_decls = [d for d in separate if d.kind.startswith("k_")]
        for decls, which, kinds in ((q_decls, "query", "q_grid or q_tokens"),
                                    (k_decls, "key", "k_grid or k_tokens")):
            if not decls:
                el.error(layouts[0].loc, f"separate layouts need a query and a key layout; "
                                         f"the {which} layout ({kinds}) is missing")
        q = _side_segments(el, q_decls, "the query layout")
        k = _side_segments(el, k_decls, "the key layout")
        layout = Segmented(SideLayout(tuple(q)), SideLayout(tuple(k)), shared=False)
    else:
        parts = _side_segments(el, layouts, "a layout")
        side = SideLayout(tuple(parts))
        layout = Segmented(side, side, shared=True)
    el._segments_loc = layouts[0].loc
    if el.diags.items:
        el.segmented, el.layout = layout, None
        return
    attach(el, layout)


def attach(el, layout: Segmented) -> None:
    """Elaborate clauses of `el` over `layout`: coordinates and membership resolve against
    it, and the primitives act on the shared grid, or with separate layouts on the key grid
    (`attncc.passes.grid_map` places the queries on it)."""
    el.segmented = layout
    el.layout = layout.q.grid if layout.shared else layout.k.grid
    if not layout.shared:
        from .grid_map import bind_grid_primitives
        bind_grid_primitives(el, layout)


def finish_clauses(el, clauses: dict, spec: ast.Spec) -> None:
    """Reject coordinates where they cannot be guarded, guard the rest (`segments.guard`),
    record the call-time length check; the pattern's layout becomes the `Segmented` one."""
    layout = el.segmented
    kinds = {"mask": ast.MaskClause, "score": ast.ScoreClause, "output": ast.OutputClause}
    for key, kind in kinds.items():
        e = clauses.get(key)
        if not isinstance(e, Expr):
            continue
        why = misuse(layout, e, key)
        if why is not None:
            decl = next(d for d in spec.decls if isinstance(d, kind))
            el.error(decl.expr.loc, why)
            continue
        clauses[key] = guard(e, layout)
    el.layout = layout
    el.checks.append(SegmentLengthCheck(el._segments_loc, layout.q.numel, layout.k.numel,
                                        str(layout), layout.shared))
