"""Gradients of float tables read in `score`, from the dQ kernel's per-tile scratch.

With TABLE_GRAD set, the generated dQ kernel (`codegen.backward`) writes, for every visited
(query tile m, key tile n) of a (batch, head) and every table read j of the score, the tile of
per-pair factors dS·∂score/∂table_j (0 at pairs the mask drops) into its own scratch slot, and
n into `tiles[slot]`. Here each pair gets its table index — the read's index expressions
evaluated by torch on the pair's (b, h, q, k) — and the contributions are summed per table
entry by a stable sort and `segment_reduce` (`runtime.reduce.reduce_table_grad`): a fixed
order, no atomics, bit-identical across runs. The kernel spends no registers or memory
traffic on indices (4 bytes per pair and read, plus 4 per visited tile).
"""
from __future__ import annotations

import functools
import math

import torch

from ..ir.lower_torch import to_index_fn
from ..passes.derive import float_loads
from .reduce import reduce_table_grad

__all__ = ["TableScratch", "reduce_chunk"]


class TableScratch:
    """Scratch of one dQ launch over `n_chunk` query tiles: `tiles` int32 [slots] (−1 = no
    tile visited), `vals[j]` float32 [slots·BLOCK_M·BLOCK_N] for each requested read j, with
    slots = B·Hq·n_chunk·max_visits ordered (b·Hq + h, m − m0, visit)."""

    def __init__(self, reads, slots: int, block_m: int, block_n: int, device):
        self.reads = tuple(reads)
        self.slots = slots
        self.tiles = torch.full((slots,), -1, dtype=torch.int32, device=device)
        self.vals = {j: torch.zeros(slots * block_m * block_n, dtype=torch.float32, device=device)
                     for j in self.reads}

    @staticmethod
    def bytes_per_slot(n_reads: int, block_m: int, block_n: int) -> int:
        """Scratch bytes per slot plus the host temporaries of `reduce_chunk` (int64 index and
        validity per pair and index dimension, about 24 bytes per pair)."""
        return 4 + n_reads * block_m * block_n * 4 + block_m * block_n * 24


@functools.lru_cache(maxsize=32)
def _token_index(grid, device: str) -> torch.Tensor:
    return grid.token_index().to(device)


def reduce_chunk(pattern, schedule, scratch: TableScratch, *, m0: int, n_chunk: int,
                 max_visits: int, heads: int, q_len: int, kv_len: int, inputs: dict,
                 table_sizes: dict) -> dict:
    """{j: float32 [numel_j]} gradient of each requested table read j from one launch's
    scratch. `pattern` is the pattern the kernel was generated from (its score's float reads,
    in `float_loads` order, are the reads j), `inputs` the tensors the kernel read,
    `table_sizes[j]` the shape of read j's table."""
    dev = scratch.tiles.device
    used = torch.nonzero(scratch.tiles >= 0).flatten()
    loads = float_loads(pattern.score)
    out = {}
    q_tok_all = _token_index(schedule.q_grid, str(dev))
    k_tok_all = _token_index(schedule.kv_grid, str(dev))
    bm, bn = q_tok_all.shape[1], k_tok_all.shape[1]
    per_bh = n_chunk * max_visits
    bh, rem = used // per_bh, used % per_bh
    b = (bh // heads).view(-1, 1, 1)
    h = (bh % heads).view(-1, 1, 1)
    q_tok = q_tok_all[rem // max_visits + m0].unsqueeze(-1)                  # [U, BM, 1]
    k_tok = k_tok_all[scratch.tiles[used].long()].unsqueeze(-2)              # [U, 1, BN]
    real = (q_tok >= 0) & (k_tok >= 0)
    q, k = q_tok.clamp(min=0), k_tok.clamp(min=0)
    for j in scratch.reads:
        sizes = table_sizes[j]
        flat = torch.zeros((), dtype=torch.int64, device=dev)
        ok = real
        for e, size in zip(loads[j].index, sizes):
            fn = to_index_fn(e, pattern, inputs, q_len=q_len, kv_len=kv_len, heads=heads)
            i = torch.as_tensor(fn(b, h, q, k), device=dev).to(torch.int64)
            ok = ok & (i >= 0) & (i < size)
            flat = flat * size + i
        flat = torch.broadcast_to(torch.where(ok, flat, -1), (used.numel(), bm, bn))
        vals = scratch.vals[j].view(scratch.slots, bm, bn)[used]
        out[j] = reduce_table_grad(flat.reshape(-1), vals.reshape(-1), math.prod(sizes))
    return out
