"""`backend="torch"`: differentiable block-sparse attention in plain torch (the CPU training path).

The forward and the backward visit only the kept tiles of attncc's schedule:

* *Tile lists.* Static patterns take their FULL / PARTIAL key-tile lists from the schedule's
  CSR (one list per head class, shared by the batch); patterns that read runtime data
  (`route`, `blocks`, document ids, `output scale`) take per-(batch, head, query tile) lists
  from the runtime pre-pass (`attncc.runtime.prepass_kernel.runtime_classes`). Both become two
  padded entry tensors `[B|1, H|1, nQT, E]` (key-tile indices and valid flags), one of FULL
  and one of PARTIAL tiles.
* *Forward.* q, k, v are laid out by tiles once (`[B, H, n_tiles, tile, D]`); query tiles
  are processed in chunks of G tiles at once: the listed K/V tiles of the chunk are gathered
  (`[B, H, G, E·Sk, D]`), scores come from one batched matmul, the score modifier is the IR
  lowered to torch (`attncc.ir.lower_torch.to_score_mod`), the mask predicate is evaluated
  per element on PARTIAL tiles only (FULL tiles need at most the padding mask), and
  softmax runs in float32 (float64 for float64 inputs) — online over entry sub-chunks when one
  query tile's list is too long for one slab. Only `out` and the log-sum-exp are kept: memory
  is O(B·H·L·D) plus one slab, never a dense [Lq, Lkv] matrix.
* *Backward* (flash-attention style). P is recomputed chunk by chunk from the saved lse;
  Δ = rowsum(dO ⊙ O); dS = P ⊙ (dP − Δ). The chain rule through the score modifier is taken
  by evaluating the lowered score expression on the gathered chunk with autograd enabled and
  calling `torch.autograd.grad` on that chunk only — so softcap, alibi, temperature, selects
  and table lookups all differentiate, and floating-point tables read in `score` get their
  gradients, summed chunk after chunk in a fixed order. dK / dV of each visited tile are
  accumulated per (batch, KV head, key tile) in a fixed order (`runtime.reduce.index_add_rows`:
  the serial `index_add_` on CPU, a stable sort plus `segment_reduce` on CUDA, whose
  `index_add_` uses atomics), so two runs are bit-identical on every device; GQA sums the
  query heads of a group there.
  dQ rows belong to one query tile, so they are accumulated per tile, never scattered.
* *Output scale* `w[b, q, h]`: out = w · O. dO reaching the attention is w · dO and
  dW = rowsum(O ⊙ dO); (batch, head, query tile) triples the forward skipped (all weights
  zero) are recomputed in the backward when w needs a gradient, so they get their true dW.
* *Selections.* `route` and `blocks` choose tiles by top-k / thresholds: piecewise constant,
  so no gradient flows through the selection (the route affinities or the block scores);
  the kept scores, values and keys get their gradients as usual.
* A query row with no visible key outputs 0 with lse −inf and gets zero gradients (no NaN).

The entry point is `torch_attention`; `attncc.compile(p, backend="torch")` calls it. It is
differentiable on its own (a `torch.autograd.Function`), so callers must not wrap it.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import torch

from ..ir.inputs import InputError, check_inputs, check_qkv
from ..ir.lower_torch import output_scale, to_mask_mod, to_score_mod
from ..ir.nodes import FLOAT, Blocks, Load, Route, Var, free_vars, walk
from ..schedule.schedule import CSR
from .prepass import lists_from_classes
from .reduce import index_add_rows

__all__ = ["torch_attention", "plan_lists", "TorchPlan", "Segment"]

# Elements of one gathered score slab [B, H, G, Sq, N] (several such temporaries live at once;
# 1 MiB of float32 keeps them cache-friendly: larger slabs measured slower on CPU).
SLAB_ELEMS = 1 << 18


@dataclass(frozen=True, eq=False)
class Segment:
    """One list kind of a call: key tiles per (batch, head, query tile), all FULL or all PARTIAL.

    entries  int64 [B|1, H|1, nQT, E]  key-tile indices, valid ones first (0-padded)
    valid    bool  [B|1, H|1, nQT, E]
    full     True: every pair of these tiles is kept (no mask code)
    """
    entries: torch.Tensor
    valid: torch.Tensor
    full: bool


@dataclass(frozen=True, eq=False)
class TorchPlan:
    """The tile lists of one call.

    q_tok     int64 [nQT, Sq]   token of each query-tile slot (-1 = padding)
    k_tok     int64 [nKT, Sk]   token of each key-tile slot (-1 = padding)
    segments  the FULL and the PARTIAL `Segment`; the batch / head dimension of a segment is
              1 when every batch / head has the same lists (static patterns, one head class)
    mask_mod  callable(b, h, q, k) -> bool over broadcast index tensors (PARTIAL tiles)
    """
    q_tok: torch.Tensor
    k_tok: torch.Tensor
    segments: tuple
    mask_mod: Callable
    stats: dict
    q_contig: bool = False   # 1-D tiles of consecutive tokens (tile layout is a reshape)
    k_contig: bool = False


def _dynamic(pattern) -> bool:
    from .prepass_kernel import needs_prepass
    return needs_prepass(pattern) or "b" in free_vars(pattern.mask) or any(
        isinstance(n, (Load, Route, Blocks)) for n in walk(pattern.mask))


def _padded(csr: CSR, device) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR rows → (int64 [n_rows, width] indices, bool [n_rows, width] valid)."""
    counts = csr.counts.to(torch.int64)
    width = int(counts.max()) if counts.numel() else 0
    pos = torch.arange(width)
    valid = pos < counts[:, None]
    idx = (csr.offsets[:-1].to(torch.int64)[:, None] + pos).clamp(max=max(csr.nnz - 1, 0))
    ind = csr.indices.to(torch.int64)[idx] if csr.nnz else torch.zeros_like(idx)
    return torch.where(valid, ind, torch.zeros_like(ind)).to(device), valid.to(device)


