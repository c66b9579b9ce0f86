"""Forward-kernel generation: (pattern, schedule, options) → Triton source text.

`generate_forward` fills `templates/forward.tmpl` (the kernel skeleton) and, twice,
`templates/kv_step.tmpl` (one key-tile step of the online softmax): once for the FULL
key tiles (no mask code; only the key tail is masked) and once for the PARTIAL tiles
(the mask predicate rendered from the IR by `codegen.render`). The schedule is used for
structure only: tile shapes, the grid layout of multi-dimensional tiles; sequence lengths,
head counts and the tile lists themselves are runtime arguments, so one source serves every
1-D length.

Kernel contract (what `attncc.runtime.launch.run_forward` passes):
    program grid      (number of query tiles, B * Hq)
    Q, K, V, O, LSE   q [B, Hq, Lq, D], k [B, Hkv, Lkv, D], v [B, Hkv, Lkv, Dv],
                      out [B, Hq, Lq, Dv] (q's dtype), lse float32 [B, Hq, Lq] (natural log)
    strides           four each for Q, K, V, O and three for LSE, in elements
    FULL_/PARTIAL_OFFSETS, _INDICES   int32 CSR over rows `ROW_ID` (see below); row r lists
                      the key tiles of that row in `INDICES[OFFSETS[r]:OFFSETS[r+1]]`
    HEAD_CLASS        int32 [Hq]: head class of each query head; ROWS_PER_BATCH (see below)
    per input j       pointer `in{j}`, strides `in{j}_s{i}`, sizes `in{j}_n{i}` (in the order
                      of `META["inputs"]`)
    ROWS_PER_BATCH, Q_LEN, KV_LEN, HEADS (= Hq), GROUP (= Hq // Hkv), N_Q_TILES, HEAD_DIM,
    HEAD_DIM_V, sm_scale; constexprs BLOCK_M, BLOCK_N (tile slots), BLOCK_D, BLOCK_DV (powers
    of two >= 16 covering the head dims) and DOT_FP32 (matrix products in float32: set for
    bfloat16 under the CPU interpreter, whose tl.dot lacks bfloat16).

Row hook: the CSR row of a program is
`ROW_ID` = (HEAD_CLASS[h] + b·ROWS_PER_BATCH)·N_Q_TILES + m.
Static schedules pass the head-class table and ROWS_PER_BATCH = 0 (rows per head class); a
runtime pre-pass (route / blocks / document ids) can pass lists with one row per (batch,
head, query tile) by giving HEAD_CLASS = arange(Hq) and ROWS_PER_BATCH = Hq, with the same
source (`attncc.runtime.launch.run_forward(lists=...)`).

Closed form (1-D tiles): when every head class has `bounds` (attncc.schedule.closed_form)
with the same range structure, the loops run over the key-tile ranges rendered from the
bound expressions (selected per head class with `tl.where`; lengths are the kernel's
Q_LEN / KV_LEN arguments, so one source serves every length the bounds were validated
at); no index arrays are read. Multi-dimensional tiles read the CSR lists.

Loops: one loop per tile class. FULL tiles run without per-element code (no key-tail
mask, no mask predicate, no empty-row guard; the scale is folded into the exp2 argument);
the tile that reaches past KV_LEN, when FULL, is peeled into the PARTIAL loop (1-D tiles).

Segmented layouts (`SegmentedGrid` tiles: 1-D tiles for runs of plain tokens, boxes for the
grid; `codegen.part_tiles`): the query tile's part is a per-program scalar; the key loops are
split by key part (one FULL and one PARTIAL loop each, row ranges found by binary search in
the sorted CSR row), each with its part's tile arithmetic and the mask folded for keys of
that part, so the grid's loops carry no membership code.

The generated module also defines `META`, a dict of Python literals describing the launch
(kernel name, tile sizes, input order, warps, stages).
"""
from __future__ import annotations

import hashlib
import math
import re
from typing import Optional

from attncc.ir.nodes import FLOAT, TRUE, Const, Coord, free_vars, walk
from attncc.ir.segmented import coord_terms, side_grid
from attncc.passes.segment_blocks import restrict, side_parts, whole_part
from attncc.passes.tilegrid import SegmentedGrid

from .emitter import fill, template
from .part_tiles import part_lines, part_loops, part_tile_lines
from .render import (HELPERS, LOG2E, CodegenError, Renderer, Scope, input_params,
                     safe_identifier, used_inputs)

