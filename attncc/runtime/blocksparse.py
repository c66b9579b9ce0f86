"""Block-sparse attention in torch for data-dependent patterns: the CPU execution path.

`blocksparse_attention` runs a pattern from the runtime pre-pass lists
(`attncc.runtime.prepass`): for each query tile it gathers only the listed K/V tiles of every
(batch, head) at once, applies the score modifier, evaluates the mask per element on PARTIAL
tiles only (FULL tiles keep every real pair without mask code), runs a float32 online softmax
over chunks of key tiles and applies `output scale`, skipping (batch, head, query tile)
triples whose weights are all zero. It is the reference-speed execution for CPU tensors
(torch ops, no Triton); CUDA tensors use the generated kernels with the same lists.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Union

import torch

from ..ir.dense import Evaluator
from ..ir.inputs import InputError, check_inputs, check_qkv
from ..schedule.schedule import TileGrid
from .conjuncts import pattern_classes
from .prepass import PrepassStats, _active_tiles, _as_grid, _env, head_weights, lists_from_classes

__all__ = ["blocksparse_attention"]

# Elements of one gathered score slab [B, H, tile rows, keys].
_SLAB_ELEMS = 1 << 21


class _SelectionEvaluator(Evaluator):
    """The dense evaluator with `route` / `blocks` read from pre-pass selections, so a PARTIAL
    tile's per-element mask uses exactly the selection its tile lists came from."""

    def __init__(self, env, selections, **kw):
        super().__init__(env, **kw)
        self.selections = selections

    def _selection(self, node):
        sel, q_gid, k_gid = self.selections[node]
        return sel[self._var("b"), self._var("h"), q_gid[self._var("q")], k_gid[self._var("k")]]

    _route = _selection
    _blocks = _selection



