"""Autograd for the generated kernels (`triton` on CUDA, `interpret` on CPU).

`GeneratedAttention` runs the forward kernel (saving out and the log-sum-exp) and, in
backward, the generated dQ and dK/dV kernels of `codegen.backward`:

1. Δ = rowsum(dO ⊙ O) in float32 (a torch pre-pass, O(B·Hq·Lq·Dv));
2. the dQ kernel over the forward's key-tile lists (or closed-form loops), which also writes
   the per-pair factors dS·∂score/∂table of float tables read in `score` when those require
   grad (one scratch tile per visited tile, `attncc.runtime.table_grad`);
3. the dK/dV kernel over the transposed lists (`attncc.schedule.transpose`), the GROUP query
   heads of a key head summed in a fixed order inside one program;
4. table gradients reduced deterministically: each pair's table index evaluated by torch,
   contributions sorted stably by index, each index's run summed by `torch.segment_reduce`
   — no atomics, two runs bit-identical.

Patterns whose lists come from the runtime pre-pass (route, blocks, document ids): the tile
classes of the call are kept from the forward (the selection is held fixed; `route` / `blocks`
are piecewise constant, so no gradient flows through the selection — the block-score input
of `blocks` gets none — while the kept scores do), and the dK/dV lists are their transpose.

`output scale w[b, q, h]`: the kernels run the unscaled pattern, the forward returns w·O_u
and the backward runs on dO_u = w·dO. When the weights need a gradient, O_u is computed for
every head (heads with zero weight included: dW = rowsum(O_u ⊙ dO) is not zero there),
differentiated through the scale expression to the float inputs it reads (torch autograd on
B·Hq·Lq values); otherwise (batch, head, query tile) triples with all-zero weights are
skipped in forward and backward, as in the forward-only kernels.

Memory: O(kept tiles) besides q, k, v, out, lse, Δ and the gradients; table gradients add
per-pair scratch (4 bytes per pair and table read, plus the reduction's temporaries), at
most TABLE_SCRATCH_BYTES per dQ launch (the dQ grid is launched in chunks of query tiles when
the scratch of all of them would exceed it).
"""
from __future__ import annotations

import dataclasses
import math
import weakref
from typing import Optional

import torch

from ..ir.nodes import Load, Route, walk
from ..schedule.transpose import (forward_rows, max_visits, transpose_classes, transposed_rows,
                                  transposed_schedule)
from .table_grad import TableScratch, reduce_chunk

__all__ = ["GeneratedAttention", "backward_source", "kernel_backward_source", "run_backward"]

_SOURCES: dict = {}                 # (kind, ir hash, options key, structure key) -> source
_STATIC_SCHEDULES: dict = {}        # (pattern, Lq, Lkv, Hq, options key) -> Schedule
_DEVICE_ROWS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _source(kind: str, pattern, schedule, options, transposed=None) -> str:
    from .compile import structure_key
    key = (kind, pattern.ir_hash(), options.key(), structure_key(schedule),
           None if transposed is None else structure_key(transposed))
    src = _SOURCES.get(key)
    if src is None:
        if kind == "fwd":
            from ..codegen.forward import generate_forward
            src = generate_forward(pattern, schedule, options)
        else:
            from ..codegen.backward import generate_backward
            src = generate_backward(pattern, schedule, options, transposed)
        _SOURCES[key] = src
    return src


def unscaled(pattern):
    """`pattern` without its output scale (the kernels' pattern under autograd)."""
    if pattern.output_scale is None:
        return pattern
    return dataclasses.replace(pattern, output_scale=None)


def backward_source(pattern, schedule, options) -> str:
    """Generated dQ + dK/dV source of `pattern` (its output scale dropped: the runtime
    differentiates it) for `schedule`'s tile structure."""
    return _source("bwd", unscaled(pattern), schedule, options)