__all__ = ["generate_forward", "kernel_name", "usable_bounds", "CodegenError", "ROW_ID"]

ROW_ID = "(tl.load(HEAD_CLASS + h) + b * ROWS_PER_BATCH) * N_Q_TILES + m"

# ---- names --------------------------------------------------------------------------------

def _grids(schedule) -> tuple[tuple, tuple, tuple, tuple]:
    qg, kg = schedule.q_grid, schedule.kv_grid
    q_shape = qg.shape if len(qg.tile) > 1 else ()
    kv_shape = kg.shape if len(kg.tile) > 1 else ()
    return tuple(qg.tile), tuple(kg.tile), tuple(q_shape), tuple(kv_shape)


def kernel_name(pattern, schedule, options) -> str:
    """Name of the forward kernel for (pattern IR, options, tile shapes):
    `attncc_fwd_<pattern name>_<12 hex digits>`. Raises CodegenError for a pattern name
    that is not a plain identifier."""
    name = safe_identifier(pattern.name, "pattern name")[:32]
    key = repr((pattern.ir_hash(), options.key(), _grids(schedule)))
    return f"attncc_fwd_{name}_{hashlib.sha256(key.encode()).hexdigest()[:12]}"


# ---- tiles -------------------------------------------------------------------------------

def _pow2_tile(size: int, what: str) -> int:
    if size < 16 or size & (size - 1):
        raise CodegenError(f"{what} tile has {size} token slots; kernels need a power of two "
                           ">= 16 (tl.dot)")
    return size


def _axis_terms(counts, tile):
    """Per axis: (tile-grid inner count, tile extent count, slot inner count, tile extent)."""
    nd = len(tile)
    for a in range(nd):
        yield a, math.prod(counts[a + 1:]), counts[a], math.prod(tile[a + 1:]), tile[a]


def _tile_origin(var: str, a: int, ci: int, c: int, t: int) -> str:
    """Text of `((var // ci) % c) * t` (the first token of the tile along axis a), with
    trivial factors dropped: one tile along the axis gives 0; the outermost axis needs no %."""
    if c == 1:
        return "0"
    text = var if ci == 1 else f"({var} // {ci})"
    if a > 0:
        text = f"({text} % {c})"
    return text if t == 1 else f"{text} * {t}"


def _slot(var: str, si: int, t: int) -> str:
    text = var if si == 1 else f"({var} // {si})"
    # An axis of extent 1 still needs a per-slot vector (0 in every slot), not a scalar.
    return f"{text} % {t}" if t > 1 else f"{var} * 0"


def _tile_lines(side: str, grid, layout) -> tuple[list[str], list[str]]:
    """(hoisted slot lines, per-tile lines) defining `<side>_idx` and `<side>_ok`.

    1-D tiles: consecutive token rows. Multi-D tiles: per-axis coordinates
    origin + (slot // inner) % extent, flat row = Σ coordinate · layout stride."""
    tile_var, block = ("m", "BLOCK_M") if side == "q" else ("n", "BLOCK_N")
    if isinstance(grid, SegmentedGrid):  # tiles of a segmented side (codegen.part_tiles)
        hoist, per_tile, _ = part_tile_lines(side, grid, layout)
        return ([], hoist + per_tile) if side == "q" else (hoist, per_tile)
    if len(grid.tile) == 1:
        if side == "q":
            return [], ["q_idx = m * BLOCK_M + tl.arange(0, BLOCK_M)", "q_ok = q_idx < Q_LEN"]
        return (["offs_n = tl.arange(0, BLOCK_N)"],
                ["k_idx = n * BLOCK_N + offs_n", "k_ok = k_idx < KV_LEN"])
    own = side_grid(layout, side)
    if own is None or tuple(grid.shape) != tuple(own.shape) \
            or (coord_terms(layout, side, 0) or (0,))[0] != 0:
        raise CodegenError(f"multi-dimensional {side} tiles {grid} need the pattern's grid layout")
    strides = own.strides
    hoist = [f"{side}_slot = tl.arange(0, {block})"]
    per_tile, flat, ok = [], [], []
    c = "qc" if side == "q" else "kc"
    for a, ci, cnt, si, t in _axis_terms(grid.counts, grid.tile):
        origin = _tile_origin(tile_var, a, ci, cnt, t)
        slot = f"{side}s{a}"
        hoist.append(f"{slot} = {_slot(side + '_slot', si, t)}  # axis {a}: {t} of {grid.shape[a]}")
        per_tile.append(f"{c}{a} = {slot}" if origin == "0" else f"{c}{a} = {origin} + {slot}")
        flat.append(f"{c}{a}" if strides[a] == 1 else f"{c}{a} * {strides[a]}")
        ok.append(f"({c}{a} < {grid.shape[a]})")
    per_tile.append(f"{side}_idx = " + " + ".join(flat))
    per_tile.append(f"{side}_ok = " + " & ".join(ok))
    if side == "q":  # slots are per program: no hoisting needed
        return [], hoist + per_tile
    return hoist, per_tile


