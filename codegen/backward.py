"""Backward-kernel generation: (pattern, schedule, options) → Triton source of dQ and dK/dV.

Flash-attention backward over attncc's block-sparse schedules (DESIGN §7). With
P = exp(score(s) - lse) recomputed from the forward's saved log-sum-exp, Δ = rowsum(dO ⊙ O)
(a pre-pass in `attncc.runtime.autograd`), dP = dO·Vᵀ and dS = P ⊙ (dP − Δ):

    dQ kernel    one program per (query tile, batch·head): walks the forward's key tiles
                 (the same CSR rows or closed-form loops as the forward, FULL tiles without
                 mask code), dQ = Σ (dS ⊙ ∂score/∂s)·K · scale
    dK/dV kernel one program per (key tile, batch·key head): walks the TRANSPOSED schedule
                 (per key tile, the query tiles that visit it, FULL and PARTIAL apart) for
                 each of the GROUP query heads of its key head in a fixed order, so GQA sums
                 are deterministic: dV = Σ Pᵀ·dO, dK = Σ (dS ⊙ ∂score/∂s)ᵀ·Q · scale

Tile orientation and slices: the dK/dV step works on transposed [key, query] tiles
(Sᵀ = K·Qᵀ, dPᵀ = V·dOᵀ), so every product has the key tile as its M dimension (wgmma on
sm_90 needs 64 rows per warpgroup), over SUB_M-row slices of each query tile; the dQ step
walks each key tile in SUB_N-slot slices (the runtime picks SUB_N < BLOCK_N for scores that
read tables, whose temporaries would spill). `normalize none` patterns get the same kernels
with P = keep · score (no lse) and dS = keep · dP (no Δ).

Score modifiers: ∂score/∂s and ∂score/∂table[...] come from `attncc.passes.derive` and are
rendered by the forward's per-node renderer. Gradients of float tables read in `score`
(`TABLE_GRAD`): the dQ kernel writes, for each table read j and each visited tile, the
per-pair contributions dS·∂score/∂table_j (0 at pairs that are not kept) as one
[BLOCK_M, BLOCK_N] scratch tile owned by that (program, visit), and the key tile it visited;
the runtime evaluates the table index of every pair and reduces in a fixed order — no
atomics (`attncc.runtime.table_grad`).

Kernel contract (what `attncc.runtime.autograd` passes), beyond the forward's (see
`codegen.forward`): DO like O; LSE and DELTA float32 [B, Hq, Lq] (same strides); DQ
float32 [B, Hq, Lq, D]; DK, DV float32 [B, Hkv, Lkv, D(v)]; the dK/dV kernel's CSR rows are
`(HEAD_CLASS[h] + b·ROWS_PER_BATCH)·N_KV_TILES + n` over the transposed lists; per table
read j of the score, a pointer `tg{j}_val` (float32 [slots·BLOCK_M·BLOCK_N]), and
TG_TILES (int32 [slots], −1 where no tile was visited), slot (bh·N_CHUNK + m − M_OFFSET)·
MAX_VISITS + visit; written only when TABLE_GRAD is set.

The module defines `KERNEL` (= `KERNEL_DQ`), `KERNEL_DKV` and `META` (`meta["tables"]`: per
table read, (input name, number of index dimensions)).
"""
from __future__ import annotations

import hashlib
import re

from attncc.ir.nodes import TRUE, Coord, Var, free_vars, walk
from attncc.passes.derive import derivative, float_loads

from .emitter import fill, template
from .forward import (_closed_form, _csr_loops, _coord_lines, _grids, _options_text, _pow2_tile,
                      _tile_lines, usable_bounds)
from .render import (HELPERS, LOG2E, CodegenError, Renderer, Scope, input_params,
                     safe_identifier, used_inputs)

__all__ = ["generate_backward", "backward_kernel_name", "ROW_ID_T"]

# CSR row of a dK/dV program over the transposed lists (per key tile).
ROW_ID_T = "(tl.load(HEAD_CLASS + h) + b * ROWS_PER_BATCH) * N_KV_TILES + n"


def backward_kernel_name(pattern, schedule, options) -> str:
    """`attncc_bwd_<pattern name>_<12 hex digits>` (the dQ kernel; dK/dV adds `_dkv`)."""
    name = safe_identifier(pattern.name, "pattern name")[:32]
    key = repr(("bwd", pattern.ir_hash(), options.key(), _grids(schedule)))
    return f"attncc_bwd_{name}_{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _coords(pattern, roots):
    layout = pattern.layout
    coords = {"q": set(), "k": set()}
    for r in roots:
        for n in walk(r) if r is not None else ():
            if isinstance(n, Coord):
                if layout is None or n.axis >= len(layout.axes):
                    raise CodegenError(f"coordinate {n.side}.{n.name} needs a grid layout axis")
                coords[n.side].add(n.axis)
    return coords


