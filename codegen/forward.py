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

Closed form: when every head class has `bounds` (attncc.schedule.closed_form) with the same
range structure, the loops run over `range(lo, hi)` of key-tile coordinates rendered from
the bound expressions (selected per head class with `tl.where`); no index arrays are read.
On multi-dimensional tiles each combination of per-axis ranges is one loop nest.

The generated module also defines `META`, a dict of Python literals describing the launch
(kernel name, tile sizes, input order, warps, stages).
"""
from __future__ import annotations

import hashlib
import math
import os
from contextlib import ExitStack
from functools import lru_cache
from typing import Optional

from attncc.ir.nodes import FLOAT, TRUE, Const, Coord, Load, free_vars, walk

from .emitter import Emitter, fill
from .render import HELPERS, CodegenError, InputRef, Renderer, Scope, safe_identifier

__all__ = ["generate_forward", "kernel_name", "usable_bounds", "CodegenError", "ROW_ID"]

ROW_ID = "(tl.load(HEAD_CLASS + h) + b * ROWS_PER_BATCH) * N_Q_TILES + m"

_TEMPLATES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates")
LOG2E = "1.4426950408889634"


@lru_cache(maxsize=None)
def _template(name: str) -> str:
    with open(os.path.join(_TEMPLATES, name), encoding="utf-8") as f:
        return f.read()


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
    if len(grid.tile) == 1:
        if side == "q":
            return [], ["q_idx = m * BLOCK_M + tl.arange(0, BLOCK_M)", "q_ok = q_idx < Q_LEN"]
        return (["offs_n = tl.arange(0, BLOCK_N)"],
                ["k_idx = n * BLOCK_N + offs_n", "k_ok = k_idx < KV_LEN"])
    if layout is None or tuple(grid.shape) != tuple(layout.shape):
        raise CodegenError(f"multi-dimensional {side} tiles {grid} need the pattern's grid layout")
    strides = layout.strides
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


def _coord_lines(side: str, grid, layout, axes: set[int]) -> list[str]:
    """Definitions of the 2-D coordinate tensors `<side>_c<axis>` used by the IR."""
    out = []
    for a in sorted(axes):
        if len(grid.tile) > 1:
            out.append(f"q_c{a} = qc{a}[:, None]" if side == "q" else f"k_c{a} = kc{a}[None, :]")
        else:
            stride, size = layout.strides[a], layout.shape[a]
            text = side if stride == 1 else f"({side} // {stride})"
            out.append(f"{side}_c{a} = {text}" + (f" % {size}" if a > 0 else ""))
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
    want = ("qt",) if nd == 1 else tuple(f"qt{a}" for a in range(nd))
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


def _clip(expr, text: str, lo: Optional[int], hi: Optional[int]) -> str:
    if isinstance(expr, Const):
        v = int(expr.value)
        v = v if lo is None else max(v, lo)
        v = v if hi is None else min(v, hi)
        return str(v)
    if lo is not None:
        return f"tl.maximum({text}, {lo})"
    return f"tl.minimum({text}, {hi})"


def _closed_form(bounds: list, qg, kg, kv_step):
    """(prologue lines, {"FULL": lines, "PARTIAL": lines}, helpers) of the closed-form loops."""
    from attncc.schedule.schedule import TileClass

    nd = len(qg.tile)
    if nd == 1:
        scope = Scope(vars={"qt": "m"})
        pro = ["# Closed-form key-tile ranges of query tile m."]
    else:
        scope = Scope(vars={f"qt{a}": f"qt{a}" for a in range(nd)})
        pro = ["# Closed-form key-tile ranges: coordinates of query tile m on the tile grid."]
        for a, ci, cnt, _, _ in _axis_terms(qg.counts, qg.tile):
            text = "m" if ci == 1 else f"(m // {ci})"
            pro.append(f"qt{a} = {text}" + (f" % {cnt}" if a > 0 else ""))
    roots = [e for b in bounds for ax in b.axes for r in ax for e in (r.lo, r.hi)]
    rendered = Renderer(scope, "cb").render(roots)
    pro += rendered.hoisted
    if len(bounds) > 1:
        pro.append("hc = tl.load(HEAD_CLASS + h)")
    counts = kg.counts
    names: list[list[tuple[str, str]]] = []
    for a, ranges in enumerate(bounds[0].axes):
        names.append([])
        for i in range(len(ranges)):
            lo_n, hi_n = f"kt{a}_lo{i}", f"kt{a}_hi{i}"
            for attr, name, clip in (("lo", lo_n, (0, None)), ("hi", hi_n, (None, counts[a]))):
                texts = [_clip(getattr(b.axes[a][i], attr),
                               rendered.text(getattr(b.axes[a][i], attr)), *clip) for b in bounds]
                text = texts[-1]
                for c in range(len(bounds) - 2, -1, -1):
                    text = f"tl.where(hc == {c}, {texts[c]}, {text})"
                pro.append(f"{name} = {text}")
            names[a].append((lo_n, hi_n))
    loops = {"FULL": [], "PARTIAL": []}
    combos = [()]
    for a in range(nd):
        combos = [c + (i,) for c in combos for i in range(len(bounds[0].axes[a]))]
    for combo in combos:
        classes = [bounds[0].axes[a][i].cls for a, i in enumerate(combo)]
        kind = "FULL" if all(c == TileClass.FULL for c in classes) else "PARTIAL"
        if any(c == TileClass.EMPTY for c in classes):
            continue
        if nd == 1:
            lo_n, hi_n = names[0][combo[0]]
            loops[kind] += kv_step(kind, f"for n in range({lo_n}, {hi_n}):", [])
            continue
        em = Emitter()
        with ExitStack() as nest:
            for a, i in enumerate(combo[:-1]):
                lo_n, hi_n = names[a][i]
                nest.enter_context(em.block(f"for kt{a} in range({lo_n}, {hi_n}):"))
            a = nd - 1
            lo_n, hi_n = names[a][combo[-1]]
            flat = " + ".join(f"kt{x} * {math.prod(counts[x + 1:])}" if x < nd - 1 else f"kt{x}"
                              for x in range(nd))
            em.extend(kv_step(kind, f"for kt{a} in range({lo_n}, {hi_n}):", [f"n = {flat}"]))
        loops[kind] += em.lines
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


def _used_inputs(pattern, roots) -> list[tuple[int, object]]:
    used = {n.input for r in roots if r is not None for n in walk(r) if isinstance(n, Load)}
    decls = {d.name: (j, d) for j, d in enumerate(pattern.inputs)}
    for name in sorted(used):
        safe_identifier(name, "input name")
        if name not in decls:
            raise CodegenError(f"input '{name}' is used but not declared")
    return [decls[name] for name in sorted(used, key=lambda nm: decls[nm][0])]


def generate_forward(pattern, schedule, options) -> str:
    """Triton source of the forward kernel of `pattern` for `schedule`'s tile structure.

    pattern   attncc Pattern (mask, optional score over `s`, optional output scale)
    schedule  attncc Schedule: only its tile grids (shapes of 1-D or multi-D tiles) are
              used; tile lists are passed at launch
    options   CompileOptions (recorded in the header and META; launch parameters)

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
    inputs = _used_inputs(pattern, (mask, score, oscale))

    refs, params = {}, []
    for j, decl in inputs:
        nd = len(decl.dims)
        refs[decl.name] = InputRef(f"in{j}", tuple(f"in{j}_s{i}" for i in range(nd)),
                                   tuple(f"in{j}_n{i}" for i in range(nd)))
        params.append(", ".join([f"in{j}"] + list(refs[decl.name].strides)
                                + list(refs[decl.name].sizes)) + f",  # input {decl.name}")

    coords = {"q": set(), "k": set()}
    for r in (mask, score, oscale):
        for n in walk(r) if r is not None else ():
            if isinstance(n, Coord):
                if layout is None or n.axis >= len(layout.axes):
                    raise CodegenError(f"coordinate {n.side}.{n.name} needs a grid layout axis")
                coords[n.side].add(n.axis)
    base_vars = {v: v for v in ("b", "h", "q", "Q_LEN", "KV_LEN", "HEADS")}
    loop_scope = Scope(vars={**base_vars, "k": "k", "s": "s"},
                       coords={**{("q", a): f"q_c{a}" for a in coords["q"]},
                               **{("k", a): f"k_c{a}" for a in coords["k"]}},
                       inputs=refs, varying=frozenset({"k", "s", "k."}))
    if "s" in free_vars(mask):
        raise CodegenError("the mask cannot depend on the score `s`")
    roots = [mask] + ([score] if score is not None else [])
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

    def kv_step(kind: str, loop_header: str, tile_index: list[str]) -> list[str]:
        """One key-tile step of the online softmax; `kind` FULL (no mask code) or PARTIAL."""
        masked = kind == "PARTIAL" and mask is not TRUE
        need = ([score] if score is not None else []) + ([mask] if masked else [])
        if score is None:
            scores = ["x = tl.dot(q_blk, k_blk) * qk_scale"] + rendered.loop_lines(need)
        else:
            scores = ["s = tl.dot(q_blk, k_blk) * sm_scale"] + rendered.loop_lines(need)
            text = rendered.text(score)
            if "s" not in free_vars(score):
                text = f"({text} + tl.zeros([BLOCK_M, BLOCK_N], tl.float32))"
            scores.append(f"x = {text} * {LOG2E}  # score modifier, then base 2")
        keep = "keep = k_ok[None, :]" + (f" & {rendered.text(mask)}" if masked else "")
        return fill(_template("kv_step.tmpl"), {
            "loop_header": loop_header, "tile_index": tile_index,
            "kv_tile": kv_tile, "k_coords": _coord_lines("k", kg, layout, coords["k"]),
            "scores": scores, "keep": keep})

    bounds = usable_bounds(schedule)
    if bounds is None:
        loop_setup = ["# CSR row of this program: (head class of h [+ batch b], query tile m).",
                  f"row = {ROW_ID}"]
        loops = {}
        for kind in ("FULL", "PARTIAL"):
            lo, hi = f"lo_{kind.lower()}", f"hi_{kind.lower()}"
            loops[kind] = [f"{lo} = tl.load({kind}_OFFSETS + row)",
                           f"{hi} = tl.load({kind}_OFFSETS + row + 1)"] + kv_step(
                kind, f"for it in range({lo}, {hi}):", [f"n = tl.load({kind}_INDICES + it)"])
        list_kind = "key-tile lists: CSR rows per (head class, query tile), FULL and PARTIAL."
    else:
        loop_setup, loops, helpers_cf = _closed_form(bounds, qg, kg, kv_step)
        helpers |= helpers_cf
        list_kind = "key-tile loops: closed-form bounds (no index arrays)."

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
    lines = fill(_template("forward.tmpl"), {
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
    })
    lines += ["", "", f"KERNEL = {name}", f"META = {meta!r}"]
    return "\n".join(lines) + "\n"