def _coord_lines(side: str, grid, layout, axes: set[int], transposed: bool = False) -> list[str]:
    """Definitions of the 2-D coordinate tensors `<side>_c<axis>` used by the IR: queries
    along rows and keys along columns, or the other way round when `transposed` (the dK/dV
    kernel's [key, query] tiles)."""
    out = []
    rows = "[:, None]"
    cols = "[None, :]"
    if transposed:
        rows, cols = cols, rows
    for a in sorted(axes):
        if len(grid.tile) > 1:
            out.append(f"q_c{a} = qc{a}{rows}" if side == "q" else f"k_c{a} = kc{a}{cols}")
        else:
            # 1-D tiles: from the flat index (`- start` for a grid after token segments;
            # tokens outside the grid get values the mask's guards never use).
            start, stride, size = coord_terms(layout, side, a)
            text = f"({side} - {start})" if start else side
            text = text if stride == 1 else f"({text} // {stride})"
            out.append(f"{side}_c{a} = {text}" + (f" % {size}" if a > 0 or start else ""))
    return out


# ---- closed-form bounds -----------------------------------------------------------------

def usable_bounds(schedule) -> Optional[list]:
    """The per-class `Bounds` when every head class has closed-form bounds of one structure
    (same variables, per-axis range counts and classes, tile counts matching the grids);
    None means the kernel reads CSR lists."""
    bs = [c.bounds for c in schedule.classes]
    if not bs or any(b is None for b in bs):
        return None
    b0 = bs[0]
    nd = len(schedule.q_grid.tile)
    if nd > 1:
        # Multi-dimensional tiles read CSR lists: one pipelined loop per tile class instead
        # of a loop nest per combination of per-axis ranges (docs/BENCHMARKS.md).
        return None
    want = ("qt",)
    if tuple(b0.vars) != want or len(schedule.kv_grid.tile) != nd \
            or tuple(b0.q_counts) != schedule.q_grid.counts \
            or tuple(b0.kv_counts) != schedule.kv_grid.counts:
        return None
    shape = [[r.cls for r in ax] for ax in b0.axes]
    for b in bs[1:]:
        if tuple(b.vars) != want or [[r.cls for r in ax] for ax in b.axes] != shape \
                or tuple(b.kv_counts) != tuple(b0.kv_counts):
            return None
    return bs


def _segment_loop(kind: str, segments: list, kv_step, tail: bool,
                  tag: str) -> tuple[list[str], list[str]]:
    """(setup lines, loop lines) of one loop over the key tiles of several half-open ranges
    `segments` [(lo, hi) texts], visited in order: a plain `range(lo, hi)` for one range,
    else a flat counter `it` mapped to the tile `n` of its range (so a class of tiles is one
    pipelined loop)."""
    if not segments:
        return [], []
    if len(segments) == 1:
        lo, hi = segments[0]
        return [], kv_step(kind, f"for n in range({lo}, {hi}):", [], tail)
    lines, ends = [], []
    for i, (lo, hi) in enumerate(segments):
        size = hi[len(lo) + 3:] if hi.startswith(f"{lo} + ") else f"tl.maximum({hi} - {lo}, 0)"
        ends.append(f"{tag}_end{i}")
        lines.append(f"{ends[i]} = " + (f"{ends[i - 1]} + {size}" if i else size))
    text = f"{segments[-1][0]} + (it - {ends[-2]})"
    for i in range(len(segments) - 2, -1, -1):
        start = f"{segments[i][0]} + (it - {ends[i - 1]})" if i else f"{segments[0][0]} + it"
        text = f"tl.where(it < {ends[i]}, {start}, {text})"
    return lines, kv_step(kind, f"for it in range(0, {ends[-1]}):", [f"n = {text}"], tail)