_SWAP_NAMES = {"m": "n", "n": "m", "Q_LEN": "KV_LEN", "KV_LEN": "Q_LEN", "BLOCK_M": "BLOCK_N",
               "BLOCK_N": "BLOCK_M", "n_tail": "m_tail", "key": "query", "query": "key",
               "Key": "Query", "Query": "Key"}
_SWAP_RE = re.compile(r"\b(" + "|".join(_SWAP_NAMES) + r")\b")


def _transposed_closed_form(bounds, transposed, dkv_step):
    """(setup lines, {"FULL": lines, "PARTIAL": lines}, helpers) of dK/dV loops over the
    closed-form bounds of the transposed pattern: the forward's loop builder run on them,
    with query and key names exchanged (its query tile is our key tile n, its key tiles our
    query tiles m, its Q_LEN our KV_LEN), then each placeholder replaced by the step body."""
    def placeholder(kind, header, tile_index, tail=True):
        return [header] + ["    " + ln for ln in tile_index] + [f"    __STEP_{kind}__"]

    pro, loops, helpers = _closed_form(bounds, transposed.q_grid, transposed.kv_grid,
                                       placeholder)
    swap = lambda ln: _SWAP_RE.sub(lambda mt: _SWAP_NAMES[mt.group(1)], ln)  # noqa: E731
    out = {}
    for kind, lines in loops.items():
        # The step without its loop header (its comments stay: they name the tile class).
        body = [ln for ln in dkv_step(kind, "__HEADER__", []) if ln != "__HEADER__"]
        done = []
        for ln in lines:
            if ln.strip().startswith("__STEP_"):
                pad = ln[:len(ln) - len(ln.lstrip())][4:]
                done += [pad + b if b else "" for b in body]
            else:
                done.append(swap(ln))
        out[kind] = done
    return [swap(ln) for ln in pro], out, helpers