def _static_segment(schedule, kind: str, device) -> Segment:
    per_class = [_padded(getattr(c, kind), device) for c in schedule.classes]
    width = max(e.shape[-1] for e, _ in per_class)
    pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[-1]))  # noqa: E731
    ent = torch.stack([pad(e) for e, _ in per_class])                 # [C, nQT, E]
    val = torch.stack([pad(v) for _, v in per_class])
    if len(per_class) > 1:
        hc = torch.tensor(schedule.head_class, device=device)
        ent, val = ent[hc], val[hc]                                    # [H, nQT, E]
    return Segment(ent[None], val[None], kind == "full")


# Static lists per (schedule, device): schedules are cached per shape, so are their lists.
_STATIC_SEGMENTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def plan_lists(pattern, q, k, inputs: Mapping[str, torch.Tensor], *, options=None,
               schedule=None) -> TorchPlan:
    """Tile lists of one call: from the static `schedule` (built here when None) for patterns
    without runtime data, from the runtime pre-pass otherwise (`route` / `blocks` selections,
    document ids; output-scale skipping is applied by the caller). q [B, Hq, Lq, D], k
    [B, Hkv, Lkv, D] (read only by `route`)."""
    from .options import CompileOptions
    options = options or CompileOptions()
    B, Hq, Lq = q.shape[0], q.shape[1], q.shape[2]
    Lkv = k.shape[2]
    dev = q.device
    if not _dynamic(pattern):
        if schedule is None:
            from ..schedule.build import build_schedule
            schedule = build_schedule(pattern, Lq, Lkv, Hq, options=options)
        per = _STATIC_SEGMENTS.setdefault(schedule, {})
        segments = per.get(str(dev))
        if segments is None:
            segments = per[str(dev)] = tuple(_static_segment(schedule, kind, dev)
                                             for kind in ("full", "partial"))
        q_grid, kv_grid = schedule.q_grid, schedule.kv_grid
        mask_mod = to_mask_mod(pattern, {}, q_len=Lq, kv_len=Lkv, heads=Hq,
                               float_dtype=_cdtype(q.dtype))
    else:
        from .prepass_kernel import lower_selectors, region_aligned_options, runtime_classes
        opts = region_aligned_options(pattern, options)
        sched, cls, selections = runtime_classes(pattern, q.detach(), k.detach(), inputs,
                                                 options=opts)
        q_grid, kv_grid = sched.q_grid, sched.kv_grid
        lowered, sel_inputs = lower_selectors(pattern, selections)
        lists = lists_from_classes(cls)
        segments = []
        for idx, cnt, full in ((lists.full, lists.full_counts, True),
                               (lists.partial, lists.partial_counts, False)):
            pos = torch.arange(idx.shape[-1], device=dev)
            segments.append(Segment(idx.long(), pos < cnt[..., None], full))
        segments = tuple(segments)
        mask_mod = to_mask_mod(lowered, {**inputs, **sel_inputs}, q_len=Lq, kv_len=Lkv,
                               heads=Hq, float_dtype=_cdtype(q.dtype))
    counts = [int(sg.valid.sum()) * (B if sg.valid.shape[0] == 1 else 1)
              * (Hq if sg.valid.shape[1] == 1 else 1) for sg in segments]
    stats = {"q_tile": q_grid.label, "kv_tile": kv_grid.label,
             "full_tiles": counts[0], "partial_tiles": counts[1]}
    q_tok, k_tok = q_grid.token_index().to(dev), kv_grid.token_index().to(dev)
    return TorchPlan(q_tok, k_tok, segments, mask_mod, stats, _contiguous_tiles(q_tok, Lq),
                     _contiguous_tiles(k_tok, Lkv))