_TAIL = ["# Key tile n_tail reaches past KV_LEN when KV_LEN is not a multiple of BLOCK_N;",
         "# FULL loops stop before it and, when it is FULL, it runs (masked) with the PARTIAL tiles.",
         "n_tail = KV_LEN // BLOCK_N"]


def _csr_loops(kv_step, peel: bool, full_tail: bool):
    """(setup lines, {"FULL": lines, "PARTIAL": lines}) of the loops over CSR rows. With
    `peel` (1-D tiles) the row's last FULL entry is the tail tile when it is n_tail (rows
    are sorted), and it runs with the PARTIAL tiles."""
    setup = ["# CSR row of this program: (head class of h [+ batch b], query tile m).",
             f"row = {ROW_ID}"]
    for kind in ("full", "partial"):
        setup += [f"lo_{kind} = tl.load({kind.upper()}_OFFSETS + row)",
                  f"hi_{kind} = tl.load({kind.upper()}_OFFSETS + row + 1)"]
    if not peel:
        return setup, {
            "FULL": kv_step("FULL", "for it in range(lo_full, hi_full):",
                            ["n = tl.load(FULL_INDICES + it)"], full_tail),
            "PARTIAL": kv_step("PARTIAL", "for it in range(lo_partial, hi_partial):",
                               ["n = tl.load(PARTIAL_INDICES + it)"], True)}
    setup += _TAIL + [
        "last_full = tl.load(FULL_INDICES + hi_full - 1, mask=hi_full > lo_full, other=-1)",
        "tail_full = ((last_full == n_tail) & (KV_LEN % BLOCK_N != 0)).to(tl.int32)",
        "hi_full = hi_full - tail_full"]
    return setup, {
        "FULL": kv_step("FULL", "for it in range(lo_full, hi_full):",
                        ["n = tl.load(FULL_INDICES + it)"], False),
        "PARTIAL": kv_step("PARTIAL", "for it in range(lo_partial, hi_partial + tail_full):",
                           ["n = tl.load(PARTIAL_INDICES + it, mask=it < hi_partial, "
                            "other=n_tail)"], True)}


def _closed_form(bounds: list, qg, kg, kv_step):
    """(prologue lines, {"FULL": lines, "PARTIAL": lines}, helpers) of the closed-form loops
    of 1-D tiles: one loop per tile class over its ranges (adjacent ranges merged, statically
    empty ones dropped); FULL ranges stop before the tail tile n_tail, which joins the
    PARTIAL loop when a FULL range holds it."""
    from attncc.schedule.schedule import TileClass

    scope = Scope(vars={"qt": "m", "Q_LEN": "Q_LEN", "KV_LEN": "KV_LEN"})
    pro = ["# Closed-form key-tile ranges of query tile m (the schedule checked them against",
           "# the exact tile classes: every nonempty range lies inside the key tiles)."]
    roots = [e for b in bounds for ax in b.axes for r in ax for e in (r.lo, r.hi)]
    rendered = Renderer(scope, "cb").render(roots)
    pro += rendered.hoisted
    if len(bounds) > 1:
        pro.append("hc = tl.load(HEAD_CLASS + h)")
    ranges = []  # [cls, lo text, hi text]
    for i in range(len(bounds[0].axes[0])):
        rs = [b.axes[0][i] for b in bounds]
        if all(isinstance(r.lo, Const) and isinstance(r.hi, Const)
               and int(r.hi.value) <= int(r.lo.value) for r in rs):
            continue  # empty for every query tile
        texts = []
        for attr in ("lo", "hi"):
            alts = [rendered.text(getattr(r, attr)) for r in rs]
            text = alts[-1]
            for c in range(len(bounds) - 2, -1, -1):
                text = f"tl.where(hc == {c}, {alts[c]}, {text})"
            texts.append(text)
        cls = rs[0].cls
        if ranges and ranges[-1][0] == cls and ranges[-1][2] == texts[0]:
            ranges[-1][2] = texts[1]  # adjacent ranges of one class: one range
        else:
            ranges.append([cls, *texts])
    segs = {"FULL": [], "PARTIAL": []}
    for cls, lo, hi in ranges:
        kind = "FULL" if cls == TileClass.FULL else "PARTIAL"
        i = len(segs[kind])
        lo_n, hi_n = f"kt_lo_{kind.lower()}{i}", f"kt_hi_{kind.lower()}{i}"
        pro += [f"{lo_n} = {lo}", f"{hi_n} = {hi}"]
        segs[kind].append((lo_n, hi_n))
    if segs["FULL"]:
        pro += _TAIL
        held = " | ".join(f"(({lo} <= n_tail) & (n_tail < {hi}))" for lo, hi in segs["FULL"])
        pro.append(f"tail_full = ({held}).to(tl.int32)")
        segs["FULL"] = [(lo, f"tl.minimum({hi}, n_tail)") for lo, hi in segs["FULL"]]
        segs["PARTIAL"].append(("n_tail", "n_tail + tail_full"))
    loops = {}
    for kind, tail in (("FULL", False), ("PARTIAL", True)):
        setup, loops[kind] = _segment_loop(kind, segs[kind], kv_step, tail, kind.lower())
        pro += setup
    return pro, loops, rendered.helpers


