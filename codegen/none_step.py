"""The key-tile step of `normalize none` patterns (no softmax) for the quadratic forward kernel.

`codegen.forward` renders a pattern's key-tile step from `templates/kv_step.tmpl` (online
softmax). A `normalize none` pattern that `attncc.passes.linear` does not prove separable runs
on the same block-sparse kernel with `templates/kv_step_none.tmpl` instead (same holes), whose
`scores` / `softmax` lines come from `none_step` here:

    p = keep ? score : 0          (score in natural units: no base-2 scaling, no max shift)
    acc += p · V
    l_i = max(l_i, any kept key in the row), m_i = 0 once a key was kept

so the unchanged epilogue (`out = acc / l`, `lse = m·ln2 + log l`, with l = 1) stores
out = Σ_k keep · score · v and lse = 0 for rows with a kept key, -inf (and out 0) otherwise,
as `attncc.reference` defines for `normalize none`.
"""
from __future__ import annotations

from attncc.ir.nodes import free_vars

__all__ = ["none_step", "TEMPLATE"]

TEMPLATE = "kv_step_none.tmpl"


def none_step(rendered, score, keep: list, need: list) -> tuple[list, list]:
    """(scores lines, softmax-hole lines) of one no-softmax key-tile step.

    rendered  the forward generator's `Renderer` result (mask and score rendered)
    score     the pattern's score IR or None (then the weight is s, the scaled product)
    keep      texts ANDed into the keep predicate (`k_ok[None, :]`, the rendered mask), may
              be empty (a FULL tile without a sequence tail)
    need      IR roots whose per-tile lines the step needs (score, mask)"""
    scores = ["s = tl.dot(q_blk, k_blk) * sm_scale"] + rendered.loop_lines(need)
    if score is None:
        x = "s"
    else:
        x = rendered.text(score)
        if "s" not in free_vars(score):
            x = f"({x} + tl.zeros([BLOCK_M, BLOCK_N], tl.float32))"
    lines = ["# No softmax (normalize none): the weights are the scores themselves."]
    if keep:
        lines += [f"keep = {' & '.join(keep)}", f"p = tl.where(keep, {x}, 0.0)",
                  "l_i = tl.maximum(l_i, tl.max(keep.to(tl.float32), 1))"]
    else:
        lines += [f"p = {x}", "l_i = tl.maximum(l_i, 1.0)"]
    lines += ["# l = 1 and m = 0 once a row kept a key: the epilogue stores acc and lse 0.",
              "m_i = tl.where(l_i > 0.0, 0.0, m_i)"]
    return scores, lines
