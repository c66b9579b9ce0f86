"""`backend="flex"`: run a pattern through PyTorch FlexAttention.

The pattern's mask and score modifier are lowered to `mask_mod` / `score_mod`
(`attncc.ir.lower_torch`), the block structure comes from attncc's analytic schedule
(`attncc.schedule.blockmask.to_block_mask`: no O(Lq·Lkv) `create_block_mask`), and the
`output scale` multiplies each head's output rows afterwards. FlexAttention is compiled once
per process (`torch.compile(flex_attention)`); on CPU this is its fast C++ path. The block
structure is cached per (pattern, shape, heads, device); each call attaches its own mask_mod
(whose captured inputs may change between calls) without recompiling.

Patterns whose mask reads runtime data (document ids, `route`, `blocks`) get a per-call
BlockMask instead, built from the runtime pre-pass's tile classes per (batch, head): blocks
across documents or outside the selected regions/blocks are never visited, and the selectors
are lowered to loads of their selection tensors inside the mask_mod.
"""
from __future__ import annotations

import functools
import math
import warnings
from typing import Mapping, Optional

import torch
from torch.nn.attention.flex_attention import AuxRequest

from ...ir.dense import resolve_lengths
from ...ir.inputs import InputError, check_inputs, check_qkv
from ...ir.lower_torch import output_scale, to_mask_mod, to_score_mod
from ...ir.nodes import Blocks, Load, Route, walk
from ...schedule.blockmask import DEFAULT_BLOCK, to_block_mask, with_mask_mod
from ..options import CompileOptions

_COMPILED = None


def compiled_flex_attention():
    """The process-wide `torch.compile(flex_attention)` (compiled lazily on first use)."""
    global _COMPILED
    if _COMPILED is None:
        from torch.nn.attention.flex_attention import flex_attention
        _COMPILED = torch.compile(flex_attention, dynamic=False)
    return _COMPILED


FLEX_CPU_GRAD_ERROR = ("backend 'flex' cannot compute gradients on CPU (FlexAttention has no CPU "
                       "backward pass); use backend='interpret' or 'reference', or call under "
                       "torch.no_grad()")


def _pick_flex(q, k, v, return_lse: bool):
    """Compiled FlexAttention, except where its CPU path cannot serve the call: it has no
    log-sum-exp output, so CPU calls that need the lse run FlexAttention eagerly (correct,
    but it materializes the scores). FlexAttention has no CPU backward at all."""
    if q.device.type != "cpu":
        return compiled_flex_attention()
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise ValueError(FLEX_CPU_GRAD_ERROR)
    if return_lse:
        from torch.nn.attention.flex_attention import flex_attention
        return flex_attention
    return compiled_flex_attention()


@functools.lru_cache(maxsize=32)
def _block_structure(pattern, q_len: int, kv_len: int, heads: int, block: int, device: str):
    """The analytic BlockMask of one call shape (block tensors on `device`), cached; its
    placeholder mask_mod is swapped for the call's own (`with_mask_mod`)."""
    from torch.nn.attention.flex_attention import noop_mask

    from ...schedule.build import build_schedule
    opts = CompileOptions(block_m=block, block_n=block, tile_1d=True)
    sched = build_schedule(pattern, q_len, kv_len, heads=heads, options=opts)
    return to_block_mask(sched, block_size=block, mask_mod=noop_mask, device=device)


def _reads_runtime_data(pattern) -> bool:
    return any(isinstance(n, (Load, Route, Blocks)) for n in walk(pattern.mask))