def kernel_backward_source(kern, schedule) -> str:
    """The backward source a call of `kern` with `schedule`'s shape runs (`Kernel.backward_source`).
    Patterns with runtime pre-pass lists run it with their selectors lowered to selection
    loads, over per-(batch, head) lists (no closed-form loops) and, with `route` on a grid,
    region-aligned tiles; the source does not depend on the selection itself."""
    from ..ir.nodes import Blocks
    from .prepass_kernel import lower_selectors, needs_prepass, region_aligned_options
    pattern = unscaled(kern.pattern)
    if not needs_prepass(pattern):
        return _source("bwd", pattern, schedule, kern.options,
                       transposed_schedule(schedule, kern.options))
    from .conjuncts import conjuncts, is_static, static_expr
    from ..ir.nodes import TRUE
    from ..schedule.build import build_schedule
    options = region_aligned_options(pattern, kern.options)
    fake = {n: (torch.zeros(1, 1, 1, 1, dtype=torch.bool),) for n in walk(pattern.mask)
            if isinstance(n, (Route, Blocks))}
    terms = [t for t in conjuncts(pattern.mask) if is_static(t)]
    static = dataclasses.replace(pattern, inputs=(), mask=static_expr(terms) or TRUE, score=None,
                                 output_scale=None)
    sched = build_schedule(static, schedule.q_len, schedule.kv_len, schedule.heads,
                           options=options)
    lowered, _ = lower_selectors(pattern, fake, (sched.q_grid, sched.kv_grid))
    sched = dataclasses.replace(sched, pattern=lowered, runtime=("lists",), classes=tuple(
        dataclasses.replace(c, bounds=None) for c in sched.classes))
    return _source("bwd", lowered, sched, options)


def _rows_on(schedule, device) -> tuple[dict, dict]:
    per = _DEVICE_ROWS.setdefault(schedule, {})
    hit = per.get(str(device))
    if hit is None:
        fwd = {k: t.to(device) for k, t in forward_rows(schedule).items()}
        bwd = {k: t.to(device) for k, t in transposed_rows(schedule).items()}
        hit = per[str(device)] = (fwd, bwd)
    return hit


@dataclasses.dataclass
class _Plan:
    """What one differentiable call runs: kernel pattern and schedule, tile lists."""
    pattern: object           # kernel pattern (unscaled; selectors lowered to loads)
    schedule: object          # schedule with the kernel's tile structure
    options: object
    lists: Optional[dict]     # per-(b, h, query tile) CSR (data-dependent) or None (static)
    lists_t: Optional[dict]   # per-(b, h, key tile) CSR or None
    extra: dict               # selection tensors read by the lowered mask
    visits: int               # max key tiles per query-tile row
    stats: Optional[dict] = None  # work counts of pre-pass lists (`Kernel.last_stats`)
    transposed: object = None     # transposed pattern's schedule (closed-form dK/dV loops)

    def source(self) -> str:
        return _source("bwd", self.pattern, self.schedule, self.options, self.transposed)


