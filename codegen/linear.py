"""Triton kernel of the chunked linear-time algorithm (Lightning Attention-2, Qin et al.,
2024, arXiv 2401.04658) for `normalize none` patterns proved separable by
`attncc.passes.linear`.

The kernel is pattern-independent: the proof reduces a separable spec to one number per
head, log r_h (passed as the LOG_R array), and the runtime (`attncc.runtime.linear`) applies
the per-head factor c_h · r_h^(-d) and the query alignment outside. So one source per option
set serves every separable pattern; `generate_linear_forward` fills
`templates/linear_fwd.tmpl`.

Kernel contract (what `attncc.runtime.linear` passes):
    program grid   (B * H, cdiv(Dv, BLOCK_DV))
    Q, K, V, O     q [B, H, L, D], k [B, H, L, D], v [B, H, L, Dv], out [B, H, L, Dv] in one
                   dtype (float16 / bfloat16: products in that dtype with float32 accumulation,
                   as flash attention does, the state kept in float32; float32 or DOT_FP32:
                   float32 products)
    LOG_R          float32 [H]: log r_h <= 0
    strides        four each for Q, K, V, O, in elements
    SEQ_LEN, HEADS, HEAD_DIM, HEAD_DIM_V, sm_scale; constexprs BLOCK (tokens per block),
    BLOCK_D, BLOCK_DV (powers of two >= 16; BLOCK_D covers the head dim), DOT_FP32
    out[p] = sm_scale · Σ_{k <= p} r_h^(p - k) (q_p · k_k) v_k
"""
from __future__ import annotations

import hashlib

from .emitter import fill, template

__all__ = ["generate_linear_forward", "generate_linear_backward", "linear_kernel_name",
           "block_sizes"]



def _pow2_at_least(n: int, lo: int = 16) -> int:
    p = lo
    while p < n:
        p *= 2
    return p


def block_sizes(head_dim: int, head_dim_v: int, block: int, max_dv: int = 64) -> dict:
    """Constexprs of a launch: BLOCK (tokens per block), BLOCK_D (covers the head dim),
    BLOCK_DV (value channels per program, at most `max_dv` so the D x BLOCK_DV state stays in
    registers)."""
    if block < 16 or block & (block - 1):
        raise ValueError(f"linear attention block must be a power of two >= 16, got {block}")
    return {"BLOCK": int(block), "BLOCK_D": _pow2_at_least(head_dim),
            "BLOCK_DV": min(max_dv, _pow2_at_least(head_dim_v))}


def linear_kernel_name(options) -> str:
    """`attncc_linear_fwd_<12 hex digits>` of the template text and the launch options."""
    key = repr((template("linear_fwd.tmpl"), int(options.num_warps), int(options.num_stages)))
    return f"attncc_linear_fwd_{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def generate_linear_forward(options) -> str:
    """Triton source of the linear-attention forward kernel (see the module docstring), with
    `KERNEL` and `META` (kernel name, warps, stages) defined at module level."""
    name = linear_kernel_name(options)
    header = ["# attncc linear attention forward kernel (chunked, Lightning Attention-2;",
              "# generated source). Pattern-independent: per-head decays come in LOG_R.",
              f"# options: num_warps={int(options.num_warps)} num_stages={int(options.num_stages)}"]
    lines = fill(template("linear_fwd.tmpl"), {"header": header, "kernel": name})
    meta = {"kernel": name, "num_warps": int(options.num_warps),
            "num_stages": int(options.num_stages)}
    lines += ["", "", f"KERNEL = {name}", f"META = {meta!r}"]
    return "\n".join(lines) + "\n"


def generate_linear_backward(options) -> str:
    """Triton source of the three backward kernels of the chunked algorithm
    (`templates/linear_bwd.tmpl`), each over its own slice of channels so that no gradient
    is summed across programs (deterministic):

        DQ_KERNEL  grid (B*H, cdiv(D, BLOCK_DS)): forward scan carrying Z[slice]ᵀ
        DK_KERNEL  grid (B*H, cdiv(D, BLOCK_DS)): reverse scan carrying dU[slice]ᵀ
        DV_KERNEL  grid (B*H, cdiv(Dv, BLOCK_DVS)): reverse scan carrying dU[:, slice]

    with dU_t = Σ_{s > t} r^(β(s-t-1)) (Q_s ⊙ r^(r+1))ᵀ dO_s; the intra-block products are
    recomputed per block. Arguments as in the forward contract, plus dO and the gradient
    output; all gradients carry `sm_scale` (the forward's output is linear in it)."""
    key = repr((template("linear_bwd.tmpl"), int(options.num_warps), int(options.num_stages)))
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    names = {f"{g}_kernel": f"attncc_linear_bwd_{g}_{digest}" for g in ("dq", "dk", "dv")}
    header = ["# attncc linear attention backward kernels (chunked, Lightning Attention-2;",
              "# generated source). Pattern-independent: per-head decays come in LOG_R.",
              f"# options: num_warps={int(options.num_warps)} num_stages={int(options.num_stages)}"]
    lines = fill(template("linear_bwd.tmpl"), {"header": header, **names})
    meta = {"kernels": tuple(names.values()), "num_warps": int(options.num_warps),
            "num_stages": int(options.num_stages)}
    lines += ["", "", f"DQ_KERNEL = {names['dq_kernel']}", f"DK_KERNEL = {names['dk_kernel']}",
              f"DV_KERNEL = {names['dv_kernel']}", "KERNEL = DQ_KERNEL  # the loader's entry",
              f"META = {meta!r}"]
    return "\n".join(lines) + "\n"
