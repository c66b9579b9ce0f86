"""Generated kernels with runtime pre-pass lists (route / blocks / documents / output scale).

The Triton forward kernel (`codegen.forward`) reads one CSR row of key tiles per program;
`kernel_forward` gives it one row per (batch, head, query tile) from the pre-pass
(`attncc.runtime.prepass`) instead of the static per-head-class rows, through
`attncc.runtime.launch.run_forward(lists=...)`. Inside PARTIAL tiles the kernel evaluates the
mask per element, so `lower_selectors` rewrites each `route` / `blocks` node into a load of
its selection tensor indexed by the token's group (region or block) — plain IR the kernel
renderer already handles. (batch, head, query tile) triples whose output-scale weights are
all zero get empty rows: the program visits no key tile and writes 0.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import torch

from ..ir.nodes import (BOOL, TRUE, Binary, Blocks, Const, Expr, Load, Route, Var,
                        transform, walk)
from ..ir.pattern import InputDecl
from ..ir.segmented import route_groups_expr
from ..passes.simplify import simplify
from .conjuncts import conjuncts, document_input, is_static, pattern_classes, static_expr
from .prepass import FULL, PARTIAL, PrepassStats, _active_tiles, _region_tuple, head_weights

__all__ = ["needs_prepass", "lower_selectors", "program_lists", "kernel_forward",
           "region_aligned_options"]

_SOURCES: dict = {}


def needs_prepass(pattern) -> bool:
    """True when a call of `pattern` needs per-(batch, head, query tile) lists: the mask uses
    `route` / `blocks` or a document equality, or there is an `output scale` (skipping)."""
    return pattern.output_scale is not None \
        or any(isinstance(n, (Route, Blocks)) for n in walk(pattern.mask)) \
        or any(document_input(t) is not None for t in conjuncts(pattern.mask))


def _group_expr(side: str, node, layout, per_tile: bool = False) -> Expr:
    """IR of the group (region / block) index of token `side`, matching `route_select` /
    `_block_gids`: regions row-major over the region grid of the layout. `per_tile` (key
    side, 1-D key tiles inside one group each): the group of the key tile's first token
    `kt`, one value per tile (so the kernel loads one selection per query row)."""
    token = Var("kt") if per_tile else Var(side)
    if isinstance(node, Blocks):
        return Binary("floordiv", token, Const(node.block))
    size = node.query_region if side == "q" else node.region
    if layout is None:
        return token if size[0] == 1 else Binary("floordiv", token, Const(size[0]))
    axes = layout.k.axes if hasattr(layout, "k") else layout.axes
    return route_groups_expr(layout, side, _region_tuple(size, len(axes)))[0]


def tile_aligned(node, pattern, grids) -> bool:
    """Whether every (query tile, key tile) of `grids` = (q_grid, kv_grid) lies inside one
    (query group, key group) of selector `node`, so the selection is one value per tile."""
    q_grid, kv_grid = grids
    if hasattr(pattern.layout, "q"):  # separate query and key grids: not assumed aligned
        return False
    if isinstance(node, Blocks):
        sizes = ((node.block,), (node.block,))
    else:
        nd = 1 if pattern.layout is None else len(pattern.layout.axes)
        sizes = (_region_tuple(node.query_region, nd), _region_tuple(node.region, nd))
    if isinstance(node, Blocks) or pattern.layout is None:
        return len(q_grid.tile) == 1 and len(kv_grid.tile) == 1 \
            and sizes[0][0] % q_grid.tile[0] == 0 and sizes[1][0] % kv_grid.tile[0] == 0
    return all(len(g.tile) == len(r) and all(a % t == 0 for a, t in zip(r, g.tile))
               for g, r in zip((q_grid, kv_grid), sizes))


def lower_selectors(pattern, selections: Mapping, grids=None):
    """`pattern` with every route / blocks node replaced by a load of its selection,
    `attncc_selN[b, h, group(q), group(k)]`, for kernels that evaluate the mask per element.

    grids  (q_grid, kv_grid) of a kernel that reads pre-pass lists (which hold only tiles
           with a selected pair): a selector that is a conjunct of the mask and whose groups
           contain whole tiles (`tile_aligned`) is constant true on every listed tile, so it
           is dropped (no per-element selection load); one whose key groups contain whole
           1-D key tiles reads its selection per (query row, key tile) through `kt`, the
           kernel's key-tile start (the forward generator's loop variable).

    Returns (lowered Pattern, {input name: int8 selection tensor [B, H, nGq, nGk]}); the
    lowered pattern declares the selections (as bool inputs) and drops inputs that only the
    selectors read.
    """
    names, tensors = {}, {}
    taken = {d.name for d in pattern.inputs}
    top = {id(t) for t in conjuncts(pattern.mask)}
    dropped = {n for n in walk(pattern.mask) if isinstance(n, (Route, Blocks))
               and grids is not None and id(n) in top and tile_aligned(n, pattern, grids)}
    for node in walk(pattern.mask):
        if isinstance(node, (Route, Blocks)) and node not in names and node not in dropped:
            i = len(names)
            while f"attncc_sel{i}" in taken:
                i += 1
            names[node] = f"attncc_sel{i}"
            taken.add(names[node])
            tensors[names[node]] = selections[node][0].to(torch.int8).contiguous()

    def key_aligned(n):
        if grids is None or pattern.layout is not None or len(grids[1].tile) != 1:
            return False
        size = n.block if isinstance(n, Blocks) else n.region[0]
        return size % grids[1].tile[0] == 0

    def rewrite(n):
        if n in dropped:
            return TRUE
        if n in names:
            return Load(names[n], (Var("b"), Var("h"), _group_expr("q", n, pattern.layout),
                                   _group_expr("k", n, pattern.layout, key_aligned(n))), BOOL)
        return None

    mask = transform(pattern.mask, rewrite)
    if dropped:
        mask = simplify(mask)
    # Inputs read only by the replaced selectors (block scores) are no longer inputs.
    used = {n.input for r in (mask, pattern.score, pattern.output_scale) if r is not None
            for n in walk(r) if isinstance(n, Load)}
    decls = tuple(d for d in pattern.inputs if d.name in used) + tuple(
        InputDecl(nm, "bool", ("b", "h", int(t.shape[2]), int(t.shape[3])))
        for nm, t in tensors.items())
    return dataclasses.replace(pattern, inputs=decls, mask=mask), tensors


def program_lists(classes: torch.Tensor) -> dict:
    """int32 CSR launch tensors with one row per (b, h, query tile), row (b·H + h)·nQT + m,
    from classes int8 [B, H, nQT, nKT] (`attncc.runtime.launch.run_forward(lists=...)`)."""
    out = {}
    for kind, val in (("full", FULL), ("partial", PARTIAL)):
        m = (classes == val).flatten(0, 2)
        offsets = torch.zeros(m.shape[0] + 1, dtype=torch.int64, device=classes.device)
        offsets[1:] = torch.cumsum(m.sum(-1), 0)
        idx = m.nonzero()[:, 1]
        if idx.numel() == 0:
            idx = torch.zeros(1, dtype=torch.int64, device=classes.device)
        out[f"{kind}_offsets"] = offsets.to(torch.int32)
        out[f"{kind}_indices"] = idx.to(torch.int32)
    return out


def runtime_classes(pattern, q: torch.Tensor, k: torch.Tensor, inputs: Mapping[str, torch.Tensor],
                    *, options):
    """Per-call tile classes of a data-dependent pattern.

    The static conjuncts of the mask are scheduled by `build_schedule` with `options` (which
    fix the tile shapes); the pre-pass intersects them with the selectors' and documents'
    classes. Returns (static Schedule, classes int8 [B, Hq, nQT, nKT], selections).
    """
    from ..schedule.build import build_schedule
    Hq, Lq, Lkv = q.shape[1], q.shape[2], k.shape[2]
    static_terms = [t for t in conjuncts(pattern.mask) if is_static(t)]
    static_pattern = dataclasses.replace(pattern, inputs=(), mask=static_expr(static_terms) or TRUE,
                                         score=None, output_scale=None)
    sched = build_schedule(static_pattern, Lq, Lkv, Hq, options=options)
    cls, selections = pattern_classes(pattern, q, k, inputs, sched.q_grid, sched.kv_grid,
                                      static=sched)
    return sched, cls, selections


def kernel_forward(pattern, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   inputs: Mapping[str, torch.Tensor], *, scale: float, options,
                   block_scores=None):
    """Data-dependent forward through the generated Triton kernel (CUDA, or the interpreter).

    q [B, Hq, Lq, D], k / v [B, Hkv, Lkv, D(v)], validated `inputs`. The static conjuncts of
    the mask are scheduled by `build_schedule` (tile shapes and their classes); the pre-pass
    intersects them with the selectors' and documents' classes per (b, h), drops
    (b, h, query tile) triples whose output-scale weights are all zero, and launches one
    program per (query tile, b·h) reading its own CSR row. Returns (out, lse, PrepassStats).
    """
    from ..codegen.forward import generate_forward
    from .compile import interpreter_enabled, structure_key
    from .launch import load_kernel, run_forward
    B, Hq, Lq, _ = q.shape
    Lkv = k.shape[2]
    options = region_aligned_options(pattern, options)
    sched, cls, selections = runtime_classes(pattern, q, k, inputs, options=options)
    weights = head_weights(pattern, inputs, B, Hq, Lq, Lkv, q.device)
    active = _active_tiles(weights, sched.q_grid, (B, Hq), q.device)
    cls = torch.where(active[..., None], cls, torch.zeros_like(cls))
    lowered, sel_inputs = lower_selectors(pattern, selections, (sched.q_grid, sched.kv_grid))
    kinds = tuple(dict.fromkeys(
        "route" if isinstance(n, Route) else "blocks" for n in selections)) or ("lists",)
    # Per-program lists replace the static ones, so the kernel must loop over lists, not over
    # closed-form bounds of the static part.
    ksched = dataclasses.replace(sched, pattern=lowered, runtime=kinds, classes=tuple(
        dataclasses.replace(c, bounds=None) for c in sched.classes))
    key = (lowered.ir_hash(), options.key(), structure_key(ksched))
    if key not in _SOURCES:
        _SOURCES[key] = generate_forward(lowered, ksched, options)
    module = load_kernel(_SOURCES[key])
    lists = program_lists(cls)
    full = int(lists["full_offsets"][-1])
    partial = int(lists["partial_offsets"][-1])
    stats = PrepassStats(head_tiles=int(active.numel()), skipped_head_tiles=int((~active).sum()),
                         full_tiles=full, partial_tiles=partial,
                         extra={"interpreted": interpreter_enabled()})
    out, lse = run_forward(module, ksched, q, k, v, inputs={**inputs, **sel_inputs}, scale=scale,
                           options=options, lists=lists, block_scores=block_scores)
    return out, lse, stats


def region_aligned_options(pattern, options):
    """`options` with query and key tiles equal to the region of the pattern's single
    `route` on a grid layout, when the options leave tile shapes open and the region is a
    box of power-of-two sides with 16..256 tokens: every tile is then one region, so kept
    tiles are FULL (no per-element mask) and exactly topk key tiles are visited."""
    routes = [n for n in walk(pattern.mask) if isinstance(n, Route)]
    layout = pattern.layout
    if len(routes) != 1 or layout is None or hasattr(layout, "q") or options.tile_1d \
            or options.q_tile is not None \
            or options.kv_tile is not None:
        return options
    nd = len(layout.axes)
    region, q_region = (_region_tuple(r, nd) for r in (routes[0].region, routes[0].query_region))

    def box(r):
        return all(x & (x - 1) == 0 for x in r) and 16 <= math.prod(r) <= 256
    if box(region) and box(q_region):
        return options.replace(q_tile=q_region, kv_tile=region)
    return options
