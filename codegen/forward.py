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
    HEAD_CLASS        int32 [Hq]: head class of each query head
    per input j       pointer `in{j}`, strides `in{j}_s{i}`, sizes `in{j}_n{i}` (in the order
                      of `META["inputs"]`)
    Q_LEN, KV_LEN, HEADS (= Hq), GROUP (= Hq // Hkv), N_Q_TILES, HEAD_DIM, HEAD_DIM_V,
    sm_scale, and constexprs BLOCK_M, BLOCK_N (tile slots), BLOCK_D, BLOCK_DV (powers of two
    >= 16 covering the head dims).

Row hook: static schedules index CSR rows by `head_class[h] * N_Q_TILES + m`. A runtime
selector pre-pass (route / blocks) would supply lists with one row per (batch, head, query
tile), `ROW_ID_PER_PROGRAM` below; only the static form is generated today.

The generated module also defines `META`, a dict of Python literals describing the launch
(kernel name, tile sizes, input order, warps, stages).
"""
from __future__ import annotations

import hashlib
import math
import os
from functools import lru_cache
from typing import Optional

from attncc.ir.nodes import FLOAT, TRUE, Coord, Expr, Load, Var, free_vars, walk

from .emitter import fill
from .render import HELPERS, CodegenError, InputRef, Renderer, Scope, safe_identifier

__all__ = ["generate_forward", "kernel_name", "CodegenError", "ROW_ID_STATIC",
           "ROW_ID_PER_PROGRAM"]

ROW_ID_STATIC = "tl.load(HEAD_CLASS + h) * N_Q_TILES + m"
ROW_ID_PER_PROGRAM = "(b * HEADS + h) * N_Q_TILES + m"

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
    return f"{text} % {t}" if t > 1 else "0"


def _tile_lines(side: str, grid, layout) -> tuple[list[str], list[str]]:
    """(hoisted slot lines, per-tile lines) defining `<side>_idx` and `<side>_ok`.

    1-D tiles: consecutive token rows. Multi-D tiles: per-axis coordinates
    origin + (slot // inner) % extent, flat row = Σ coordinate · layout stride."""
    tile_var, block, length = ("m", "BLOCK_M", "Q_LEN") if side == "q" else ("n", "BLOCK_N", "KV_LEN")
    if len(grid.tile) == 1:
        if side == "q":
            return [], [f"q_idx = m * BLOCK_M + tl.arange(0, BLOCK_M)", "q_ok = q_idx < Q_LEN"]
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
            c = "qc" if side == "q" else "kc"
            out.append(f"{side}_c{a} = {c}{a}[:, None]" if side == "q" else f"k_c{a} = kc{a}[None, :]")
        else:
            stride, size = layout.strides[a], layout.shape[a]
            text = side if stride == 1 else f"({side} // {stride})"
            out.append(f"{side}_c{a} = {text}" + (f" % {size}" if a > 0 else ""))
    return out


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

    q_hoist, q_tile = _tile_lines("q", qg, layout)
    kv_hoist, kv_tile = _tile_lines("k", kg, layout)

    def step(kind: str) -> list[str]:
        offsets, indices = f"{kind}_OFFSETS", f"{kind}_INDICES"
        lines = [f"lo_{kind.lower()} = tl.load({offsets} + row)",
                 f"hi_{kind.lower()} = tl.load({offsets} + row + 1)"]
        scores = []
        need = [score] if score is not None else []
        if kind == "PARTIAL" and mask is not TRUE:
            need.append(mask)
        if score is None:
            scores.append("x = tl.dot(q_blk, k_blk) * qk_scale")
            scores += rendered.loop_lines(need)
        else:
            scores.append("s = tl.dot(q_blk, k_blk) * sm_scale")
            scores += rendered.loop_lines(need)
            text = rendered.text(score)
            if "s" not in free_vars(score):
                text = f"({text} + tl.zeros([BLOCK_M, BLOCK_N], tl.float32))"
            scores.append(f"x = {text} * {LOG2E}  # score modifier, then base 2")
        keep = "keep = k_ok[None, :]"
        if kind == "PARTIAL" and mask is not TRUE:
            keep += f" & {rendered.text(mask)}"
        body = fill(_template("kv_step.tmpl"), {
            "loop_header": f"for it in range(lo_{kind.lower()}, hi_{kind.lower()}):",
            "tile_index": f"n = tl.load({indices} + it)",
            "kv_tile": kv_tile, "k_coords": _coord_lines("k", kg, layout, coords["k"]),
            "scores": scores, "keep": keep})
        return lines + body

    header = [
        "# attncc forward attention kernel (generated source; edit the pattern, not this file).",
        f"# pattern: {safe_identifier(pattern.name, 'pattern name')}   IR hash: {pattern.ir_hash()}",
        f"# options: {_options_text(options)}",
        f"# query tiles: {'x'.join(map(str, qg.tile))}"
        + (f" over grid {'x'.join(map(str, qg.shape))}" if len(qg.tile) > 1 else " tokens"),
        f"# key tiles:   {'x'.join(map(str, kg.tile))}"
        + (f" over grid {'x'.join(map(str, kg.shape))}" if len(kg.tile) > 1 else " tokens"),
        "# key-tile lists: CSR rows per (head class, query tile), FULL and PARTIAL.",
    ]
    helper_lines: list[str] = []
    for h in sorted(helpers):
        helper_lines += list(HELPERS[h]) + ["", ""]
    meta = {"kernel": name, "block_m": block_m, "block_n": block_n,
            "q_tile": tuple(int(t) for t in qg.tile), "kv_tile": tuple(int(t) for t in kg.tile),
            "q_grid": tuple(int(s) for s in qg.shape) if len(qg.tile) > 1 else None,
            "kv_grid": tuple(int(s) for s in kg.shape) if len(kg.tile) > 1 else None,
            "inputs": tuple(safe_identifier(d.name, "input name") for _, d in inputs),
            "input_dims": tuple(len(d.dims) for _, d in inputs),
            "num_warps": int(options.num_warps), "num_stages": int(options.num_stages)}
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
        "row_id": ["# CSR row of this program: (head class of h, query tile m).",
                   f"row = {ROW_ID_STATIC}"],
        "full_loop": step("FULL"),
        "partial_loop": step("PARTIAL"),
        "output_scale": epilogue,
    })
    lines += ["", "", f"KERNEL = {name}", f"META = {meta!r}"]
    return "\n".join(lines) + "\n"