def _plan(kern, q, k, inputs, skip: bool = False) -> _Plan:
    """What a differentiable call runs. `skip`: (batch, head, query tile) triples whose
    output-scale weights are all zero are left out (their rows get out 0 and lse -inf; only
    valid when the weights need no gradient, since dW needs the unscaled output there)."""
    from ..schedule.build import build_schedule
    from .prepass import _active_tiles, head_weights
    from .prepass_kernel import (lower_selectors, needs_prepass, program_lists,
                                 region_aligned_options, runtime_classes)
    pattern = unscaled(kern.pattern)
    B, Hq, Lq, _ = q.shape
    Lkv = k.shape[2]
    skip = skip and kern.pattern.output_scale is not None
    if not needs_prepass(pattern) and not skip:
        if pattern is kern.pattern:
            sched = kern.schedule(Lq, Lkv, Hq)
        else:
            key = (pattern, Lq, Lkv, Hq, kern.options.key())
            sched = _STATIC_SCHEDULES.get(key)
            if sched is None:
                sched = _STATIC_SCHEDULES[key] = build_schedule(pattern, Lq, Lkv, Hq,
                                                                options=kern.options)
        stats = {"head_tiles": B * Hq * sched.n_q_tiles, "skipped_head_tiles": 0,
                 "full_tiles": B * sum(sched.for_head(h).full.nnz for h in range(Hq)),
                 "partial_tiles": B * sum(sched.for_head(h).partial.nnz for h in range(Hq)),
                 "backward": True}
        return _Plan(pattern, sched, kern.options, None, None, {}, max_visits(sched), stats,
                     transposed_schedule(sched, kern.options))
    options = region_aligned_options(pattern, kern.options)
    sched, cls, selections = runtime_classes(pattern, q, k, inputs, options=options)
    skipped = 0
    if skip:
        weights = head_weights(kern.pattern, inputs, B, Hq, Lq, Lkv, q.device)
        active = _active_tiles(weights, sched.q_grid, (B, Hq), q.device)
        cls = torch.where(active[..., None], cls, torch.zeros_like(cls))
        skipped = int((~active).sum())
    # Listed tiles hold a selected pair, so tile-aligned selectors are dropped (as in the
    # forward): no per-element selection load in dQ or dK/dV.
    lowered, sel_inputs = lower_selectors(pattern, selections, (sched.q_grid, sched.kv_grid))
    kinds = tuple(dict.fromkeys(
        "route" if isinstance(n, Route) else "blocks" for n in selections)) or ("lists",)
    ksched = dataclasses.replace(sched, pattern=lowered, runtime=kinds, classes=tuple(
        dataclasses.replace(c, bounds=None) for c in sched.classes))
    stats = {"head_tiles": B * Hq * sched.n_q_tiles, "skipped_head_tiles": skipped,
             "full_tiles": int((cls == 2).sum()), "partial_tiles": int((cls == 1).sum()),
             "backward": True}
    return _Plan(lowered, ksched, options, program_lists(cls),
                 program_lists(transpose_classes(cls)), sel_inputs, max_visits(classes=cls),
                 stats)


def _forward(kern, backend, plan: _Plan, q, k, v, inputs, scale):
    if plan.lists is None and plan.pattern is kern.pattern:
        return kern._forward(backend, q, k, v, inputs, scale, True)
    from .launch import load_kernel, run_forward
    module = load_kernel(_source("fwd", plan.pattern, plan.schedule, plan.options))
    return run_forward(module, plan.schedule, q, k, v, inputs={**inputs, **plan.extra},
                       scale=scale, options=plan.options, lists=plan.lists)


def _in_args(meta, inputs, device) -> list:
    args = []
    for name, nd in zip(meta["inputs"], meta["input_dims"]):
        t = inputs[name]
        if t.dim() != nd or t.device != device:
            raise ValueError(f"input '{name}' must have {nd} dimensions on {device}")
        args += [t, *t.stride(), *t.shape]
    return args


# Scratch memory of per-pair table-gradient contributions per dQ launch (bytes).
TABLE_SCRATCH_BYTES = 256 << 20


