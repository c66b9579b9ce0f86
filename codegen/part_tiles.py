"""Kernel lines for the tiles of a segmented side (`SegmentedGrid`): each tile lies in one part
(a run of plain tokens with 1-D tiles, or the grid with boxes or 1-D tiles over its own
tokens), parts numbered consecutively, so the part of tile t is a scalar fact:
`t >= T_p` for the first tile T_p of part p.

For every part the lines compute, from the tile's index local to the part (`lt = t - T_p`):
    origin  first flat token row of the tile (scalar): start + lt·BLOCK (1-D), or
            start + Σ_a origin_a·stride_a with origin_a = ((lt // inner_a) % count_a)·extent_a
    row     in-tile row offset of every slot: the slot itself (1-D), or Σ_a slot_a·stride_a
            (boxes; hoisted per program)
    ok      which slots hold a token of the part
    coords  the grid's coordinates (grid part only): origin_a + slot_a (boxes), or
            (local // stride_a) % size_a (1-D tiles over the grid)
and selects the tile's part with scalar `tl.where`s. `<side>_idx = origin + row`; `<side>_ok`
and the coordinates `qc<a>` / `kc<a>` are what the per-element code reads (coordinates of
tiles outside the grid are never used: the mask guards them). `<side>_org` / `<side>_row`
give the K/V addresses as a 64-bit scalar plus 32-bit in-tile offsets.
"""
from __future__ import annotations

import math

from attncc.passes.segment_blocks import side_parts


def _axis_terms(counts, tile):
    nd = len(tile)
    for a in range(nd):
        yield a, math.prod(counts[a + 1:]), counts[a], math.prod(tile[a + 1:]), tile[a]


def _select(conds: list[str], values: list[str]) -> str:
    """Nested `tl.where` picking values[p] for the last true conds[p] (conds[0] is unused:
    part 0 is the default)."""
    if len(set(values)) == 1:
        return values[0]
    text = values[0]
    for c, v in zip(conds[1:], values[1:]):
        text = f"tl.where({c}, {v}, {text})"
    return text


def part_tile_lines(side: str, grid, layout) -> tuple[list[str], list[str], bool]:
    """(hoisted lines, per-tile lines, row_is_slot) of a `SegmentedGrid` side (module doc).
    `layout` is the pattern's `Segmented` layout; row_is_slot: every part's in-tile row is
    the slot itself (the K/V offsets can then be hoisted)."""
    tvar, block = ("m", "BLOCK_M") if side == "q" else ("n", "BLOCK_N")
    c = "qc" if side == "q" else "kc"
    s = side
    parts = side_parts(layout.side(side))
    firsts = grid.tile_offsets
    hoist = [f"{s}_slot = tl.arange(0, {block})"]
    per: list[str] = []
    conds, origins, rows, oks = [], [], [], []
    for p, (part, g, t0) in enumerate(zip(parts, grid.parts, firsts)):
        pv = f"{s}p{p}"
        lt = tvar if t0 == 0 else f"({tvar} - {t0})"
        conds.append(f"({tvar} >= {t0})")
        if len(g.tile) == 1:
            per.append(f"{pv}_lt = {lt}")
            origins.append(f"({part.start} + {pv}_lt * {block})" if part.start
                           else f"{pv}_lt * {block}")
            rows.append(f"{s}_slot")
            oks.append(f"({pv}_lt * {block} + {s}_slot < {part.size})")
            if part.grid is not None:
                local = f"{pv}_loc"
                per.append(f"{local} = {pv}_lt * {block} + {s}_slot")
                for a, (stride, size) in enumerate(zip(part.grid.strides, part.grid.shape)):
                    text = local if stride == 1 else f"({local} // {stride})"
                    per.append(f"{c}{a} = {text}" + (f" % {size}" if a > 0 else ""))
            continue
        # Boxes over the grid: per-axis origin (scalar) + slot coordinate (hoisted).
        strides = part.grid.strides
        per.append(f"{pv}_lt = {lt}")
        org_terms, row_terms, ok_terms = [], [], []
        for a, ci, cnt, si, t in _axis_terms(g.counts, g.tile):
            slot = f"{s}s{a}"
            text = f"{s}_slot" if si == 1 else f"({s}_slot // {si})"
            hoist.append(f"{slot} = " + (f"{text} % {t}" if t > 1 else f"{s}_slot * 0")
                         + f"  # grid axis {a}: {t} of {g.shape[a]}")
            if cnt == 1:
                origin = "0"
            else:
                o = f"{pv}_lt" if ci == 1 else f"({pv}_lt // {ci})"
                o = f"({o} % {cnt})" if a > 0 else o
                origin = o if t == 1 else f"{o} * {t}"
            if origin == "0":  # one tile along the axis
                per.append(f"{c}{a} = {slot}")
            else:
                per.append(f"{pv}_o{a} = {origin}")
                per.append(f"{c}{a} = {pv}_o{a} + {slot}")
                org_terms.append(f"{pv}_o{a}" + (f" * {strides[a]}" if strides[a] != 1 else ""))
            row_terms.append(slot + (f" * {strides[a]}" if strides[a] != 1 else ""))
            ok_terms.append(f"({c}{a} < {g.shape[a]})")
        hoist.append(f"{s}_grow = " + " + ".join(row_terms) + "  # in-tile row of each grid slot")
        org_terms = org_terms or [f"{pv}_lt * 0"]
        origins.append(f"({part.start} + " + " + ".join(org_terms) + ")" if part.start
                       else "(" + " + ".join(org_terms) + ")")
        rows.append(f"{s}_grow")
        oks.append("(" + " & ".join(ok_terms) + ")")
    row_is_slot = len(set(rows)) == 1
    per.append(f"{s}_org = " + _select(conds, origins) + "  # first token row of the tile")
    per.append(f"{s}_row = " + _select(conds, rows))
    per.append(f"{s}_idx = {s}_org + {s}_row")
    per.append(f"{s}_ok = " + _select(conds, oks))
    return hoist, per, row_is_slot
