"""`Schedule.to_block_mask()`: the FlexAttention BlockMask export.

Checked against attncc's own tile classification (block level) and against the dense mask
(element level): FlexAttention's visible set is `create_mask(mask_mod) ∧ (block PARTIAL or
FULL)`, and FULL blocks skip the mask_mod, so the export is right iff
    dense == create_mask(mask_mod) restricted to non-EMPTY blocks, and
    every FULL block is all-true in the dense mask.
"""
import math
import os
import time

import pytest
import torch
from torch.nn.attention.flex_attention import BlockMask, create_mask

import attncc
from attncc.ir.lower_torch import RUNTIME_SELECTOR_ERROR
from attncc.runtime.options import CompileOptions
from attncc.schedule.blockmask import csr_to_padded, flat_schedule, to_block_mask
from attncc.schedule.build import build_schedule
from attncc.schedule.schedule import CSR, TileClass

SPECS = os.path.join(os.path.dirname(__file__), os.pardir, "specs")
FLAT = CompileOptions(block_m=128, block_n=128, tile_1d=True)


def spec(name, **params):
    return attncc.load(os.path.join(SPECS, name + ".attn"), **params)


def padded_to_dense(num, idx, n_cols):
    """FlexAttention (num_blocks [..., nQ], indices [..., nQ, nKV]) → bool [..., nQ, n_cols],
    written independently of the exporter (a plain loop)."""
    out = torch.zeros(*num.shape, n_cols, dtype=torch.bool)
    for pos in torch.cartesian_prod(*[torch.arange(s) for s in num.shape]).view(-1, num.dim()):
        pos = tuple(pos.tolist())
        for j in idx[pos][:int(num[pos])].tolist():
            out[pos + (j,)] = True
    return out


def block_expand(blocks, lq, lkv, block=128):
    """bool [..., nQ, nKV] → bool [..., lq, lkv] (each block covers block×block tokens)."""
    return blocks.repeat_interleave(block, -2).repeat_interleave(block, -1)[..., :lq, :lkv]