def run_backward(module, plan: _Plan, q, k, v, dout, lse, delta, inputs: dict, scale: float,
                 tables: Optional[dict] = None):
    """Launch the generated dQ and dK/dV kernels of `module`.

    q [B, Hq, Lq, D], k [B, Hkv, Lkv, D], v [B, Hkv, Lkv, Dv], dout [B, Hq, Lq, Dv] (the
    gradient of the unscaled output), lse and delta float32 [B, Hq, Lq] (contiguous);
    `inputs` the tensors the kernels read; `tables` maps the table reads j (indices into
    META["tables"]) whose gradients are wanted to their table's shape.

    Returns (dq float32 [B, Hq, Lq, D], dk, dv float32 [B, Hkv, Lkv, D(v)],
    {j: float32 [numel]} gradient of each requested table read, flat).
    """
    from .launch import _block_d, _interpreted
    meta = module.META
    sched = plan.schedule
    B, Hq, Lq, D = q.shape
    Hkv, Lkv, Dv = k.shape[1], k.shape[2], v.shape[3]
    dev = q.device
    tables = dict(tables or {})
    nqt, nkt = sched.n_q_tiles, sched.n_kv_tiles
    if plan.lists is None:
        rows, rows_t = _rows_on(sched, dev)
        rows_per_batch = 0
    else:
        ar = torch.arange(Hq, dtype=torch.int32, device=dev)
        rows, rows_t = dict(plan.lists, head_class=ar), dict(plan.lists_t, head_class=ar)
        rows_per_batch = Hq
    dq = torch.empty(B, Hq, Lq, D, dtype=torch.float32, device=dev)
    dk = torch.empty(B, Hkv, Lkv, D, dtype=torch.float32, device=dev)
    dv = torch.empty(B, Hkv, Lkv, Dv, dtype=torch.float32, device=dev)
    in_args = _in_args(meta, inputs, dev)
    common = dict(BLOCK_M=meta["block_m"], BLOCK_N=meta["block_n"], BLOCK_D=_block_d(D),
                  BLOCK_DV=_block_d(Dv),
                  DOT_FP32=_interpreted(module) and q.dtype == torch.bfloat16,
                  num_warps=getattr(plan.options, "num_warps", None) or meta["num_warps"],
                  num_stages=getattr(plan.options, "num_stages", None) or meta["num_stages"])
    # Table gradients: per-tile scratch of a chunk of query tiles at a time (at most
    # TABLE_SCRATCH_BYTES), each chunk reduced in order and added: deterministic.
    visits = max(plan.visits, 1)
    slots_per_tile = B * Hq * visits
    per_slot = TableScratch.bytes_per_slot(len(tables), meta["block_m"], meta["block_n"])
    chunk = nqt if not tables else \
        max(1, min(nqt, TABLE_SCRATCH_BYTES // max(1, slots_per_tile * per_slot)))
    grads = {j: torch.zeros(math.prod(shape), dtype=torch.float32, device=dev)
             for j, shape in tables.items()}
    dummy_i = torch.full((1,), -1, dtype=torch.int32, device=dev)
    dummy_v = torch.zeros(1, dtype=torch.float32, device=dev)
    for m0 in range(0, nqt, chunk):
        n_chunk = min(chunk, nqt - m0)
        scratch = TableScratch(tables, slots_per_tile * n_chunk, meta["block_m"],
                               meta["block_n"], dev) if tables else None
        tab_args = [scratch.vals.get(j, dummy_v) if scratch else dummy_v
                    for j in range(len(meta["tables"]))]
        module.KERNEL_DQ[(n_chunk, B * Hq)](
            q, k, v, dout, lse, delta, dq,
            *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *lse.stride(), *dq.stride(),
            rows["full_offsets"], rows["full_indices"], rows["partial_offsets"],
            rows["partial_indices"], rows["head_class"], rows_per_batch,
            *in_args, scratch.tiles if scratch else dummy_i, *tab_args,
            Lq, Lkv, Hq, Hq // Hkv, nqt, visits, m0, n_chunk, D, Dv, float(scale),
            TABLE_GRAD=scratch is not None, SUB_N=_dq_sub_n(meta), **common)
        if scratch is not None:
            part = reduce_chunk(plan.pattern, sched, scratch, m0=m0, n_chunk=n_chunk,
                                max_visits=visits, heads=Hq, q_len=Lq, kv_len=Lkv,
                                inputs=inputs, table_sizes=tables)
            for j, g in part.items():
                grads[j] += g
    head_class_t = rows_t["head_class"]
    if meta.get("closed_form_t"):  # loops over the transposed schedule's bounds, its classes
        head_class_t = _transposed_classes(plan.transposed, dev)
    module.KERNEL_DKV[(nkt, B * Hkv)](
        q, k, v, dout, lse, delta, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *lse.stride(),
        *dk.stride(), *dv.stride(),
        rows_t["full_offsets"], rows_t["full_indices"], rows_t["partial_offsets"],
        rows_t["partial_indices"], head_class_t, rows_per_batch,
        *in_args,
        Lq, Lkv, Hq, Hq // Hkv, nkt, D, Dv, float(scale),
        SUB_M=_sub_m(meta["block_m"], D, Dv),
        **dict(common, num_warps=_dkv_warps(common["num_warps"], D, Dv)))
    return dq, dk, dv, grads


def _transposed_classes(transposed, device) -> torch.Tensor:
    per = _DEVICE_ROWS.setdefault(transposed, {})
    key = "head_class:" + str(device)
    if key not in per:
        per[key] = torch.tensor(transposed.head_class, dtype=torch.int32, device=device)
    return per[key]


def _dq_sub_n(meta) -> int:
    """Key slots per dQ inner step: 32-slot slices of each key tile when the score reads
    float tables (the lookups, their index arithmetic and the table-gradient stores keep
    several more [BLOCK_M, BLOCK_N] temporaries live: whole tiles spill for t5_bias and
    music_transformer, docs/BENCHMARKS.md), whole tiles otherwise."""
    return min(meta["block_n"], 32) if meta["tables"] else meta["block_n"]


def _dkv_warps(warps: int, D: int, Dv: int) -> int:
    """Warps of the dK/dV kernel: at least 8 (it holds K, V and two float32 accumulators
    [BLOCK_N, head dim] across its loops; at 4 warps ptxas spills at d64 and d128 on sm_80
    and sm_90, docs/BENCHMARKS.md)."""
    return max(warps, 8)


def _sub_m(block_m: int, D: int, Dv: int) -> int:
    """Query slots per dK/dV inner step: 32-row slices (the dK/dV program keeps K, V and both
    accumulators live across its loops; whole 64-row tiles spill at head dim 64 on sm_80 and
    sm_90, docs/BENCHMARKS.md)."""
    return min(block_m, 32)


class GeneratedAttention(torch.autograd.Function):
    """Forward and backward by generated Triton kernels (see the module docstring).
    apply(kern, backend, scale, need_lse, names, q, k, v, *input values) → (out, lse)."""

    @staticmethod
    def forward(ctx, kern, backend, scale, need_lse, names, q, k, v, *values):
        from .prepass import head_weights
        inputs = dict(zip(names, values))
        # Heads with all-zero weights are skipped unless the weights need a gradient.
        oscale = kern.pattern.output_scale
        read = set() if oscale is None else {n.input for n in walk(oscale) if isinstance(n, Load)}
        skip = not any(w for n, w in zip(names, ctx.needs_input_grad[8:]) if n in read)
        plan = _plan(kern, q, k, inputs, skip)
        if plan.lists is not None or oscale is not None:  # as the forward-only calls do
            kern.last_stats = plan.stats
        out_u, lse = _forward(kern, backend, plan, q, k, v, inputs, scale)
        out = out_u
        if kern.pattern.output_scale is not None:
            B, Hq, Lq, _ = q.shape
            w = head_weights(kern.pattern, inputs, B, Hq, Lq, k.shape[2], q.device)
            out = (out_u.to(torch.float32) * w[..., None]).to(q.dtype)
        ctx.save_for_backward(q, k, v, out_u, lse, *values)
        ctx.kern, ctx.scale, ctx.names, ctx.plan = kern, scale, names, plan
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        from .launch import load_kernel
        from .prepass import head_weights
        q, k, v, out_u, lse, *values = ctx.saved_tensors
        kern, plan, names = ctx.kern, ctx.plan, ctx.names
        inputs = dict(zip(names, values))
        wanted = dict(zip(names, ctx.needs_input_grad[8:]))
        B, Hq, Lq, _ = q.shape
        Lkv = k.shape[2]
        grads = {}
        dout = dout.to(torch.float32)
        if kern.pattern.output_scale is not None:
            w = head_weights(kern.pattern, inputs, B, Hq, Lq, Lkv, q.device)
            floats = [n for n in names if wanted[n] and inputs[n].is_floating_point()]
            if floats:
                dw = (out_u.to(torch.float32) * dout).sum(-1)              # [B, Hq, Lq]
                with torch.enable_grad():
                    leaves = {n: inputs[n].detach().requires_grad_(True) for n in floats}
                    wg = head_weights(kern.pattern, {**inputs, **leaves}, B, Hq, Lq, Lkv,
                                      q.device)
                    got = torch.autograd.grad(wg, list(leaves.values()), dw, allow_unused=True)
                grads.update({n: g for n, g in zip(floats, got) if g is not None})
            dout = dout * w[..., None]
        delta = (dout * out_u.to(torch.float32)).sum(-1).contiguous()
        module = load_kernel(plan.source())
        tables = {j: tuple(inputs[name].shape)
                  for j, (name, _) in enumerate(module.META["tables"])
                  if wanted.get(name) and inputs[name].is_floating_point()}
        dq, dk, dv, tgrads = run_backward(
            module, plan, q, k, v, dout.to(q.dtype) if q.dtype != torch.float32 else dout,
            lse.contiguous(), delta, {**inputs, **plan.extra}, ctx.scale, tables)
        for j, g in tgrads.items():  # table reads in order: a fixed summation order
            name = module.META["tables"][j][0]
            g = g.view(inputs[name].shape)
            grads[name] = g if name not in grads else grads[name] + g
        result = [dq.to(q.dtype) if ctx.needs_input_grad[5] else None,
                  dk.to(k.dtype) if ctx.needs_input_grad[6] else None,
                  dv.to(v.dtype) if ctx.needs_input_grad[7] else None]
        for n, t in zip(names, values):
            g = grads.get(n) if wanted[n] else None
            result.append(None if g is None else g.to(t.dtype))
        return (None, None, None, None, None, *result)


def backward_case(spec: str, *, params: Optional[dict] = None, head_dim: int = 64,
                  dtype: str = "bfloat16", batch: int = 2, q_len: Optional[int] = None,
                  heads: Optional[int] = None, options: Optional[dict] = None,
                  seed: int = 0) -> None:
    """Launch path of the generated backward on CPU tensors, for ahead-of-time compilation
    (`attncc.runtime.aot.run_jobs` entry "attncc.runtime.autograd:backward_case", which
    captures the launches instead of running them): q/k/v [batch, heads, q_len, head_dim]
    of `dtype`, the pattern's random runtime inputs, lengths and heads by
    `Kernel.default_shape()` unless given; the dQ kernel is launched with TABLE_GRAD on when
    the score reads float tables."""
    import os

    from .. import api
    from .compile import CompileOptions, Kernel
    from .launch import load_kernel
    from .verify import random_inputs
    pattern = api.load(spec, **(params or {})) if os.path.exists(str(spec)) \
        else api.parse(spec, **(params or {}))
    kern = Kernel(pattern, CompileOptions(**(options or {})))
    n, nk, h = kern.default_shape()
    kv_len = nk if q_len is None or pattern.fixed_kv_length is not None else q_len
    q_len, heads = q_len or n, heads or h
    if getattr(pattern, "normalize", "softmax") == "none":
        from .linear import algorithm, aot_backward_case
        if algorithm(pattern, heads, q_len, q_len).linear:
            # Linear attention trains through its own dQ / dK / dV kernels (pattern-
            # independent: the proved decay is a launch argument).
            return aot_backward_case(head_dim=head_dim, dtype=dtype, batch=batch, heads=heads,
                                     q_len=q_len)
    dt = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(seed)
    q, k, v, dout = (torch.randn(batch, heads, n_, head_dim, generator=gen).to(dt)
                     for n_ in (q_len, kv_len, kv_len, q_len))
    inputs = random_inputs(pattern, batch=batch, heads=heads, q_len=q_len, kv_len=kv_len,
                           generator=gen)
    plan = _plan(kern, q, k, inputs)
    module = load_kernel(plan.source())
    lse = torch.zeros(batch, heads, q_len, dtype=torch.float32)
    run_backward(module, plan, q, k, v, dout, lse, torch.zeros_like(lse),
                 {**inputs, **plan.extra}, head_dim ** -0.5,
                 {j: tuple(inputs[name].shape) for j, (name, _) in enumerate(module.META["tables"])})
