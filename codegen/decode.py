"""Decode-kernel generation: a split-KV (flash-decoding) Triton kernel for one pattern.

`generate_decode(pattern, options)` fills `templates/decode.tmpl` (the kernel skeleton) and
`templates/decode_step.tmpl` (one key-tile step of the online softmax). `pattern` is the
decode form of the user's pattern (`attncc.schedule.decode.decode_pattern`: KV_LEN is Q_LEN,
`q`-dimension inputs re-indexed to the new rows, `blocks` selectors lowered to loads of the
per-call selection); mask, score and output modifiers are rendered node by node by
`codegen.render`, exactly as in the forward kernel.

Kernel contract (what `attncc.runtime.decode_launch.run_decode` passes):
    program grid      (B · Hkv, N_SPLITS, ⌈GROUP · LQ / BLOCK_M⌉)
    Q                 q [B, Hq, LQ, D] (the new rows)
    K, V              contiguous [B, Hkv, Lmax, D(v)] or paged [pages, Hkv, PAGE_SIZE, D(v)]
    O, LSE            float32 partial results [B, Hq, LQ, N_SPLITS, Dv] and [B, Hq, LQ, N_SPLITS]
                      (each split normalized by itself; merged by log-sum-exp on the host)
    SEQLENS           int32 [B]: L of each sequence (new rows at L − LQ … L − 1)
    TILES             int32 [B, Hkv, T, 2]: the key tiles to visit, in key order, each as
                      the keys [lo, hi) it covers (within one BLOCK_N-aligned tile)
    TILE_COUNT        int32 [B, Hkv]: tiles of each (sequence, key head), shared evenly
                      by the N_SPLITS programs
    BLOCK_TABLE       int32 [B, max_pages] when PAGED (else any int32 tensor)
    strides           4 each for Q, K, V (K/V's first stride is per batch or per page),
                      5 for O, 4 for LSE, 3 for TILES, 2 for TILE_COUNT, 1 for BLOCK_TABLE
    per input j       pointer `in{j}`, strides `in{j}_s{i}`, sizes `in{j}_n{i}`
    HEADS, KV_HEADS, GROUP (= Hq / Hkv), LQ, N_SPLITS, PAGE_SIZE, HEAD_DIM,
    HEAD_DIM_V, sm_scale; constexprs BLOCK_M (rows: GROUP · LQ slots), BLOCK_N, BLOCK_D,
    BLOCK_DV, PAGED, DOT_FP32.
Every visited key is checked against its range, the sequence and the full mask predicate, so
the ranges only decide what is read.
"""
from __future__ import annotations

import hashlib

from attncc.ir.nodes import FLOAT, TRUE, Coord, free_vars, walk

from .emitter import fill, template
from .render import (HELPERS, LOG2E, CodegenError, Renderer, Scope, input_params,
                     safe_identifier, used_inputs)

__all__ = ["generate_decode", "decode_kernel_name"]

def decode_kernel_name(pattern, options) -> str:
    """`attncc_dec_<pattern name>_<12 hex digits of (decode IR, options)>`."""
    name = safe_identifier(pattern.name, "pattern name")[:32]
    key = repr((pattern.ir_hash(), options.key()))
    return f"attncc_dec_{name}_{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def generate_decode(pattern, options) -> str:
    """Triton source of the split-KV decode kernel of `pattern` (a decode-form Pattern, see
    module doc). Returns source defining the kernel, its helpers, `KERNEL` and `META`
    (kernel name, input order). Raises CodegenError for constructs without a lowering
    (grid coordinates, runtime selectors that were not lowered, unsafe names)."""
    name = decode_kernel_name(pattern, options)
    mask, score, oscale = pattern.mask, pattern.score, pattern.output_scale
    for root in (mask, score, oscale):
        if root is not None and any(isinstance(n, Coord) for n in walk(root)):
            raise CodegenError("decode kernels serve 1-D sequences: grid coordinates have no "
                               "decode lowering")
    if "s" in free_vars(mask):
        raise CodegenError("the mask cannot depend on the score `s`")
    inputs = used_inputs(pattern, (mask, score, oscale))
    refs, params = input_params(inputs)
    base_vars = {"b": "b", "h": "h", "q": "q", "Q_LEN": "L", "KV_LEN": "L", "HEADS": "HEADS"}
    loop_scope = Scope(vars={**base_vars, "k": "k", "s": "s"}, inputs=refs,
                       varying=frozenset({"k", "s"}))
    roots = [mask] + ([score] if score is not None else [])
    rendered = Renderer(loop_scope, "t").render(roots)
    helpers = set(rendered.helpers)

    epilogue: list[str] = []
    if oscale is not None:
        if oscale.dtype != FLOAT or free_vars(oscale) & {"k", "s"}:
            raise CodegenError("output scale must be a float expression of b, q, h")
        r_out = Renderer(Scope(vars=base_vars, inputs=refs), "w").render([oscale])
        helpers |= r_out.helpers
        epilogue = ["# Output modifier: scale each head's output rows."] + r_out.hoisted \
            + [f"out = out * {r_out.text(oscale)}"]

    masked = mask is not TRUE
    need = ([score] if score is not None else []) + ([mask] if masked else [])
    if score is None:
        scores = ["x = tl.dot(q_blk, k_blk) * qk_scale"] + rendered.loop_lines(need)
    else:
        scores = ["s = tl.dot(q_blk, k_blk) * sm_scale"] + rendered.loop_lines(need)
        text = rendered.text(score)
        if "s" not in free_vars(score):
            text = f"({text} + tl.zeros([BLOCK_M, BLOCK_N], tl.float32))"
        scores.append(f"x = {text} * {LOG2E}  # score modifier, then base 2")
    keep = "keep = row_ok[:, None] & k_ok[None, :]" + (f" & {rendered.text(mask)}" if masked else "")
    kv_loop = fill(template("decode_step.tmpl"), {"scores": scores, "keep": keep})

    header = [
        "# attncc split-KV decode kernel (generated source; edit the pattern, not this file).",
        f"# pattern: {safe_identifier(pattern.name, 'pattern name')}   "
        f"decode IR hash: {pattern.ir_hash()}",
        "# key tiles of BLOCK_N tokens, read through key ranges per (sequence, key head);",
        "# contiguous or paged cache (PAGED)",
    ]
    helper_lines: list[str] = []
    for hname in sorted(helpers):
        helper_lines += [""] + list(HELPERS[hname]) + [""]
    hoisted = (["# Loop-invariant parts of the mask and score."] + rendered.hoisted
               if rendered.hoisted else [])
    meta = {"kernel": name, "block_n": int(options.block_n),
            "inputs": tuple(safe_identifier(d.name, "input name") for _, d in inputs),
            "input_dims": tuple(len(d.dims) for _, d in inputs),
            "num_warps": int(options.num_warps), "num_stages": int(options.num_stages)}
    lines = fill(template("decode.tmpl"), {
        "header": header, "helpers": helper_lines, "kernel": name, "input_params": params,
        "hoisted": hoisted, "kv_loop": kv_loop, "output_scale": epilogue})
    lines += ["", "", f"KERNEL = {name}", f"META = {meta!r}"]
    return "\n".join(lines) + "\n"