def generate_backward(pattern, schedule, options, transposed=None) -> str:
    """Triton source of the dQ and dK/dV kernels of `pattern` for `schedule`'s tile structure.

    pattern   attncc Pattern without `output scale` (the runtime differentiates the output
              scale itself and runs these kernels on the unscaled pattern) and without
              runtime selectors (lowered to loads by `prepass_kernel.lower_selectors`)
    schedule  attncc Schedule: tile grids and (for the dQ loops) closed-form bounds; the
              tile lists themselves are launch arguments
    options   CompileOptions
    transposed  `attncc.schedule.transpose.transposed_schedule(schedule, options)` or None:
              where it has closed-form bounds, the dK/dV kernel loops over them (its head
              classes then come from `transposed.head_class`, passed as HEAD_CLASS)

    Returns Python source defining `KERNEL_DQ`, `KERNEL_DKV`, `KERNEL` and `META`.
    Raises CodegenError for constructs the kernels cannot express.
    """
    none = getattr(pattern, "normalize", "softmax") == "none"
    if pattern.output_scale is not None:
        raise CodegenError("backward kernels take the pattern without its output scale "
                           "(the runtime applies and differentiates it)")
    name = backward_kernel_name(pattern, schedule, options)
    layout = pattern.layout
    qg, kg = schedule.q_grid, schedule.kv_grid
    block_m = _pow2_tile(qg.tile_size, "query")
    block_n = _pow2_tile(kg.tile_size, "key")
    mask, score = pattern.mask, pattern.score
    if "s" in free_vars(mask):
        raise CodegenError("the mask cannot depend on the score `s`")
    inputs = used_inputs(pattern, (mask, score))
    refs, in_params = input_params(inputs)
    coords = _coords(pattern, (mask, score))

    # Chain rule: ∂score/∂s and ∂score/∂(each float table read).
    d_s = derivative(score, Var("s")) if score is not None else None
    tables = float_loads(score)
    d_tab = [derivative(score, ld) for ld in tables]
    roots = [mask] + ([score, d_s] if score is not None else [])
    roots += d_tab

    base_vars = {v: v for v in ("b", "h", "q", "k", "s", "Q_LEN", "KV_LEN", "HEADS")}
    if len(kg.tile) == 1:  # `kt` (lowered tile-aligned key selections): the key tile's first token
        base_vars["kt"] = "(n * BLOCK_N)"
    all_coords = {**{("q", a): f"q_c{a}" for a in coords["q"]},
                  **{("k", a): f"k_c{a}" for a in coords["k"]}}
    r_dq = Renderer(Scope(vars=base_vars, coords=all_coords, inputs=refs,
                          varying=frozenset({"k", "s", "k.", "kt"})), "t").render(roots)
    r_kv = Renderer(Scope(vars=base_vars, coords=all_coords, inputs=refs,
                          varying=frozenset({"q", "s", "q.", "h"})), "t").render(roots)
    helpers = set(r_dq.helpers) | set(r_kv.helpers)

    def scores(rendered, masked: bool, transposed: bool = False) -> list[str]:
        """Score tile x (base 2): [query, key] = Q·Kᵀ in dQ, [key, query] = K·Qᵀ in dK/dV."""
        need = ([score, d_s] if score is not None else []) + ([mask] if masked else [])
        dot, shape = (("tl.dot(k_blk, tl.trans(q_blk))", "[BLOCK_N, SUB_M]") if transposed
                      else ("tl.dot(q_blk, tl.trans(k_blk))", "[BLOCK_M, SUB_N]"))
        if score is None:  # the weight s (no softmax), or s in base 2
            factor = "sm_scale" if none else "(sm_scale * 1.4426950408889634)"
            return [f"x = {dot} * {factor}"] + rendered.loop_lines(need)
        lines = [f"s = {dot} * sm_scale"] + rendered.loop_lines(need)
        text = rendered.text(score)
        if "s" not in free_vars(score):
            text = f"({text} + tl.zeros({shape}, tl.float32))"
        if none:
            return lines + [f"x = {text}  # score modifier: the weight itself"]
        return lines + [f"x = {text} * {LOG2E}  # score modifier, then base 2"]

    def keeps(rendered, masked: bool, tail: bool, transposed: bool = False) -> list[str]:
        """Texts ANDed into `keep`: the key tail (dQ), the query tail (dK/dV without softmax:
        no lse = +inf makes those weights 0) and the mask on PARTIAL tiles."""
        tails = (["q_ok[None, :]"] if none else []) if transposed else \
            (["k_ok[None, :]"] if tail else [])
        return tails + ([rendered.text(mask)] if masked else [])

    def probs(rendered, masked: bool, tail: bool, transposed: bool = False) -> list[str]:
        """P recomputed from the saved lse; without softmax the weights are the scores."""
        row = "lse2[None, :]" if transposed else "lse2[:, None]"
        keep = keeps(rendered, masked, tail, transposed)
        x = "x" if none else f"tl.exp2(x - {row})"
        if not keep:
            return [f"p = {x}"]
        return [f"keep = {' & '.join(keep)}", f"p = tl.where(keep, {x}, 0.0)"]

    def dscore(rendered, masked: bool, tail: bool, transposed: bool = False) -> list[str]:
        """ds = ∂L/∂(weight before the chain rule): softmax P ⊙ (dP − Δ), or dP itself."""
        if not none:
            return [f"ds = p * (dp - delta{'[None, :]' if transposed else '[:, None]'})"]
        return ["ds = tl.where(keep, dp, 0.0)" if keeps(rendered, masked, tail, transposed)
                else "ds = dp"]

    def chain(rendered, masked: bool = False, tail: bool = False,
              transposed: bool = False) -> list[str]:
        if score is None:
            return ["ds_s = ds"]
        d = rendered.text(d_s)
        if none and keeps(rendered, masked, tail, transposed):
            # ∂score/∂s may be non-finite off the mask: select, do not multiply by 0
            return [f"ds_s = tl.where(keep, ds * {d}, 0.0)  # chain rule: d score / d s"]
        return [f"ds_s = ds * {d}  # chain rule: d score / d s"]

    def table_lines(rendered, masked: bool, tail: bool) -> list[str]:
        if not tables:
            return []
        # Per pair and table read j, dS·∂score/∂table_j goes to this (program, visit)'s own
        # [BLOCK_M, BLOCK_N] scratch tile and the visited key tile n to TG_TILES; the runtime
        # indexes the pairs and reduces them (no atomics).
        out = ["if TABLE_GRAD:",
               "    tg_at = visit + n_visit",
               "    tl.store(TG_TILES + tg_at, n)",
               "    tg_at = tg_at * (BLOCK_M * BLOCK_N) + sub * SUB_N"]
        out += ["    " + ln for ln in rendered.loop_lines(list(d_tab))]
        for j, dt in enumerate(d_tab):
            val = f"ds * {rendered.text(dt)}"
            if masked or tail:
                val = f"tl.where(keep, {val}, 0.0)"
            out += [f"    tl.store(tg{j}_val + tg_at + tg_offs, {val})"]
        return out

    _, q_tile = _tile_lines("q", qg, layout)
    # dK/dV walks each query tile in slices of SUB_M slots (sub = slice index).
    q_tile_sub = [ln.replace("tl.arange(0, BLOCK_M)", "(sub * SUB_M + tl.arange(0, SUB_M))")
                  for ln in q_tile]
    if q_tile_sub == q_tile:
        raise CodegenError("query tile lines have no slot range to slice")
    kv_hoist, kv_tile = _tile_lines("k", kg, layout)
    # dQ walks each key tile in slices of SUB_N slots (sub = slice index): the slot lines
    # move into the slice loop.
    kv_tile_sub = [ln.replace("tl.arange(0, BLOCK_N)", "(sub * SUB_N + tl.arange(0, SUB_N))")
                   for ln in kv_hoist + kv_tile]
    if kv_tile_sub == kv_hoist + kv_tile:
        raise CodegenError("key tile lines have no slot range to slice")
    k_coords = _coord_lines("k", kg, layout, coords["k"])
    q_coords = _coord_lines("q", qg, layout, coords["q"])
    k_coords_t = _coord_lines("k", kg, layout, coords["k"], transposed=True)
    q_coords_t = _coord_lines("q", qg, layout, coords["q"], transposed=True)

    def dq_step(kind: str, loop_header: str, tile_index: list[str],
                tail: bool = True) -> list[str]:
        """One key-tile step of dQ; FULL steps carry no mask code, `tail` masks key slots
        past KV_LEN (the forward's loop builders decide which steps need it)."""
        masked = kind == "PARTIAL" and mask is not TRUE
        score_lines = scores(r_dq, masked)
        tab = [ln for ln in table_lines(r_dq, masked, tail) if ln[4:] not in score_lines]
        d_k, d_v = "(offs_d[None, :] < HEAD_DIM)", "(offs_dv[None, :] < HEAD_DIM_V)"
        return fill(template("bwd_dq_step.tmpl"), {
            "loop_header": loop_header, "tile_index": tile_index, "kind": kind,
            "kv_tile": kv_tile_sub if tail else [ln for ln in kv_tile_sub
                                                 if not ln.startswith("k_ok")],
            "visit_count": ["n_visit += 1"] if tables else [],
            "k_mask": f"k_ok[:, None] & {d_k}" if tail else d_k,
            "v_mask": f"k_ok[:, None] & {d_v}" if tail else d_v,
            "k_coords": k_coords, "scores": score_lines, "probs": probs(r_dq, masked, tail),
            "dscore": dscore(r_dq, masked, tail), "chain": chain(r_dq, masked, tail),
            "table_grads": tab})

    def dkv_step(kind: str, loop_header: str, tile_index: list[str]) -> list[str]:
        """One query-tile step of dK/dV. Query slots past Q_LEN have lse = +inf (P = 0) and
        key slots past KV_LEN are never stored, so FULL steps need no select at all."""
        masked = kind == "PARTIAL" and mask is not TRUE
        return fill(template("bwd_dkv_step.tmpl"), {
            "loop_header": loop_header, "tile_index": tile_index, "kind": kind,
            "q_tile": q_tile_sub, "q_coords": q_coords_t,
            "scores": scores(r_kv, masked, transposed=True),
            "probs": probs(r_kv, masked, False, transposed=True),
            "dscore": dscore(r_kv, masked, False, transposed=True),
            "chain": chain(r_kv, masked, False, transposed=True)})

    # dQ loops: the forward's key-tile loops (closed form or CSR rows).
    bounds = usable_bounds(schedule)
    if bounds is None:
        peel = len(kg.tile) == 1
        full_tail = not peel and any(sz % t for sz, t in zip(kg.shape, kg.tile))
        loop_setup, dq_loops = _csr_loops(dq_step, peel, full_tail)
        list_kind = "dQ key-tile lists: CSR rows per (head class, query tile)"
    else:
        loop_setup, dq_loops, helpers_cf = _closed_form(bounds, qg, kg, dq_step)
        helpers |= helpers_cf
        list_kind = "dQ key-tile loops: closed-form bounds (no index arrays)"
    if tables:
        loop_setup = ["n_visit = 0",
                      "tg_offs = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + "
                      "tl.arange(0, SUB_N)[None, :]"] + loop_setup
    # dK/dV loops: closed-form query-tile ranges from the transposed pattern's schedule, else
    # transposed CSR rows per (head class, key tile).
    t_bounds = usable_bounds(transposed) if transposed is not None else None
    if t_bounds is not None:
        dkv_setup, dkv_loops, helpers_t = _transposed_closed_form(
            t_bounds, transposed, dkv_step)
        helpers |= helpers_t
        list_kind_t = "closed-form query-tile ranges (transposed pattern; no index arrays)"
    else:
        dkv_setup = ["# Transposed CSR row: (head class of h [+ batch b], key tile n).",
                     f"row = {ROW_ID_T}"]
        dkv_loops = {}
        for kind in ("FULL", "PARTIAL"):
            lo, hi = f"lo_{kind.lower()}", f"hi_{kind.lower()}"
            dkv_loops[kind] = [f"{lo} = tl.load({kind}_OFFSETS + row)",
                               f"{hi} = tl.load({kind}_OFFSETS + row + 1)"] + dkv_step(
                kind, f"for it in range({lo}, {hi}):", [f"m = tl.load({kind}_INDICES + it)"])
        list_kind_t = "transposed CSR rows per (head class, key tile)"

    header = [
        "# attncc backward attention kernels (generated source; edit the pattern, not this file).",
        f"# pattern: {safe_identifier(pattern.name, 'pattern name')}   "
        f"IR hash: {pattern.ir_hash()}",
        f"# options: {_options_text(options)}",
        f"# query tiles: {'x'.join(map(str, qg.tile))}"
        + (f" over grid {'x'.join(map(str, qg.shape))}" if len(qg.tile) > 1 else " tokens"),
        f"# key tiles:   {'x'.join(map(str, kg.tile))}"
        + (f" over grid {'x'.join(map(str, kg.shape))}" if len(kg.tile) > 1 else " tokens"),
        f"# {list_kind}; dK/dV query-tile loops: {list_kind_t}.",
        f"# score tables with gradients: {len(tables)}",
    ] + (["# normalize none: the weights are the scores (no softmax: P = keep · score, "
          "dS = keep · dP)."] if none else [])
    helper_lines: list[str] = []
    for hname in sorted(helpers):
        helper_lines += [""] + list(HELPERS[hname]) + [""]
    table_params = [f"tg{j}_val,  # table read {j}: input {ld.input}"
                    for j, ld in enumerate(tables)]
    dq_hoisted = (["# Loop-invariant parts of the mask and score."] + r_dq.hoisted
                  if r_dq.hoisted else [])
    kv_hoisted = (["# Loop-invariant parts of the mask and score."] + r_kv.hoisted
                  if r_kv.hoisted else [])
    lines = header + ["import triton", "import triton.language as tl", ""] + helper_lines
    lines += [""] + fill(template("bwd_dq.tmpl"), {
        "kernel": name, "input_params": in_params, "table_params": table_params,
        "q_tile": q_tile, "q_coords": q_coords, "hoisted": dq_hoisted,
        "loop_setup": loop_setup, "full_loop": dq_loops["FULL"],
        "partial_loop": dq_loops["PARTIAL"]})
    lines += ["", ""] + fill(template("bwd_dkv.tmpl"), {
        "kernel": name + "_dkv", "input_params": in_params, "kv_slots": kv_hoist,
        "kv_tile": kv_tile, "k_coords": k_coords_t, "hoisted": kv_hoisted,
        "loop_setup": dkv_setup, "full_loop": dkv_loops["FULL"],
        "partial_loop": dkv_loops["PARTIAL"]})
    meta = {"kernel": name, "kernel_dkv": name + "_dkv", "block_m": block_m, "block_n": block_n,
            "q_tile": tuple(int(t) for t in qg.tile), "kv_tile": tuple(int(t) for t in kg.tile),
            "inputs": tuple(safe_identifier(d.name, "input name") for _, d in inputs),
            "input_dims": tuple(len(d.dims) for _, d in inputs),
            "tables": tuple((ld.input, len(ld.index)) for ld in tables),
            "num_warps": int(options.num_warps), "num_stages": int(options.num_stages),
            "closed_form": bounds is not None, "closed_form_t": t_bounds is not None}
    lines += ["", "", f"KERNEL_DQ = {name}", f"KERNEL_DKV = {name}_dkv", "KERNEL = KERNEL_DQ",
              f"META = {meta!r}"]
    return "\n".join(lines) + "\n"
