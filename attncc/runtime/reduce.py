"""Deterministic scatter-sums for gradients: same inputs, same bits, on every device.

`torch.Tensor.index_add_` is serial (in index order) on CPU but uses atomic adds on CUDA, where
the order of the additions — and so the rounding — changes from run to run. The functions here
sort the contributions stably by target and sum each target's run with `segment_reduce`
(a fixed order per target), then write every target once.
"""
from __future__ import annotations

import torch

__all__ = ["reduce_table_grad", "index_add_rows", "segment_add_rows"]


def reduce_table_grad(idx: torch.Tensor, val: torch.Tensor, numel: int) -> torch.Tensor:
    """Deterministic scatter-sum: float32 [numel] with out[i] = Σ val[idx == i] (entries with
    idx < 0 dropped), summed per index in the order of `idx` (`segment_add_rows`):
    bit-identical across runs, no atomics."""
    keep = idx >= 0
    out = torch.zeros(numel, dtype=torch.float32, device=val.device)
    return segment_add_rows(out, idx[keep], val[keep])


def segment_add_rows(acc: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """acc[index[i]] += src[i] for every row i of src [N, ...] (acc [M, ...], index int64 [N]), with
    the rows of one target summed in the order they appear (stable sort + `segment_reduce`),
    then added to acc once per target: deterministic on any device. Returns acc."""
    if index.numel() == 0:
        return acc
    sidx, order = torch.sort(index, stable=True)
    uniq, counts = torch.unique_consecutive(sidx, return_counts=True)
    acc[uniq] += torch.segment_reduce(src[order], "sum", lengths=counts, axis=0).to(acc.dtype)
    return acc


def index_add_rows(acc: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """`acc.index_add_(0, index, src)` made deterministic: the serial CPU kernel as is (it adds
    in index order), `segment_add_rows` on other devices (CUDA's index_add_ uses atomics)."""
    if acc.device.type == "cpu":
        return acc.index_add_(0, index, src)
    return segment_add_rows(acc, index, src)
