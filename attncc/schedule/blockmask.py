"""Export a `Schedule` as a FlexAttention `BlockMask`.

Pre: a static schedule (no runtime selectors) of a pattern for one (q_len, kv_len, heads).
Post: a `torch.nn.attention.flex_attention.BlockMask` over the tensors in their given (flat,
row-major) token order, with 1-D blocks of `block_size` tokens on both sides:
    kv_num_blocks / kv_indices            PARTIAL tiles (FlexAttention applies mask_mod)
    full_kv_num_blocks / full_kv_indices  FULL tiles (mask_mod skipped)
shaped [B', H, nQ] and [B', H, nQ, nKV] (B' = 1, or `batch`), expanded from the head classes,
with attncc's lowered `mask_mod` attached and `seq_lengths=(q_len, kv_len)`.

When the schedule's own tiles are not 1-D blocks of `block_size` (multi-dimensional tiles of a
grid layout, or another block size), the classification is redone for 1-D blocks with
`build_schedule(..., CompileOptions(block_m=block_size, block_n=block_size, tile_1d=True))`.
All work here is O(tiles): no (q, k) element is ever enumerated.
"""
from __future__ import annotations

from typing import Callable, Mapping, Optional

import torch

from ..ir.lower_torch import RUNTIME_SELECTOR_ERROR, to_mask_mod
from .schedule import CSR, Schedule

DEFAULT_BLOCK = 128


def _is_flat_1d(schedule: Schedule, block: int) -> bool:
    return (schedule.q_grid.shape == (schedule.q_len,) and schedule.q_grid.tile == (block,)
            and schedule.kv_grid.shape == (schedule.kv_len,) and schedule.kv_grid.tile == (block,))


def flat_schedule(schedule: Schedule, block_size: int = DEFAULT_BLOCK) -> Schedule:
    """`schedule` itself if its tiles are 1-D blocks of `block_size` tokens on both sides,
    otherwise the pattern's schedule rebuilt with such tiles (same lengths and heads)."""
    if _is_flat_1d(schedule, block_size):
        return schedule
    from ..options import CompileOptions
    from .build import build_schedule
    opts = CompileOptions(block_m=block_size, block_n=block_size, tile_1d=True)
    out = build_schedule(schedule.pattern, schedule.q_len, schedule.kv_len,
                         heads=schedule.heads, options=opts)
    if not _is_flat_1d(out, block_size):
        raise ValueError(f"could not tile pattern '{schedule.pattern.name}' with 1-D blocks of "
                         f"{block_size} tokens (got {out.q_grid} / {out.kv_grid})")
    return out


def csr_to_padded(csr: CSR, n_cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR rows → FlexAttention's (num_blocks int32 [n_rows], indices int32 [n_rows, n_cols]):
    row r lists its column indices first (ascending), padded with zeros."""
    counts = csr.counts.to(torch.int64)
    n_rows = csr.n_rows
    idx = torch.zeros(n_rows, max(n_cols, 1), dtype=torch.int32)
    if csr.nnz:
        rows = torch.repeat_interleave(torch.arange(n_rows), counts)
        pos = torch.arange(csr.nnz) - csr.offsets[:-1].to(torch.int64)[rows]
        idx[rows, pos] = csr.indices.to(torch.int32)
    return counts.to(torch.int32), idx[:, :n_cols]


def to_block_mask(schedule: Schedule, *, batch: Optional[int] = None,
                  block_size: int = DEFAULT_BLOCK, inputs: Optional[Mapping[str, torch.Tensor]] = None,
                  mask_mod: Optional[Callable] = None, device=None):
    """FlexAttention `BlockMask` equivalent to `schedule` (see module docstring).

    batch       None → block tensors with batch dimension 1 (shared by every batch entry,
                valid because a static schedule does not depend on b); an int expands them
                to [batch, H, ...]
    block_size  FlexAttention's block size in tokens (both sides), default 128
    inputs      the pattern's runtime inputs, needed by the mask_mod of patterns that read them
    mask_mod    a ready mask_mod to attach instead of lowering the pattern's mask
    device      where the block tensors live (default CPU); captured inputs stay where they are

    Raises ValueError for schedules with runtime selectors (route/blocks).
    """
    pattern = schedule.pattern
    if schedule.runtime:
        raise ValueError(RUNTIME_SELECTOR_ERROR)
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise ValueError(f"batch must be a positive int or None, got {batch!r}")
    if mask_mod is None:
        missing = [d.name for d in pattern.inputs if d.name not in (inputs or {})]
        if missing:
            raise ValueError(f"pattern '{pattern.name}' reads runtime input(s) "
                             f"{', '.join(missing)}: pass inputs={{...}} to build its mask_mod")
        mask_mod = to_mask_mod(pattern, inputs or {}, q_len=schedule.q_len,
                               kv_len=schedule.kv_len, heads=schedule.heads)
    flat = flat_schedule(schedule, block_size)
    n_q, n_kv = flat.n_q_tiles, flat.n_kv_tiles
    which = torch.tensor(flat.head_class, dtype=torch.int64)          # [H]

    def lists(attr: str, n_cols: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(num_blocks [B', H, rows], indices [B', H, rows, n_cols]) of one CSR kind."""
        per_class = [csr_to_padded(getattr(c, attr), n_cols) for c in flat.classes]
        out = []
        for k in (0, 1):
            t = torch.stack([pc[k] for pc in per_class])[which].unsqueeze(0)  # [1, H, ...]
            if batch is not None:
                t = t.expand(batch, *t.shape[1:])
            out.append(t.contiguous().to(device) if device is not None else t.contiguous())
        return out[0], out[1]

    from torch.nn.attention.flex_attention import BlockMask
    # The transposed (by key block) lists come from the schedule's own transposed CSR, so
    # nothing here is O(nQ · nKV) beyond the padded index tensors FlexAttention expects.
    return BlockMask((schedule.q_len, schedule.kv_len),
                     *lists("partial", n_kv), *lists("full", n_kv),
                     *lists("partial_t", n_q), *lists("full_t", n_q),
                     BLOCK_SIZE=(block_size, block_size), mask_mod=mask_mod)


_BLOCK_TENSORS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                  "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")


def with_mask_mod(block_mask, mask_mod: Callable):
    """A BlockMask sharing `block_mask`'s block tensors, with `mask_mod` attached instead
    (O(1): lets a cached block structure serve calls whose mask_mod captures new inputs)."""
    from torch.nn.attention.flex_attention import BlockMask
    extra = {name: getattr(block_mask, name) for name in
             ("dq_write_order", "dq_write_order_full", "dq_kv_order", "dq_kv_order_spt")
             if hasattr(block_mask, name)}
    return BlockMask(block_mask.seq_lengths,
                     *(getattr(block_mask, name) for name in _BLOCK_TENSORS),
                     BLOCK_SIZE=block_mask.BLOCK_SIZE, mask_mod=mask_mod, **extra)