CASES = {  # name -> (pattern, q_len, kv_len, heads, inputs)
    "sliding_tail": (lambda: spec("sliding_window", window=200), 700, 700, 2, {}),
    "causal_rect": (lambda: spec("causal"), 300, 650, 1, {}),
    "moa_heads": (lambda: spec("moa", sink=4, short=100, long=400, split=2), 640, 640, 4, {}),
    "natten2d": (lambda: spec("natten2d", height=24, width=30, kernel=7, dilation=2), None, None, 2, {}),
    "document": (lambda: spec("document"), 520, 520, 1,
                 {"doc": torch.repeat_interleave(torch.arange(4), torch.tensor([100, 250, 30, 140]))[None]}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_block_mask_matches_classification_and_dense(case):
    make, lq, lkv, heads, inputs = CASES[case]
    p = make()
    sched = build_schedule(p, lq, lkv, heads=heads)
    lq, lkv = sched.q_len, sched.kv_len
    bm = sched.to_block_mask(inputs=inputs)
    assert isinstance(bm, BlockMask)
    nq, nk = math.ceil(lq / 128), math.ceil(lkv / 128)
    assert bm.BLOCK_SIZE == (128, 128) and tuple(bm.seq_lengths) == (lq, lkv)
    assert bm.kv_num_blocks.shape == (1, heads, nq) and bm.kv_indices.shape == (1, heads, nq, nk)
    assert bm.kv_num_blocks.dtype == torch.int32 and bm.full_kv_indices.dtype == torch.int32

    # Block level: equal to attncc's classification with 128-token 1-D tiles.
    flat = flat_schedule(sched)
    classes = torch.stack([flat.tile_matrix(h) for h in range(heads)])[None]     # [1, H, nq, nk]
    full = padded_to_dense(bm.full_kv_num_blocks, bm.full_kv_indices, nk)
    part = padded_to_dense(bm.kv_num_blocks, bm.kv_indices, nk)
    assert torch.equal(full, classes == TileClass.FULL)
    assert torch.equal(part, classes == TileClass.PARTIAL)
    assert torch.equal(bm.to_dense().bool(), classes != TileClass.EMPTY)

    # Element level: against the dense mask.
    dense = p.dense_mask(lq, lkv, heads=heads, inputs=inputs)
    visible = block_expand(full | part, lq, lkv)
    assert torch.equal(create_mask(bm.mask_mod, 1, heads, lq, lkv) & visible, dense)
    assert not (dense & ~visible).any(), "a kept element lies in an EMPTY block"
    assert dense[block_expand(full, lq, lkv)].all(), "a FULL block has a masked element"


def test_rebuilds_with_flexattention_blocks():
    p = spec("natten2d", height=16, width=16, kernel=5)
    sched = build_schedule(p, options=CompileOptions(block_m=32, block_n=32))
    flat = flat_schedule(sched)
    assert flat is not sched and flat.q_grid.tile == (128,) and flat.q_grid.shape == (256,)
    same = build_schedule(p, options=FLAT)
    assert flat_schedule(same) is same
    bm = to_block_mask(sched, block_size=64)
    assert bm.BLOCK_SIZE == (64, 64) and bm.kv_num_blocks.shape == (1, 1, 4)


def test_batch_expansion():
    p = spec("sliding_window", window=100)
    bm = build_schedule(p, 256, 256, heads=2).to_block_mask(batch=3)
    assert bm.kv_num_blocks.shape == (3, 2, 2) and bm.full_kv_indices.shape == (3, 2, 2, 2)
    assert torch.equal(bm.kv_num_blocks[0], bm.kv_num_blocks[2])
    with pytest.raises(ValueError, match="batch must be a positive int or None, got 0"):
        to_block_mask(build_schedule(p, 256, 256), batch=0)


def test_csr_to_padded():
    csr = CSR.from_rows([[1, 3], [], [0, 1, 2, 3]])
    num, idx = csr_to_padded(csr, 4)
    assert num.tolist() == [2, 0, 4]
    assert idx.tolist() == [[1, 3, 0, 0], [0, 0, 0, 0], [0, 1, 2, 3]]
    assert num.dtype == idx.dtype == torch.int32


def test_errors():
    seer = spec("seer_gate")
    with pytest.raises(ValueError) as e:
        build_schedule(seer, 256, 256).to_block_mask()
    assert str(e.value) == RUNTIME_SELECTOR_ERROR
    with pytest.raises(ValueError) as e:
        build_schedule(spec("document"), 256, 256).to_block_mask()
    assert str(e.value) == ("pattern 'document' reads runtime input(s) doc: pass inputs={...} "
                            "to build its mask_mod")


def test_long_sequence_cost_scales_with_tiles():
    # 64K tokens: a dense [Lq, Lkv] bool would be 4 GiB; the export only touches the
    # 512 × 512 block grid (FlexAttention's own transposition is O(nQ · nKV)).
    p = spec("sliding_window", window=1024)
    sched = build_schedule(p, 65536, 65536, options=FLAT)
    t0 = time.perf_counter()
    bm = sched.to_block_mask()
    elapsed = time.perf_counter() - t0
    assert bm.kv_num_blocks.shape == (1, 1, 512)
    assert int(bm.kv_num_blocks.sum()) + int(bm.full_kv_num_blocks.sum()) == \
        sum(c.full.nnz + c.partial.nnz for c in sched.classes)
    assert elapsed < 20, f"export took {elapsed:.1f} s"


@pytest.mark.parametrize("case", ["moa_heads", "natten2d"])
def test_same_block_mask_as_from_kv_blocks(case):
    # The exporter builds the by-key-block (backward) lists from the schedule's transposed
    # CSR; FlexAttention's from_kv_blocks derives them by transposing the forward lists.
    make, lq, lkv, heads, inputs = CASES[case]
    bm = build_schedule(make(), lq, lkv, heads=heads).to_block_mask(inputs=inputs)
    ref = BlockMask.from_kv_blocks(bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks,
                                   bm.full_kv_indices, BLOCK_SIZE=bm.BLOCK_SIZE,
                                   mask_mod=bm.mask_mod, seq_lengths=bm.seq_lengths)
    for num, idx in (("q_num_blocks", "q_indices"), ("full_q_num_blocks", "full_q_indices")):
        n_got, n_ref = getattr(bm, num), getattr(ref, num)
        assert torch.equal(n_got, n_ref)
        i_got, i_ref = getattr(bm, idx), getattr(ref, idx)
        assert i_got.shape == i_ref.shape
        valid = torch.arange(i_got.shape[-1]) < n_got.unsqueeze(-1)
        assert torch.equal(i_got[valid], i_ref[valid])