def blocksparse_attention(pattern, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          inputs: Optional[Mapping[str, torch.Tensor]] = None, *,
                          q_tile: Union[int, tuple, TileGrid] = 64,
                          kv_tile: Union[int, tuple, TileGrid] = 64, scale: Optional[float] = None,
                          static=None):
    """Block-sparse attention of `pattern` in torch (the CPU path for data-dependent patterns).

    q [B, Hq, Lq, D], k [B, Hkv, Lkv, D], v [B, Hkv, Lkv, Dv] (GQA: Hq % Hkv == 0); `inputs`
    the pattern's runtime tensors. Tiles: an int (1-D tiles of consecutive tokens), a tile
    extent tuple over the layout, or a `TileGrid`. Builds the pre-pass tile lists, then for each
    query tile gathers only the listed K/V tiles of every (batch, head), applies the score
    modifier, the mask (per element on PARTIAL tiles only), a float32 online softmax and the
    output scale. (batch, head, query tile) triples whose output-scale weights are all zero
    are skipped (output 0, lse −inf); a row with no visible key gives 0 and lse −inf.

    Returns (out [B, Hq, Lq, Dv] in q's dtype, lse float32 [B, Hq, Lq], PrepassStats).
    """
    B, Hq, Hkv, Lq, Lkv, D, Dv = check_qkv(q, k, v)
    inputs = dict(inputs or {})
    dev = q.device
    n, nk = pattern.fixed_length, pattern.fixed_kv_length
    if n is not None and (Lq != n or Lkv != nk):
        raise InputError(f"pattern '{pattern.name}' has layout {pattern.layout} "
                         f"({n if n == nk else f'{n} query and {nk} key'} tokens) but "
                         f"Lq={Lq}, Lkv={Lkv}")
    inputs = dict(check_inputs(pattern, inputs, batch=B, heads=Hq, q_len=Lq, kv_len=Lkv, device=dev))
    one_grid = pattern.layout is not None and not hasattr(pattern.layout, "q")
    shape_q = pattern.layout.shape if one_grid else (Lq,)
    shape_k = pattern.layout.shape if one_grid else (Lkv,)
    q_grid, kv_grid = _as_grid(q_tile, shape_q, "q_tile"), _as_grid(kv_tile, shape_k, "kv_tile")
    cls, selections = pattern_classes(pattern, q, k, inputs, q_grid, kv_grid, static)
    weights = head_weights(pattern, inputs, B, Hq, Lq, Lkv, dev)

    qs, ks = q_grid.token_index().to(dev), kv_grid.token_index().to(dev)
    nqt, sq = qs.shape
    sk = ks.shape[1]
    active = _active_tiles(weights, q_grid, (B, Hq), dev)             # [B, H, nQT]
    cls = torch.where(active[..., None], cls, torch.zeros_like(cls))
    lists = lists_from_classes(cls)
    stats = PrepassStats(head_tiles=B * Hq * nqt, skipped_head_tiles=int((~active).sum()),
                         full_tiles=int(lists.full_counts.sum()),
                         partial_tiles=int(lists.partial_counts.sum()))

    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    out = torch.zeros(B, Hq, Lq, Dv, dtype=q.dtype, device=dev)
    lse = torch.full((B, Hq, Lq), -math.inf, dtype=torch.float32, device=dev)
    bi = torch.arange(B, device=dev).view(-1, 1, 1)
    hk = (torch.arange(Hq, device=dev) // (Hq // Hkv)).view(1, -1, 1)
    base_env = _env(B, Hq, Lq, Lkv, dev)
    n_full = lists.full.shape[-1]
    entries = torch.cat([lists.full, lists.partial], -1).long()        # [B, H, nQT, E]
    pos = torch.arange(entries.shape[-1], device=dev)
    valid = torch.where(pos < n_full, pos < lists.full_counts[..., None],
                        pos - n_full < lists.partial_counts[..., None])
    is_full = pos < n_full
    chunk = max(1, _SLAB_ELEMS // max(1, B * Hq * sq * sk))
    for t in range(nqt):
        ent_valid = valid[:, :, t]
        if not bool(ent_valid.any()):
            continue
        qtok = qs[t]
        qreal = qtok >= 0
        qc = qtok.clamp(min=0)
        qt = q[:, :, qc].to(torch.float32)                                # [B, H, Sq, D]
        m_i = torch.full((B, Hq, sq), -math.inf, dtype=torch.float32, device=dev)
        l_i = torch.zeros(B, Hq, sq, dtype=torch.float32, device=dev)
        acc = torch.zeros(B, Hq, sq, Dv, dtype=torch.float32, device=dev)
        for c0 in range(0, entries.shape[-1], chunk):
            c1 = min(entries.shape[-1], c0 + chunk)
            ev_c = ent_valid[..., c0:c1]
            if not bool(ev_c.any()):
                continue
            ktok = ks[entries[:, :, t, c0:c1]]                             # [B, H, C, Sk]
            kreal = (ktok >= 0) & ev_c[..., None]
            ktok, kreal = ktok.flatten(-2).clamp(min=0), kreal.flatten(-2)  # [B, H, N]
            kg = k[bi, hk, ktok].to(torch.float32)                         # [B, H, N, D]
            vg = v[bi, hk, ktok].to(torch.float32)
            s = (qt @ kg.transpose(-1, -2)) * scale                        # [B, H, Sq, N]
            env = dict(base_env, q=qc.view(1, 1, -1, 1), k=ktok[:, :, None, :])
            if pattern.score is not None:
                s = _SelectionEvaluator(dict(env, s=s), selections, layout=pattern.layout,
                                        inputs=inputs, device=dev).evaluate(pattern.score)
                s = torch.broadcast_to(s, (B, Hq, sq, ktok.shape[-1])).to(torch.float32)
            all_full = bool(is_full[c0:c1].all())
            if not (all_full and bool(kreal.all()) and bool(qreal.all())):
                # Padding slots, unused list entries and PARTIAL tiles need a mask; a chunk of
                # FULL tiles without padding needs none.
                keep = kreal[:, :, None, :] & qreal.view(1, 1, -1, 1)
                if not all_full:
                    full_c = is_full[c0:c1].repeat_interleave(sk).view(1, 1, 1, -1)
                    em = _SelectionEvaluator(env, selections, layout=pattern.layout,
                                             inputs=inputs, device=dev).evaluate(pattern.mask)
                    keep = keep & (full_c | em)
                s = s.masked_fill(~keep, -math.inf)
            m_new = s.amax(-1) if c0 == 0 else torch.maximum(m_i, s.amax(-1))
            m_use = m_new.nan_to_num(0.0, posinf=0.0, neginf=0.0)  # an empty row shifts by 0
            p = torch.exp(s - m_use[..., None])
            if c0 == 0:
                l_i, acc = p.sum(-1), p @ vg
            else:
                alpha = torch.exp(m_i - m_use)
                l_i = l_i * alpha + p.sum(-1)
                acc = acc * alpha[..., None] + p @ vg
            m_i = m_new
        ok = l_i > 0
        o = torch.where(ok[..., None], acc / torch.where(ok, l_i, torch.ones_like(l_i))[..., None],
                        torch.zeros_like(acc))
        if weights is not None:
            o = o * weights[:, :, qc][..., None]
        rows = qtok[qreal]
        out[:, :, rows] = o[:, :, qreal].to(q.dtype)
        lse[:, :, rows] = torch.where(ok, m_i + torch.log(torch.where(ok, l_i, torch.ones_like(l_i))),
                                      torch.full_like(m_i, -math.inf))[:, :, qreal]
    return out, lse, stats
