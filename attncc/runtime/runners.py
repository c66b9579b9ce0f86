"""Backend runners: how each backend computes one forward call of a `Kernel`.

Each runner is `runner(kern, q, k, v, inputs, scale, need_lse) -> (out, lse or None)` with
q [B, Hq, Lq, D], k [B, Hkv, Lkv, D], v [B, Hkv, Lkv, Dv] already validated, `inputs` the
pattern's runtime tensors by name and `scale` the softmax scale; out is [B, Hq, Lq, Dv], lse
float32 [B, Hq, Lq] (natural log) or None when `need_lse` is false and the backend skips it.
`attncc.runtime.compile.Kernel` dispatches through `RUNNERS`.
"""
from __future__ import annotations

import math

# ---- backends ------------------------------------------------------------------------------

def _run_triton(kern, q, k, v, inputs: dict, scale: float, need_lse: bool):
    if kern.options.autotune and q.device.type == "cuda":
        # Tile sizes, warps and stages tuned per shape class (runtime.autotune).
        from .autotune import tuned_forward
        return tuned_forward(kern, q, k, v, inputs, scale, need_lse)
    from .prepass_kernel import kernel_forward, needs_prepass
    if needs_prepass(kern.pattern):
        # Route / blocks / document ids / output scale: per-(batch, head) lists from the
        # runtime pre-pass, read by the same generated kernel.
        out, lse, stats = kernel_forward(kern.pattern, q, k, v, inputs, scale=scale,
                                         options=kern.options)
        kern.last_stats = stats.as_dict()
        return out, lse
    Hq, Lq = q.shape[1], q.shape[2]
    sched = kern.schedule(Lq, k.shape[2], Hq)
    from .launch import run_forward
    module = kern._module(sched)

    # run_forward takes any strides: non-contiguous q/k/v/inputs are read in place.
    return run_forward(module, sched, q, k, v, inputs=inputs, scale=scale, options=kern.options)


# (num_warps, num_stages) that `CompileOptions(autotune=True)` tries on CUDA (with tile sizes,
# `runtime.autotune.candidate_options`), once per shape class; the fastest is kept
# (`Kernel._tuned`).
AUTOTUNE_CONFIGS = ((4, 2), (4, 3), (8, 2), (8, 3), (4, 4))


def pick_fastest(candidates, run, timer):
    """The candidate `c` with the smallest `timer(lambda: run(c))` (the first on ties).
    Candidates whose launch fails (e.g. too many stages for shared memory) are passed over;
    if every one fails, the last error is raised."""
    best, best_t, error = None, math.inf, None
    for c in candidates:
        try:
            t = timer(lambda: run(c))
        except Exception as e:  # noqa: BLE001 - a failing config is just not a candidate
            error = e
            continue
        if t < best_t:
            best, best_t = c, t
    if best is None:
        raise error
    return best


def _run_flex(kern, q, k, v, inputs: dict, scale: float, need_lse: bool):
    from .backends.flex import flex_forward
    # On CPU, asking FlexAttention for the lse selects its eager path: only when needed.
    if need_lse:
        return flex_forward(kern.pattern, q, k, v, scale=scale, inputs=inputs, return_lse=True)
    return flex_forward(kern.pattern, q, k, v, scale=scale, inputs=inputs), None


def _run_torch(kern, q, k, v, inputs: dict, scale: float, need_lse: bool):
    from .torch_backend import torch_attention
    out, lse, stats = torch_attention(kern.pattern, q, k, v, inputs, scale=scale,
                                      options=kern.options, validate=False)
    kern.last_stats = stats
    return out, lse


def _run_dense(kern, q, k, v, inputs: dict, scale: float, need_lse: bool):
    from .backends.dense import dense_forward
    return dense_forward(kern.pattern, q, k, v, scale=scale, inputs=inputs, need_lse=need_lse)


def _run_reference(kern, q, k, v, inputs: dict, scale: float, need_lse: bool):
    from ..reference import reference
    return reference(kern.pattern, q, k, v, scale=scale, return_lse=True, **inputs)


# backend name -> runner(kernel, q, k, v, inputs, scale, need_lse) -> (out, lse or None when
# not need_lse); "interpret" runs the
# same generated kernels as "triton" (Triton's interpreter is chosen when they are loaded).
RUNNERS = {"triton": _run_triton, "interpret": _run_triton, "flex": _run_flex,
           "torch": _run_torch, "dense": _run_dense, "reference": _run_reference}
# Backends whose runner is differentiable itself (its own torch.autograd.Function): a call
# that needs gradients runs them directly, without an outer autograd wrapper.
SELF_DIFFERENTIABLE = ("torch", "dense")  # dense: plain torch ops, autograd through SDPA
