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

`part_tile_lines` selects among all parts (the query tile of a program, and the backward's
tiles); the forward visits key tiles part by part instead (`part_loops`, `part_lines`: one
part's lines alone, no selects).
"""
from __future__ import annotations

import math

from attncc.passes.segment_blocks import side_parts
from attncc.passes.tilegrid import TileGrid
from attncc.passes.tiles import as_box


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


def _parts(side: str, grid, layout):
    """(hoisted lines, [per part: (first tile, per-tile lines, origin, row, ok, padded)])."""
    tvar, block = ("m", "BLOCK_M") if side == "q" else ("n", "BLOCK_N")
    c = "qc" if side == "q" else "kc"
    s = side
    parts = side_parts(layout.side(side))
    hoist = [f"{s}_slot = tl.arange(0, {block})"]
    out = []
    for p, (part, g, t0) in enumerate(zip(parts, grid.parts, grid.tile_offsets)):
        pv = f"{s}p{p}"
        lt = tvar if t0 == 0 else f"({tvar} - {t0})"
        per = [f"{pv}_lt = {lt}"]
        padded = any(n % t for n, t in zip(g.shape, g.tile))
        if len(g.tile) == 1:
            origin = f"({part.start} + {pv}_lt * {block})" if part.start else f"{pv}_lt * {block}"
            ok = f"({pv}_lt * {block} + {s}_slot < {part.size})"
            if part.grid is not None:
                local = f"{pv}_loc"
                per.append(f"{local} = {pv}_lt * {block} + {s}_slot")
                for a, (stride, size) in enumerate(zip(part.grid.strides, part.grid.shape)):
                    text = local if stride == 1 else f"({local} // {stride})"
                    per.append(f"{c}{a} = {text}" + (f" % {size}" if a > 0 else ""))
            out.append((t0, per, origin, f"{s}_slot", ok, padded))
            continue
        # Boxes over the grid: per-axis origin (scalar) + slot coordinate (hoisted).
        strides = part.grid.strides
        org_terms, row_terms, ok_terms = [], [], []
        for a, ci, cnt, si, t in _axis_terms(g.counts, g.tile):
            slot = f"{s}s{a}"
            text = f"{s}_slot" if si == 1 else f"({s}_slot // {si})"
            hoist.append(f"{slot} = " + (f"{text} % {t}" if t > 1 else f"{s}_slot * 0")
                         + f"  # grid axis {a}: {t} of {g.shape[a]}")
            if cnt == 1:  # one tile along the axis
                per.append(f"{c}{a} = {slot}")
            else:
                o = f"{pv}_lt" if ci == 1 else f"({pv}_lt // {ci})"
                o = f"({o} % {cnt})" if a > 0 else o
                per.append(f"{pv}_o{a} = " + (o if t == 1 else f"{o} * {t}"))
                per.append(f"{c}{a} = {pv}_o{a} + {slot}")
                org_terms.append(f"{pv}_o{a}" + (f" * {strides[a]}" if strides[a] != 1 else ""))
            row_terms.append(slot + (f" * {strides[a]}" if strides[a] != 1 else ""))
            ok_terms.append(f"({c}{a} < {g.shape[a]})")
        # Boxes whose tiles are runs of consecutive tokens (e.g. 1×2×32 of a 32-wide grid)
        # have the slot itself as in-tile row.
        contiguous = as_box(TileGrid((g.numel,), (g.tile_size,)), g.shape) == g
        if contiguous:
            row = f"{s}_slot"
        else:
            hoist.append(f"{s}_grow = " + " + ".join(row_terms) + "  # in-tile row of each grid slot")
            row = f"{s}_grow"
        org_terms = org_terms or [f"{pv}_lt * 0"]
        origin = (f"({part.start} + " if part.start else "(") + " + ".join(org_terms) + ")"
        out.append((t0, per, origin, row, "(" + " & ".join(ok_terms) + ")", padded))
    return hoist, out


def part_tile_lines(side: str, grid, layout) -> tuple[list[str], list[str], bool]:
    """(hoisted lines, per-tile lines, row_is_slot) of a `SegmentedGrid` side (module doc):
    the tile's part chosen by scalar selects. `layout` is the pattern's `Segmented` layout;
    row_is_slot: every part's in-tile row is the slot itself."""
    s = side
    tvar = "m" if side == "q" else "n"
    hoist, parts = _parts(side, grid, layout)
    conds = [f"({tvar} >= {t0})" for t0, *_ in parts]
    per = [ln for _, lines, *_ in parts for ln in lines]
    rows = [row for _, _, _, row, _, _ in parts]
    per.append(f"{s}_org = " + _select(conds, [o for _, _, o, *_ in parts])
               + "  # first token row of the tile")
    per.append(f"{s}_row = " + _select(conds, rows))
    per.append(f"{s}_idx = {s}_org + {s}_row")
    per.append(f"{s}_ok = " + _select(conds, [ok for _, _, _, _, ok, _ in parts]))
    return hoist, per, len(set(rows)) == 1


def part_lines(side: str, grid, layout, p: int) -> tuple[list[str], str, bool]:
    """(per-tile lines, in-tile row name, padded) of part `p` alone: for loops that visit
    only that part's tiles (`part_loops`). Its hoisted lines are `part_tile_lines`'."""
    s = side
    _, parts = _parts(side, grid, layout)
    _, lines, origin, row, ok, padded = parts[p]
    grid_part = side_parts(layout.side(side))[p].grid is not None
    if not grid_part:  # tokens outside the grid: coordinates only feed guarded comparisons
        c = "qc" if side == "q" else "kc"
        lines = lines + [f"{c}{a} = {s}_slot * 0" for a in range(len(layout.side(side).axes))]
    return (lines + [f"{s}_org = {origin}  # first token row of the tile",
                     f"{s}_idx = {s}_org + {row}", f"{s}_ok = {ok}"], row, padded)


def part_loops(grid, kind_step, before=None) -> tuple[list[str], dict]:
    """(setup lines, {"FULL": lines, "PARTIAL": []}) of key-tile loops over CSR rows split by
    key part: rows are sorted, so part p's entries of a row are the range between the first
    entries at or past tiles T_p and T_(p+1), found by a binary search of ⌈log2(tiles + 1)⌉
    steps per boundary (scalar loads, once per program). Loops run part by part (FULL, then
    PARTIAL), so values a part's loops need (`before(p)`: lines emitted before them, e.g. the
    grid's in-tile K/V offsets) are live only while that part runs.
    `kind_step(kind, p, header, tile_index)` gives one loop's lines."""
    from .forward import ROW_ID
    firsts = grid.tile_offsets
    steps = max(1, grid.n_tiles.bit_length())
    setup = ["# CSR row of this program: (head class of h [+ batch b], query tile m).",
             f"row = {ROW_ID}"]
    bounds = {}
    for kind in ("FULL", "PARTIAL"):
        k = kind.lower()
        setup += [f"lo_{k} = tl.load({kind}_OFFSETS + row)",
                  f"hi_{k} = tl.load({kind}_OFFSETS + row + 1)",
                  f"# Entries of key part p: [at_{k}p, at_{k}(p+1)) (first entry at or past "
                  "its first tile)."]
        b_list = [f"lo_{k}"]
        for p, t0 in enumerate(firsts[1:-1], start=1):
            a, b = f"at_{k}{p}", f"up_{k}{p}"
            setup += [f"{a} = {b_list[-1]}", f"{b} = hi_{k}",
                      f"for _ in tl.static_range({steps}):",
                      f"    mid = ({a} + {b}) // 2",
                      f"    go = (mid < {b}) & (tl.load({kind}_INDICES + mid, mask=mid < {b}, "
                      f"other={t0}) < {t0})",
                      f"    {a} = tl.where(go, mid + 1, {a})",
                      f"    {b} = tl.where(go, {b}, mid)"]
            b_list.append(a)
        b_list.append(f"hi_{k}")
        bounds[kind] = b_list
    lines = []
    for p in range(len(firsts) - 1):
        lines.append(f"# Key part {p}: tiles {firsts[p]}..{firsts[p + 1] - 1}.")
        lines += list(before(p) if before is not None else [])
        for kind in ("FULL", "PARTIAL"):
            b = bounds[kind]
            lines += kind_step(kind, p, f"for it in range({b[p]}, {b[p + 1]}):",
                               [f"n = tl.load({kind}_INDICES + it)"])
    return setup, {"FULL": lines, "PARTIAL": []}