def _runtime_block_mask(pattern, q, k, inputs, block: int, lower: dict):
    """(BlockMask [B, Hq, nQ, nKV] from the pre-pass classes of this call, its mask_mod)."""
    from torch.nn.attention.flex_attention import BlockMask

    from ..prepass import FULL, PARTIAL
    from ..prepass_kernel import lower_selectors, runtime_classes
    opts = CompileOptions(block_m=block, block_n=block, tile_1d=True)
    _, cls, selections = runtime_classes(pattern, q, k, inputs, options=opts)
    lowered, sel_inputs = lower_selectors(pattern, selections)
    mask_mod = to_mask_mod(lowered, {**inputs, **sel_inputs}, **lower)

    def lists(kind: int):
        hit = cls == kind
        order = torch.sort((~hit).to(torch.int8), dim=-1, stable=True).indices
        return hit.sum(-1, dtype=torch.int32), order.to(torch.int32)

    (n_part, i_part), (n_full, i_full) = lists(PARTIAL), lists(FULL)
    block_mask = BlockMask.from_kv_blocks(n_part, i_part, n_full, i_full, BLOCK_SIZE=block,
                                          mask_mod=mask_mod, seq_lengths=(lower["q_len"], lower["kv_len"]))
    return block_mask, mask_mod


def flex_forward(pattern, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                 scale: Optional[float] = None, inputs: Mapping[str, torch.Tensor] = {},
                 return_lse: bool = False, block_size: int = DEFAULT_BLOCK):
    """Attention of `pattern` computed by compiled FlexAttention.

    q [B, Hq, Lq, D], k [B, Hkv, Lkv, D], v [B, Hkv, Lkv, Dv] with Hq % Hkv == 0 (GQA via
    `enable_gqa`); `inputs` are the pattern's runtime inputs (checked against their declared
    shapes). Default scale 1/sqrt(D). Rows with no visible key give 0 and lse -inf.

    Returns out [B, Hq, Lq, Dv] (q's dtype), or (out, lse float32 [B, Hq, Lq], natural log)
    with `return_lse=True`. The output scale, if any, multiplies `out` (not the lse).
    Patterns reading runtime data get a per-call BlockMask from the runtime pre-pass (see the
    module docstring). Raises ValueError for CPU tensors that require gradients (FlexAttention
    has no CPU backward pass).
    """
    B, Hq, Hkv, Lq, Lkv, D, Dv = check_qkv(q, k, v)
    fn = _pick_flex(q, k, v, return_lse)
    resolve_lengths(pattern, Lq, Lkv)
    if getattr(pattern, "checks", ()):
        pattern.check_lengths(Lq, Lkv)
    inputs = check_inputs(pattern, dict(inputs), batch=B, heads=Hq, q_len=Lq, kv_len=Lkv,
                          device=q.device)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    fdtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    lower = dict(q_len=Lq, kv_len=Lkv, heads=Hq, float_dtype=fdtype)
    score_mod = to_score_mod(pattern, inputs, **lower)

    if Lq == 0 or Lkv == 0:
        out = q.new_zeros(B, Hq, Lq, Dv)
        lse = torch.full((B, Hq, Lq), -math.inf, dtype=torch.float32, device=q.device)
    else:
        if q.device.type == "cpu":  # no grad needed here (checked above); Flex rejects the flag
            q, k, v = q.detach(), k.detach(), v.detach()
        if _reads_runtime_data(pattern):
            block_mask, _ = _runtime_block_mask(pattern, q, k, inputs, block_size, lower)
        else:
            structure = _block_structure(pattern, Lq, Lkv, Hq, block_size, str(q.device))
            block_mask = with_mask_mod(structure, to_mask_mod(pattern, inputs, **lower))
        aux = AuxRequest(lse=True) if return_lse else None
        with warnings.catch_warnings():
            # The eager fallback is chosen deliberately (see _pick_flex).
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            res = fn(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                     enable_gqa=Hq != Hkv, return_aux=aux)
        out, lse = (res[0], res[1].lse) if return_lse else (res, None)
    w = output_scale(pattern, inputs, batch=B, heads=Hq, q_len=Lq, kv_len=Lkv,
                     device=q.device, float_dtype=fdtype)
    if w is not None:
        out = (out.to(fdtype) * w.unsqueeze(-1)).to(q.dtype)
    return (out, lse) if return_lse else out


__all__ = ["flex_forward", "compiled_flex_attention", "InputError"]