# ---- the generator ---------------------------------------------------------------------------

def _options_text(options) -> str:
    parts = [f"block_m={int(options.block_m)}", f"block_n={int(options.block_n)}",
             f"num_warps={int(options.num_warps)}", f"num_stages={int(options.num_stages)}"]
    for label in ("q_tile", "kv_tile"):
        v = getattr(options, label)
        if v is not None:
            parts.append(f"{label}=" + "x".join(str(int(t)) for t in v))
    if options.tile_1d:
        parts.append("tile_1d")
    return " ".join(parts)


def generate_forward(pattern, schedule, options, *, block_scores: bool = True) -> str:
    """Triton source of the forward kernel of `pattern` for `schedule`'s tile structure.

    pattern   attncc Pattern (mask, optional score over `s`, optional output scale)
    schedule  attncc Schedule: only its tile grids (shapes of 1-D or multi-D tiles) are
              used; tile lists are passed at launch
    options   CompileOptions (recorded in the header and META; launch parameters)
    block_scores  emit the block-score pass behind the constexpr BLOCK_SCORES (off at a
              default launch, so it compiles away); False leaves it out of the source
              (for checking that the default kernel's machine code is unchanged)

    Returns Python source defining the `@triton.jit` kernel (named `kernel_name(...)`),
    its helpers and `META`. Raises CodegenError for unsupported constructs (runtime
    selectors), unsafe names, or tile shapes the kernel cannot use.
    """
    name = kernel_name(pattern, schedule, options)
    layout = pattern.layout
    qg, kg = schedule.q_grid, schedule.kv_grid
    block_m = _pow2_tile(qg.tile_size, "query")
    block_n = _pow2_tile(kg.tile_size, "key")
    mask = pattern.mask
    score, oscale = pattern.score, pattern.output_scale
    inputs = used_inputs(pattern, (mask, score, oscale))

    refs, params = input_params(inputs)

    coords = {"q": set(), "k": set()}
    for r in (mask, score, oscale):
        for n in walk(r) if r is not None else ():
            if isinstance(n, Coord):
                if layout is None or n.axis >= len(layout.axes):
                    raise CodegenError(f"coordinate {n.side}.{n.name} needs a grid layout axis")
                coords[n.side].add(n.axis)
    base_vars = {v: v for v in ("b", "h", "q", "Q_LEN", "KV_LEN", "HEADS")}
    # `kt` (lowered selections of tile-aligned key regions): the key tile's first token.
    tile_var = {"kt": "(n * BLOCK_N)"} if len(kg.tile) == 1 else {}
    loop_scope = Scope(vars={**base_vars, "k": "k", "s": "s", **tile_var},
                       coords={**{("q", a): f"q_c{a}" for a in coords["q"]},
                               **{("k", a): f"k_c{a}" for a in coords["k"]}},
                       inputs=refs, varying=frozenset({"k", "s", "k.", "kt"}))
    if "s" in free_vars(mask):
        raise CodegenError("the mask cannot depend on the score `s`")
    # Segmented key side: one loop per key part, each with the mask folded for keys of that
    # part (its membership guards are constants there: `passes.segment_blocks.restrict`).
    part_masks = None
    if isinstance(kg, SegmentedGrid):
        whole_q = whole_part(layout.q)
        part_masks = [restrict(mask, whole_q, kp, (), None, None, local=False)
                      for kp in side_parts(layout.k)]
    roots = [mask] + (part_masks or []) + ([score] if score is not None else [])
    rendered = Renderer(loop_scope, "t").render(roots)
    helpers = set(rendered.helpers)

    epilogue: list[str] = []
    if oscale is not None:
        if oscale.dtype != FLOAT or free_vars(oscale) & {"k", "s"}:
            raise CodegenError("output scale must be a float expression of b, q, h")
        out_scope = Scope(vars=base_vars, coords={("q", a): f"q_c{a}" for a in coords["q"]},
                          inputs=refs)
        r_out = Renderer(out_scope, "w").render([oscale])
        helpers |= r_out.helpers
        epilogue = ["# Output modifier: scale each head's output rows."] + r_out.hoisted \
            + [f"out = out * {r_out.text(oscale)}"]

    _, q_tile = _tile_lines("q", qg, layout)
    kv_hoist, kv_tile = _tile_lines("k", kg, layout)
    # K/V addresses: 64-bit token row of the tile origin (scalar, per tile) plus 32-bit
    # in-tile offsets (hoisted). Multi-D tiles: flat row = Σ (origin_a + slot_a) · stride_a.
    # Segmented sides (`codegen.part_tiles`): origin k_org and in-tile rows k_row per tile
    # (rows hoisted when every part's tiles are 1-D).
    part_tiles = None  # segmented key side: per part (tile lines, tail needed in FULL steps)
    if isinstance(kg, SegmentedGrid):
        # One loop per key part (`codegen.part_tiles.part_loops`): the part's own tile
        # lines; the grid part's in-tile offsets are hoisted, other parts' computed per tile.
        k_origin = "tl.cast(k_org, tl.int64)"
        parts = [part_lines("k", kg, layout, p) for p in range(len(kg.parts))]
        gp = next(i for i, pt in enumerate(side_parts(layout.k)) if pt.grid is not None)
        k_slot = parts[gp][1]
        part_tiles = []
        for lines, row, padded in parts:
            offs = ("k_offs", "v_offs")
            if row != k_slot:
                offs = ("kt_offs", "vt_offs")
                lines = lines + [
                    f"kt_offs = {row}[None, :] * stride_kn + offs_d[:, None] * stride_kd",
                    f"vt_offs = {row}[:, None] * stride_vn + offs_dv[None, :] * stride_vd"]
            part_tiles.append((lines, padded, offs))
    elif len(kg.tile) == 1:
        k_slot, k_origin = "offs_n", "tl.cast(n, tl.int64) * BLOCK_N"
    else:
        origins, slots = [], []
        k_strides = side_grid(layout, "k").strides
        for a, ci, cnt, si, t in _axis_terms(kg.counts, kg.tile):
            st = k_strides[a]
            origin = _tile_origin("n", a, ci, cnt, t)
            if origin != "0":
                origins.append(f"tl.cast({origin}, tl.int64)" + (f" * {st}" if st != 1 else ""))
            slots.append(f"ks{a}" + (f" * {st}" if st != 1 else ""))
        kv_hoist = kv_hoist + [f"k_row = {' + '.join(slots)}  # flat in-tile row of each slot"]
        # A single key tile still gets a per-tile origin (n is 0): loop-invariant K/V
        # pointer tensors would be hoisted and held in registers (spills at d128).
        k_slot, k_origin = "k_row", (" + ".join(origins) or "tl.cast(n, tl.int64) * BLOCK_N")
    offs_lines = [f"k_offs = {k_slot}[None, :] * stride_kn + offs_d[:, None] * stride_kd",
                  f"v_offs = {k_slot}[:, None] * stride_vn + offs_dv[None, :] * stride_vd"]
    if part_tiles is None:
        kv_hoist = kv_hoist + offs_lines

    def tile_scores(kind: str, tail: bool, mask=mask):
        """(score lines ending in the base-2 scores `x`, the scale factor text applied to `x`
        at use, keep texts, IR roots needed) of one key tile of class `kind` (`mask`: the
        pattern's, or a key part's folded mask)."""
        masked = kind == "PARTIAL" and mask is not TRUE
        need = ([score] if score is not None else []) + ([mask] if masked else [])
        if score is None:
            # Scores stay unscaled; the scale is folded into the exp2 argument (one FMA).
            scores = ["x = tl.dot(q_blk, k_blk)"] + rendered.loop_lines(need)
            scale = " * qk_scale"
        else:
            scores = ["s = tl.dot(q_blk, k_blk) * sm_scale"] + rendered.loop_lines(need)
            text = rendered.text(score)
            if "s" not in free_vars(score):
                text = f"({text} + tl.zeros([BLOCK_M, BLOCK_N], tl.float32))"
            scores.append(f"x = {text} * {LOG2E}  # score modifier, then base 2")
            scale = ""
        keep = (["k_ok[None, :]"] if tail else []) + ([rendered.text(mask)] if masked else [])
        if keep:
            scores += [f"keep = {' & '.join(keep)}", 'x = tl.where(keep, x, float("-inf"))']
        return scores, scale, keep, need

    def tile_holes(loop_header: str, tile_index: list[str], tail: bool,
                   tiles: Optional[list[str]] = None, offs=("k_offs", "v_offs")) -> dict:
        """Template holes shared by the softmax step and the block-score step (`tiles` and
        `offs`: a key part's own tile lines and in-tile offsets)."""
        org = k_origin if " + " not in k_origin else f"({k_origin})"
        ptrs = [f"k_base + {org} * stride_kn + {offs[0]}",
                f"v_base + {org} * stride_vn + {offs[1]}"]
        lines = tiles or kv_tile
        d_k = "(offs_d[:, None] < HEAD_DIM)"
        return {"k_ptrs": ptrs[0], "loop_header": loop_header, "tile_index": tile_index,
                "kv_tile": lines if tail else [ln for ln in lines if not ln.startswith("k_ok")],
                "k_coords": ["k = k_idx[None, :]"] + _coord_lines("k", kg, layout, coords["k"]),
                "k_mask": f"k_ok[None, :] & {d_k}" if tail else d_k}, ptrs[1]

    def kv_step(kind: str, loop_header: str, tile_index: list[str], tail: bool = True,
                tiles: Optional[list[str]] = None, offs=("k_offs", "v_offs"),
                mask=mask) -> list[str]:
        """One key-tile step of the online softmax.

        kind FULL: no mask code; PARTIAL: the mask predicate per element and the empty-row
        guard. `tail` masks the key slots past the sequence (`k_ok`); a FULL step without
        it has no per-element select at all (every score is finite, so the running maximum
        of every row is finite after the first step and needs no guard)."""
        guarded = kind == "PARTIAL" or score is not None
        scores, scale, keep, need = tile_scores(kind, tail, mask)
        softmax = [f"m_new = tl.maximum(m_i, tl.max(x, 1){scale})"]
        if guarded:
            softmax += ["# A row with no kept key so far has m = -inf: shift by 0, not by -inf.",
                        'm_use = tl.where(m_new == float("-inf"), 0.0, m_new)']
        shift = "m_use" if guarded else "m_new"
        softmax += [f"p = tl.exp2(x{scale} - {shift}[:, None])",
                    f"alpha = tl.exp2(m_i - {shift})"]
        d_v = "(offs_dv[None, :] < HEAD_DIM_V)"
        step = "kv_step.tmpl"
        if pattern.normalize == "none":  # no softmax: the step of codegen/none_step.py
            from .none_step import TEMPLATE, none_step
            scores, softmax = none_step(rendered, score, keep, need)
            step = TEMPLATE
        holes, v_ptrs = tile_holes(loop_header, tile_index, tail, tiles, offs)
        return fill(template(step), {
            **holes, "v_ptrs": v_ptrs,
            "v_mask": f"k_ok[:, None] & {d_v}" if tail else d_v,
            "scores": scores, "softmax": softmax})

    def score_step(kind: str, loop_header: str, tile_index: list[str], tail: bool = True) -> list[str]:
        """One key tile of the block-score pass: QKᵀ, mask and score as in `kv_step`, then the
        final probabilities exp2(x - lse2) pooled over the tile (templates/kv_scores.tmpl)."""
        scores, scale, _, _ = tile_scores(kind, tail)
        # No software pipelining here: it would keep a second K tile and score block live.
        m = re.fullmatch(r"for (\w+) in range\((.*)\):", loop_header)
        if m is None:
            raise CodegenError(f"unexpected key-tile loop header {loop_header!r}")
        loop_header = f"for {m.group(1)} in tl.range({m.group(2)}, 1, num_stages=1):"
        holes, _ = tile_holes(loop_header, tile_index, tail)
        return fill(template("kv_scores.tmpl"), {**holes, "scores": scores,
                                                 "x_scaled": f"x{scale}",
                                                 "row_max": f"tl.max(x, 1){scale}"})

    # FULL tiles need the key-tail mask only where a tile can reach past the keys: the last
    # tile of 1-D tiles (peeled: it runs with the PARTIAL tiles), and on multi-dimensional
    # tiles every tile when an axis is not a multiple of its tile extent.
    peel = len(kg.tile) == 1
    full_tail = not peel and any(s % t for s, t in zip(kg.shape, kg.tile))
    bounds = usable_bounds(schedule)
    if part_tiles is not None:
        def part_step(kind, p, header, index):
            lines, padded, offs = part_tiles[p]
            return kv_step(kind, header, index, kind == "PARTIAL" or padded, lines, offs,
                           part_masks[p])
        # The grid's in-tile offsets are defined right before its loops (the other parts'
        # loops, which compute their own, run first or after without them live).
        first = next(i for i, t in enumerate(part_tiles) if t[2] == ("k_offs", "v_offs"))

        def before(p):
            return offs_lines if p == first else []
        loop_setup, loops = part_loops(kg, part_step, before)
        list_kind = ("key-tile lists: CSR rows per (head class, query tile), FULL and PARTIAL, "
                     "one loop per key part.")
    elif bounds is None:
        loop_setup, loops = _csr_loops(kv_step, peel, full_tail)
        list_kind = "key-tile lists: CSR rows per (head class, query tile), FULL and PARTIAL."
    else:
        loop_setup, loops, helpers_cf = _closed_form(bounds, qg, kg, kv_step)
        helpers |= helpers_cf
        list_kind = "key-tile loops: closed-form bounds (no index arrays)."
    scores_pass = []
    # (The block-score pass needs 1-D key tiles; segmented key sides use the torch pass.)
    if block_scores and pattern.normalize != "none" and part_tiles is None:
        # The same loops again (their bounds and lists are already set up), with the score step.
        if bounds is None:
            _, score_loops = _csr_loops(score_step, peel, full_tail)
        else:
            _, score_loops, _ = _closed_form(bounds, qg, kg, score_step)
        scores_pass = fill(template("block_scores.tmpl"), {
            "full_loop": score_loops["FULL"], "partial_loop": score_loops["PARTIAL"]})

    header = [
        "# attncc forward attention kernel (generated source; edit the pattern, not this file).",
        f"# pattern: {safe_identifier(pattern.name, 'pattern name')}   "
        f"IR hash: {pattern.ir_hash()}",
        f"# options: {_options_text(options)}",
        f"# query tiles: {'x'.join(map(str, qg.tile))}"
        + (f" over grid {'x'.join(map(str, qg.shape))}" if len(qg.tile) > 1 else " tokens"),
        f"# key tiles:   {'x'.join(map(str, kg.tile))}"
        + (f" over grid {'x'.join(map(str, kg.shape))}" if len(kg.tile) > 1 else " tokens"),
        f"# {list_kind}",
    ]
    helper_lines: list[str] = []
    for h in sorted(helpers):  # two blank lines around each top-level function
        helper_lines += [""] + list(HELPERS[h]) + [""]
    meta = {"kernel": name, "block_m": block_m, "block_n": block_n,
            "q_tile": tuple(int(t) for t in qg.tile), "kv_tile": tuple(int(t) for t in kg.tile),
            "q_grid": tuple(int(s) for s in qg.shape) if len(qg.tile) > 1 else None,
            "kv_grid": tuple(int(s) for s in kg.shape) if len(kg.tile) > 1 else None,
            "inputs": tuple(safe_identifier(d.name, "input name") for _, d in inputs),
            "input_dims": tuple(len(d.dims) for _, d in inputs),
            "num_warps": int(options.num_warps), "num_stages": int(options.num_stages),
            "closed_form": bounds is not None}
    hoisted = (["# Loop-invariant parts of the mask and score."] + rendered.hoisted
               if rendered.hoisted else [])
    lines = fill(template("forward.tmpl"), {
        "header": header,
        "helpers": helper_lines,
        "kernel": name,
        "input_params": params,
        "q_tile": q_tile,
        "q_coords": _coord_lines("q", qg, layout, coords["q"]),
        "kv_slots": kv_hoist,
        "hoisted": hoisted,
        "loop_setup": loop_setup,
        "full_loop": loops["FULL"],
        "partial_loop": loops["PARTIAL"],
        "output_scale": epilogue,
        "block_scores": scores_pass,
    })
    lines += ["", "", f"KERNEL = {name}", f"META = {meta!r}"]
    return "\n".join(lines) + "\n"