def _cdtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _contiguous_tiles(tok: torch.Tensor, L: int) -> bool:
    """True when tiles are runs of consecutive tokens (1-D tiles): slot i of the flattened
    tiling holds token i, and only the tail is padding."""
    flat = tok.flatten()
    return bool((flat[:L] == torch.arange(L, device=tok.device)).all()) \
        and bool((flat[L:] < 0).all())


def _tiles(x: torch.Tensor, tok: torch.Tensor, dtype, contiguous: bool = False) -> torch.Tensor:
    """x [B, H, L, ...] → [B, H, n_tiles, tile slots, ...] in `dtype` (padding slots hold
    zeros or token 0; every use masks them)."""
    if not contiguous:
        return x[:, :, tok.clamp(min=0)].to(dtype)
    n, L = tok.numel(), x.shape[2]
    if n != L:
        buf = torch.zeros((*x.shape[:2], n, *x.shape[3:]), dtype=dtype, device=x.device)
        buf[:, :, :L] = x
        x = buf
    return x.to(dtype).reshape(*x.shape[:2], *tok.shape, *x.shape[3:])


def _untile(t: torch.Tensor, tok: torch.Tensor, L: int, fill: float = 0.0,
            contiguous: bool = False) -> torch.Tensor:
    """Inverse of `_tiles`: [B, H, n_tiles, slots, ...] → [B, H, L, ...] (tiles partition
    the tokens, so this is a plain copy)."""
    if contiguous:
        return t.flatten(2, 3)[:, :, :L].contiguous()
    flat = tok.flatten()
    real = flat >= 0
    out = torch.full((*t.shape[:2], L, *t.shape[4:]), fill, dtype=t.dtype, device=t.device)
    out[:, :, flat[real]] = t.flatten(2, 3)[:, :, real]
    return out


# ---- the slab loop ---------------------------------------------------------------------------

class _Slabs:
    """Iterates over slabs (a chunk of G query tiles × a run of entries of one segment) and
    gathers their operands. A slab's score block is [B, H, G, Sq, Ec·Sk] ≤ SLAB_ELEMS."""

    def __init__(self, plan: TorchPlan, B: int, H: int, Hkv: int, rows: Optional[torch.Tensor]):
        self.plan, self.B, self.H, self.ratio = plan, B, H, H // Hkv
        dev = plan.q_tok.device
        self.segs = []
        for sg in plan.segments:
            if sg.entries.shape[-1] == 0:
                continue
            valid = sg.valid if rows is None else sg.valid & rows[..., None]    # rows [B, H, nQT]
            self.segs.append((sg.entries, valid, sg.full))
        self.nqt, self.sq = plan.q_tok.shape
        self.sk = plan.k_tok.shape[1]
        E = sum(e.shape[-1] for e, _, _ in self.segs)
        per_tile = B * H * self.sq * self.sk
        self.G = max(1, SLAB_ELEMS // max(1, per_tile * max(E, 1)))
        self.ec = max(1, SLAB_ELEMS // (per_tile * self.G))
        self.bi = torch.arange(B, device=dev).view(-1, 1, 1, 1)
        self.hk = (torch.arange(H, device=dev) // self.ratio).view(1, -1, 1, 1)
        self.hk1 = torch.arange(H, device=dev) // self.ratio
        self.b5 = torch.arange(B, device=dev).view(-1, 1, 1, 1, 1)
        self.h5 = torch.arange(H, device=dev).view(1, -1, 1, 1, 1)

    def chunks(self):
        """Yields (t0, t1, slabs) for query-tile chunks with work; each slab is
        (ktok [B|1, H|1, G, N] clamped, kreal bool [.., G, N], full, entries [.., G, Ec],
        valid [.., G, Ec])."""
        live = torch.zeros(self.nqt, dtype=torch.bool, device=self.plan.q_tok.device)
        for _, valid, _ in self.segs:
            live |= valid.flatten(0, 1).any(-1).any(0)
        live = live.tolist()
        for t0 in range(0, self.nqt, self.G):
            t1 = min(self.nqt, t0 + self.G)
            if any(live[t0:t1]):
                yield t0, t1, self._slabs(t0, t1)

    def _slabs(self, t0, t1):
        for ent_all, val_all, full in self.segs:
            # Valid entries come first in every row: stop at this chunk's longest row.
            width = int(val_all[:, :, t0:t1].sum(-1).max())
            for e0 in range(0, width, self.ec):
                e1 = min(width, e0 + self.ec)
                val = val_all[:, :, t0:t1, e0:e1]
                if not bool(val.any()):
                    continue
                ent = ent_all[:, :, t0:t1, e0:e1]
                ktok = self.plan.k_tok[ent]                                # [.., G, Ec, Sk]
                kreal = (ktok >= 0) & val[..., None]
                yield ktok.flatten(-2).clamp(min=0), kreal.flatten(-2), full, ent, val

    def gather(self, tiles: torch.Tensor, ent: torch.Tensor) -> torch.Tensor:
        """tiles [B, Hkv, nKT, Sk, D] at `ent` → [B, H, G, Ec·Sk, D]."""
        if ent.shape[0] == 1 and ent.shape[1] == 1:
            g = tiles[:, :, ent[0, 0]]                                    # [B, Hkv, G, Ec, Sk, D]
            if self.ratio > 1:
                g = g.index_select(1, self.hk1)
            return g.flatten(3, 4)
        return tiles[self.bi, self.hk, ent].flatten(3, 4)

    def keep(self, qc, qreal, ktok, kreal, full):
        """bool [B|1, H|1, G, Sq, N] of kept pairs, or None when the slab keeps every pair."""
        if full and bool(qreal.all()) and bool(kreal.all()):
            return None
        keep = qreal.view(1, 1, *qreal.shape, 1) & kreal[..., None, :]
        if not full:
            keep = keep & self.plan.mask_mod(self.b5, self.h5, qc.view(1, 1, *qc.shape, 1),
                                             ktok[..., None, :])
        return keep


def _scores(slabs, qg, kg, score_fn, qc, ktok):
    """Scores of a slab from query tiles pre-multiplied by the softmax scale."""
    s = qg @ kg.transpose(-1, -2)                                         # [B, H, G, Sq, N]
    if score_fn is None:
        return s
    out = score_fn(s, slabs.b5, slabs.h5, qc.view(1, 1, *qc.shape, 1), ktok[..., None, :])
    return torch.broadcast_to(out, s.shape)


def _forward_core(plan: TorchPlan, q, k, v, scale: float, score_fn, rows=None):
    """Unscaled attention O [B, H, Lq, Dv] and lse [B, H, Lq] in the compute dtype, over the
    (b, h, query tile) triples selected by `rows` (bool [B, H, nQT]; None = all)."""
    B, H, Lq, _ = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    cdt = _cdtype(q.dtype)
    slabs = _Slabs(plan, B, H, Hkv, rows)
    qt = _tiles(q, plan.q_tok, cdt, plan.q_contig) * scale                # [B, H, nQT, Sq, D]
    kt = _tiles(k, plan.k_tok, cdt, plan.k_contig)                        # [B, Hkv, nKT, Sk, D]
    vt = _tiles(v, plan.k_tok, cdt, plan.k_contig)
    o_t = torch.zeros(B, H, slabs.nqt, slabs.sq, Dv, dtype=cdt, device=q.device)
    lse_t = torch.full((B, H, slabs.nqt, slabs.sq), -math.inf, dtype=cdt, device=q.device)
    for t0, t1, slab_iter in slabs.chunks():
        qtok = plan.q_tok[t0:t1]
        qreal, qc = qtok >= 0, qtok.clamp(min=0)
        qg = qt[:, :, t0:t1]
        m_i = l_i = acc = None
        for ktok, kreal, full, ent, _ in slab_iter:
            kg, vg = slabs.gather(kt, ent), slabs.gather(vt, ent)
            s = _scores(slabs, qg, kg, score_fn, qc, ktok)
            keep = slabs.keep(qc, qreal, ktok, kreal, full)
            if keep is not None:
                s = s.masked_fill(~keep, -math.inf)
            m_new = s.amax(-1) if m_i is None else torch.maximum(m_i, s.amax(-1))
            m_use = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
            p = torch.exp(s - m_use[..., None])
            if m_i is None:
                l_i, acc = p.sum(-1), p @ vg
            else:
                alpha = torch.exp(m_i - m_use)
                l_i = l_i * alpha + p.sum(-1)
                acc = acc * alpha[..., None] + p @ vg
            m_i = m_new
        if m_i is None:
            continue
        ok = l_i > 0
        safe_l = torch.where(ok, l_i, torch.ones_like(l_i))
        o_t[:, :, t0:t1] = acc / safe_l[..., None]
        lse_t[:, :, t0:t1] = torch.where(ok, m_i + torch.log(safe_l),
                                         torch.full_like(m_i, -math.inf))
    return (_untile(o_t, plan.q_tok, Lq, 0.0, plan.q_contig),
            _untile(lse_t, plan.q_tok, Lq, -math.inf, plan.q_contig))


def _backward_core(plan: TorchPlan, q, k, v, scale: float, score_fn_grad, lse, do, delta,
                   tables_req, need, rows=None):
    """dq, dk, dv (compute dtype) and the gradients of `tables_req` (the leaves the score
    function reads) from dO [B, H, Lq, Dv] (already multiplied by the output scale), lse and
    delta = rowsum(dO ⊙ O) − dlse [B, H, Lq]. `need` = (dq?, dk?, dv?). `rows` bool
    [B, H, nQT] restricts the work to the triples the forward computed (skipped ones have all
    output-scale weights zero, so dO is 0 there)."""
    B, H, Lq, D = q.shape
    Hkv, Lkv, Dv = k.shape[1], k.shape[2], v.shape[-1]
    cdt = _cdtype(q.dtype)
    dev = q.device
    slabs = _Slabs(plan, B, H, Hkv, rows)
    nkt, sk = plan.k_tok.shape
    qc_, kc_ = plan.q_contig, plan.k_contig
    qt = _tiles(q, plan.q_tok, cdt, qc_) * scale                          # q · scale
    kt, vt = _tiles(k, plan.k_tok, cdt, kc_), _tiles(v, plan.k_tok, cdt, kc_)
    do_t = _tiles(do, plan.q_tok, cdt, qc_)
    lse_t = _tiles(lse, plan.q_tok, cdt, qc_)
    delta_t = _tiles(delta, plan.q_tok, cdt, qc_)
    dq_t = torch.zeros(qt.shape, dtype=cdt, device=dev) if need[0] else None
    # Per (b, KV head, key tile) accumulators; row nkt of each (b, KV head) takes unused entries.
    dk_a = torch.zeros(B * Hkv * (nkt + 1), sk * D, dtype=cdt, device=dev) if need[1] else None
    dv_a = torch.zeros(B * Hkv * (nkt + 1), sk * Dv, dtype=cdt, device=dev) if need[2] else None
    tgrads = [None] * len(tables_req)
    bkv = (slabs.bi * Hkv + slabs.hk) * (nkt + 1)                          # [B, H, 1, 1]
    zero = torch.zeros((), dtype=cdt, device=dev)
    for t0, t1, slab_iter in slabs.chunks():
        qtok = plan.q_tok[t0:t1]
        qreal, qc = qtok >= 0, qtok.clamp(min=0)
        qg, dog = qt[:, :, t0:t1], do_t[:, :, t0:t1]
        lse_c, dl_c = lse_t[:, :, t0:t1, :, None], delta_t[:, :, t0:t1, :, None]
        for ktok, kreal, full, ent, val in slab_iter:
            kg, vg = slabs.gather(kt, ent), slabs.gather(vt, ent)
            if score_fn_grad is not None:
                with torch.enable_grad():
                    s_raw = (qg @ kg.transpose(-1, -2)).requires_grad_(True)
                    s = torch.broadcast_to(score_fn_grad(
                        s_raw, slabs.b5, slabs.h5, qc.view(1, 1, *qc.shape, 1),
                        ktok[..., None, :]), s_raw.shape)
            else:
                s_raw = s = qg @ kg.transpose(-1, -2)
            keep = slabs.keep(qc, qreal, ktok, kreal, full)
            # Rows without keys (lse = -inf) have every pair masked by `keep`, so p is 0 there.
            p = torch.exp(s.detach() - lse_c)
            if keep is not None:
                p = torch.where(keep, p, zero)
            tgt = (bkv + torch.where(val, ent, torch.full_like(ent, nkt))).flatten()
            if need[2]:
                index_add_rows(dv_a, tgt, (p.transpose(-1, -2) @ dog).reshape(-1, sk * Dv))
            ds = p * ((dog @ vg.transpose(-1, -2)) - dl_c)
            if score_fn_grad is not None:
                grads = torch.autograd.grad(s, [s_raw, *tables_req], ds, allow_unused=True)
                ds = grads[0] if keep is None else torch.where(keep, grads[0], zero)
                for i, g in enumerate(grads[1:]):
                    if g is not None:
                        tgrads[i] = g if tgrads[i] is None else tgrads[i] + g
            if need[0]:
                dq_t[:, :, t0:t1] += ds @ kg
            if need[1]:
                index_add_rows(dk_a, tgt, (ds.transpose(-1, -2) @ qg).reshape(-1, sk * D))

    def untile_kv(acc, width):
        return _untile(acc.view(B, Hkv, nkt + 1, sk, width)[:, :, :nkt], plan.k_tok, Lkv, 0.0, kc_)
    dq = _untile(dq_t, plan.q_tok, Lq, 0.0, qc_) * scale if need[0] else None
    dk = untile_kv(dk_a, D) if need[1] else None                    # qg carries the scale
    dv = untile_kv(dv_a, Dv) if need[2] else None
    return dq, dk, dv, tgrads


class _TorchAttention(torch.autograd.Function):
    """out = w · softmax-attention(q, k, v) over the plan's tiles; saves only O and lse."""

    @staticmethod
    def forward(ctx, plan, scale, score_info, q, k, v, w, *tables):
        names, fixed, make_score = score_info
        score_fn = make_score({**fixed, **dict(zip(names, tables))}) if make_score else None
        rows = None if w is None else _active(w, plan)
        o, lse = _forward_core(plan, q, k, v, scale, score_fn, rows)
        out = o if w is None else o * w.to(o.dtype)[..., None]
        ctx.save_for_backward(q, k, v, w, o, lse, *tables)
        ctx.plan, ctx.scale, ctx.score_info, ctx.rows = plan, scale, score_info, rows
        return out.to(q.dtype), lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, w, o, lse, *tables = ctx.saved_tensors
        names, fixed, make_score = ctx.score_info
        need_q, need_k, need_v, need_w = ctx.needs_input_grad[3:7]
        need_t = ctx.needs_input_grad[7:]
        cdt = o.dtype
        do = torch.zeros_like(o) if dout is None else dout.to(cdt)
        dw = None
        if w is not None:
            if need_w:
                o_full = o
                if ctx.rows is not None and not bool(ctx.rows.all()):
                    # Triples skipped in the forward (weights all zero) still have dW.
                    score_fn = make_score({**fixed, **dict(zip(names, tables))}) \
                        if make_score else None
                    o_skip, _ = _forward_core(ctx.plan, q, k, v, ctx.scale, score_fn, ~ctx.rows)
                    o_full = o + o_skip
                dw = (o_full * do).sum(-1).to(w.dtype)
            do = do * w.to(cdt)[..., None]
        delta = (o * do).sum(-1)
        if dlse is not None:
            delta = delta - torch.nan_to_num(dlse.to(cdt), nan=0.0)
        leaves = [t.detach().to(cdt).requires_grad_(True) if r else t.detach()
                  for t, r in zip(tables, need_t)]
        score_fn = make_score({**fixed, **dict(zip(names, leaves))}) if make_score else None
        req = [t for t, r in zip(leaves, need_t) if r]
        dq = dk = dv = None
        tg = [None] * len(req)
        if need_q or need_k or need_v or req:
            dq, dk, dv, tg = _backward_core(ctx.plan, q, k, v, ctx.scale, score_fn, lse, do,
                                            delta, req, (need_q, need_k, need_v), ctx.rows)
        it = iter(tg)
        dtabs = []
        for t, r in zip(tables, need_t):
            g = next(it) if r else None
            dtabs.append(None if g is None else g.to(t.dtype))
        cast = lambda g, t: None if g is None else g.to(t.dtype)  # noqa: E731
        return (None, None, None, cast(dq, q), cast(dk, k), cast(dv, v), dw, *dtabs)


def _active(w: torch.Tensor, plan: TorchPlan) -> torch.Tensor:
    """bool [B, H, nQT]: triples with a non-zero output-scale weight."""
    qs = plan.q_tok
    return ((w.detach()[:, :, qs.clamp(min=0)] * (qs >= 0)) != 0).any(-1)


def _score_tables(pattern) -> list[str]:
    """Names of floating-point inputs read by the score modifier (differentiable there)."""
    if pattern.score is None:
        return []
    return list(dict.fromkeys(n.input for n in walk(pattern.score)
                              if isinstance(n, Load) and n.elem == FLOAT))


def torch_attention(pattern, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    inputs: Optional[Mapping[str, torch.Tensor]] = None, *,
                    scale: Optional[float] = None, options=None, schedule=None,
                    validate: bool = True, plan: Optional[TorchPlan] = None):
    """Block-sparse attention of `pattern` in torch, differentiable with O(kept tiles) memory.

    q [B, Hq, Lq, D], k [B, Hkv, Lkv, D], v [B, Hkv, Lkv, Dv] (Hq % Hkv == 0) in
    float16/bfloat16/float32/float64; `inputs` the pattern's runtime tensors; `options` a
    CompileOptions (tile sizes); `schedule` the static Schedule for this shape if already
    built (static patterns only); `plan` the call's tile lists if already made by
    `plan_lists` (shared with a second pass, e.g. `runtime.block_scores`). Differentiable in q, k, v, floating-point tables read in
    `score` and inputs of the `output scale` (not through `route` / `blocks` selections).

    Returns (out [B, Hq, Lq, Dv] in q's dtype, lse [B, Hq, Lq] float32 (float64 for float64
    inputs; -inf for a row without keys), stats dict of visited tiles).
    """
    B, Hq, Hkv, Lq, Lkv, D, Dv = check_qkv(q, k, v)
    if getattr(pattern, "normalize", "softmax") != "softmax":
        raise ValueError(f"backend 'torch' runs softmax attention; pattern '{pattern.name}' "
                         f"has `normalize {pattern.normalize}`")
    inputs = dict(inputs or {})
    if validate:
        n, nk = pattern.fixed_length, pattern.fixed_kv_length
        if n is not None and (Lq != n or Lkv != nk):
            raise InputError(f"pattern '{pattern.name}' has layout {pattern.layout} "
                             f"({n if n == nk else f'{n} query and {nk} key'} tokens) but "
                             f"Lq={Lq}, Lkv={Lkv}")
        inputs = dict(check_inputs(pattern, inputs, batch=B, heads=Hq, q_len=Lq, kv_len=Lkv,
                                   device=q.device))
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    cdt = _cdtype(q.dtype)
    if Lq == 0 or Lkv == 0:
        return (q.new_zeros(B, Hq, Lq, Dv),
                torch.full((B, Hq, Lq), -math.inf, dtype=cdt, device=q.device), {})
    if plan is None:
        plan = plan_lists(pattern, q, k, {n: t.detach() for n, t in inputs.items()},
                          options=options, schedule=schedule)
    w = output_scale(pattern, inputs, batch=B, heads=Hq, q_len=Lq, kv_len=Lkv, device=q.device,
                     float_dtype=cdt)
    if w is not None:
        w = w.contiguous()
    names = _score_tables(pattern)
    fixed = {n: t.detach() for n, t in inputs.items() if n not in names}
    make_score = None
    identity = isinstance(pattern.score, Var) and pattern.score.name == "s"
    if pattern.score is not None and not identity:
        def make_score(tabs, _p=pattern):
            return to_score_mod(_p, tabs, q_len=Lq, kv_len=Lkv, heads=Hq, float_dtype=cdt)
    tables = [inputs[n] for n in names]
    grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (q, k, v, *tables, *(() if w is None else (w,))))
    if grad:
        out, lse = _TorchAttention.apply(plan, scale, (tuple(names), fixed, make_score), q, k, v,
                                         w, *tables)
    else:
        with torch.no_grad():
            tabs = {**fixed, **{n: inputs[n] for n in names}}
            score_fn = make_score(tabs) if make_score else None
            rows = None if w is None else _active(w, plan)
            o, lse = _forward_core(plan, q, k, v, scale, score_fn, rows)
            out = (o if w is None else o * w[..., None]).to(q.dtype)
    stats = dict(plan.stats)
    if w is not None:
        act = _active(w, plan)
        stats["skipped_head_tiles"] = int((~act).sum())
    return out, lse, stats
