"""Tiles of segmented and separate query/key layouts: each token run gets 1-D tiles and the grid
its own boxes (schedule/segment_tiles.py, passes/segment_blocks.py). Tile classes against the
dense mask (sound and tight, hypothesis over segment sizes and boxes), the part structure, the
cost model's choice, and every backend (Triton interpreter, torch, dense, flex, decode,
gradients) against the float64 reference."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import attncc
from attncc.helpers import hilo_kv
from attncc.options import CompileOptions
from attncc.passes.tilegrid import SegmentedGrid, TileClass
from attncc.schedule.build import build_schedule
from attncc.schedule.tileshape import box_candidates


def dense_classes(p, sched, head=0):
    """Exact class of every tile pair from the dense mask: FULL iff every real pair is kept,
    EMPTY iff none, else PARTIAL."""
    m = p.dense_mask(sched.q_len, sched.kv_len, heads=sched.heads)[0, head]
    qt, kt = sched.q_grid.token_index(), sched.kv_grid.token_index()
    out = torch.zeros(qt.shape[0], kt.shape[0], dtype=torch.int8)
    for i in range(qt.shape[0]):
        rows = m[qt[i][qt[i] >= 0]]
        for j in range(kt.shape[0]):
            sub = rows[:, kt[j][kt[j] >= 0]]
            out[i, j] = TileClass.FULL if sub.all() else TileClass.PARTIAL if sub.any() \
                else TileClass.EMPTY
    return out, int(m.sum())


def seg_spec(pre, shape, post, kernel):
    axes = ", ".join(f"{a} = {n}" for a, n in zip("tyx"[-len(shape):], shape))
    lines = ["pattern seg"]
    if pre:
        lines.append(f"layout tokens(text = {pre})")
    lines.append(f"layout grid({axes})")
    if post:
        lines.append(f"layout tokens(tail = {post})")
    cond = [f"q.{s} | k.{s}" for s, n in (("text", pre), ("tail", post)) if n]
    lines.append("mask " + " | ".join(cond + [f"neighborhood({kernel})"]))
    return "\n".join(lines) + "\n"


@settings(max_examples=25, deadline=None)
@given(pre=st.integers(0, 5), post=st.integers(0, 3),
       shape=st.sampled_from([(3, 5), (4, 4), (6, 7), (2, 3, 4), (3, 4, 4)]),
       kernel=st.sampled_from([1, 2, 3]), pick=st.integers(0, 50))
def test_part_tiles_are_sound_tight_and_lie_in_one_part(pre, post, shape, kernel, pick):
    if (pre == 0 and post == 0) or kernel > min(shape):
        return
    p = attncc.parse(seg_spec(pre, shape, post, kernel))
    cands = box_candidates(shape, 16)
    box = cands[pick % len(cands)]
    s = build_schedule(p, options=CompileOptions(block_m=16, block_n=16, q_tile=box,
                                                 kv_tile=box))
    assert isinstance(s.q_grid, SegmentedGrid)
    want, kept = dense_classes(p, s)
    assert torch.equal(s.tile_matrix(0), want)
    assert s.stats["kept_pairs"] == kept
    # Every tile holds tokens of one part only.
    n = math.prod(shape)
    part = torch.tensor([0] * pre + [1] * n + [2] * post)
    tok = s.q_grid.token_index()
    for row in tok:
        assert part[row[row >= 0]].unique().numel() == 1


@settings(max_examples=15, deadline=None)
@given(Q=st.tuples(st.integers(2, 8), st.integers(2, 8)),
       K=st.tuples(st.integers(2, 6), st.integers(2, 6)), extra=st.integers(0, 5),
       kernel=st.integers(1, 2))
def test_separate_grids_and_key_tokens_are_sound_and_tight(Q, K, extra, kernel):
    text = (f"pattern two\nlayout q_grid(y = {Q[0]}, x = {Q[1]})\n"
            f"layout k_grid(y = {K[0]}, x = {K[1]})\n"
            + (f"layout k_tokens(extra = {extra})\nmask k.extra | neighborhood({kernel})\n"
               if extra else f"mask neighborhood({kernel})\n"))
    p = attncc.parse(text)
    s = build_schedule(p, options=CompileOptions(block_m=16, block_n=16))
    want, kept = dense_classes(p, s)
    assert torch.equal(s.tile_matrix(0), want)
    assert s.stats["kept_pairs"] == kept


def test_mmdit_at_16461_tokens_is_tiled_by_parts_without_the_flat_fallback():
    p = attncc.load("specs/mmdit_natten.attn")
    s = build_schedule(p)
    assert isinstance(s.q_grid, SegmentedGrid) and s.q_len == 77 + 16 * 32 * 32
    assert [g.tile for g in s.q_grid.parts] == [(64,), (1, 2, 32)]   # the cost model's box
    assert s.q_grid.tile_offsets == (0, 2, 258)
    # Only the NATTEN axes' own band tiles fall back to exact evaluation (per axis).
    assert s.stats["fallback_tiles"] < 100
    flat = build_schedule(p, options=CompileOptions(tile_1d=True))
    assert s.stats["kept_pairs"] == flat.stats["kept_pairs"]
    assert s.efficiency() > flat.efficiency()
    assert s.stats["candidates"][("1×8×8", "1×8×8")] > s.stats["computed_pairs"]


def test_boxes_win_on_a_large_neighborhood_beside_text_tokens():
    p = attncc.parse("pattern wide(kernel = 13)\nlayout tokens(text = 16)\n"
                     "layout grid(y = 64, x = 64)\nmask q.text | k.text | neighborhood(kernel)\n")
    s = build_schedule(p, options=CompileOptions(block_m=64, block_n=64))
    flat = build_schedule(p, options=CompileOptions(block_m=64, block_n=64, tile_1d=True))
    assert s.q_grid.parts[1].tile == (8, 8)
    assert s.efficiency() > 1.5 * flat.efficiency()


def test_a_few_tokens_beside_a_small_grid_keep_flat_tiles():
    # 5 extra tokens would fill a whole 64-slot tile: plain 1-D tiles are cheaper here.
    p = attncc.load("specs/vit_cls_natten.attn")
    s = build_schedule(p)
    assert s.q_grid.tile == (64,) and s.stats["candidates"][("flat", "flat")] \
        < s.stats["candidates"][("64", "64")]


# ---- kernels -------------------------------------------------------------------------------

MMDIT = dict(text=5, frames=3, height=4, width=4, kernel_t=3, kernel=3)
TILES = [dict(), dict(q_tile=(1, 4, 4), kv_tile=(1, 4, 4)), dict(q_tile=(2, 2, 4), kv_tile=(4, 2, 2)),
         dict(tile_1d=True)]


def _qkv(lq, lkv, heads=2, d=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, lq, d, generator=g).to(dtype)
    k, v = (torch.randn(1, heads, lkv, d, generator=g).to(dtype) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("tiles", TILES, ids=["chosen", "1x4x4", "2x2x4/4x2x2", "1-D"])
@pytest.mark.parametrize("backend", ["interpret", "torch"])
def test_mmdit_kernels_match_the_reference(backend, tiles):
    p = attncc.load("specs/mmdit_natten.attn", **MMDIT)
    q, k, v = _qkv(53, 53)
    ref = attncc.reference(p, q, k, v)
    kern = attncc.compile(p, backend=backend, block_m=16, block_n=16, **tiles)
    out, lse = kern(q, k, v, return_lse=True)
    assert (out.double() - ref).abs().max() < 1e-4
    ref_lse = attncc.reference(p, q, k, v, return_lse=True)[1]
    assert (lse.double() - ref_lse).abs().max() < 1e-4


@pytest.mark.parametrize("backend", ["dense", "flex", "reference"])
def test_mmdit_other_backends_match_the_reference(backend):
    p = attncc.load("specs/mmdit_natten.attn", **MMDIT)
    q, k, v = _qkv(53, 53)
    out = attncc.compile(p, backend=backend)(q, k, v)
    assert (out.double() - attncc.reference(p, q, k, v)).abs().max() < 1e-4


def test_generated_forward_has_one_key_loop_per_part():
    p = attncc.load("specs/mmdit_natten.attn", **MMDIT)
    kern = attncc.compile(p, backend="interpret", block_m=16, block_n=16, q_tile=(1, 4, 4),
                          kv_tile=(1, 4, 4))
    src = kern.source
    assert "one loop per key part" in src
    # FULL and PARTIAL: a loop for the text tiles and one for the grid boxes each.
    assert src.count("for it in range(lo_full, at_full1):") == 1
    assert src.count("for it in range(at_full1, hi_full):") == 1
    assert src.count("for it in range(at_partial1, hi_partial):") == 1


def _grads(p, backend, tiles, q, k, v):
    q, k, v = (t.clone().requires_grad_(True) for t in (q, k, v))
    out = attncc.compile(p, backend=backend, block_m=16, block_n=16, **tiles)(q, k, v)
    g = torch.Generator().manual_seed(7)
    dout = torch.randn(out.shape, generator=g)
    got = torch.autograd.grad(out, (q, k, v), dout)
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    want = torch.autograd.grad(attncc.reference(p, *leaves), leaves, dout.double())
    return got, want


@pytest.mark.parametrize("backend, tiles", [("interpret", dict(q_tile=(1, 4, 4), kv_tile=(2, 2, 4))),
                                            ("interpret", dict()), ("torch", dict())])
def test_mmdit_gradients_match_the_reference(backend, tiles):
    p = attncc.load("specs/mmdit_natten.attn", **MMDIT)
    got, want = _grads(p, backend, tiles, *_qkv(53, 53))
    for g, w in zip(got, want):
        assert (g.double() - w).abs().max() / max(1.0, w.abs().max()) < 2e-5


def test_hilo_kernels_and_gradients_match_the_reference():
    p = attncc.load("specs/hilo.attn", height=8, width=8, pool=2, hifi_heads=1, heads=2)
    q, k, v = _qkv(64, 64)
    k2, v2 = hilo_kv(k, v, height=8, width=8, pool=2)
    ref = attncc.reference(p, q, k2, v2)
    for backend, tiles in (("interpret", dict(q_tile=(4, 4), kv_tile=(4, 4))),
                           ("interpret", dict()), ("torch", dict()), ("flex", dict()),
                           ("dense", dict())):
        out = attncc.compile(p, backend=backend, block_m=16, block_n=16, **tiles)(q, k2, v2)
        assert (out.double() - ref).abs().max() < 1e-4, (backend, tiles)
    got, want = _grads(p, "interpret", dict(q_tile=(4, 4), kv_tile=(4, 4)), q, k2, v2)
    for g, w in zip(got, want):
        assert (g.double() - w).abs().max() / max(1.0, w.abs().max()) < 2e-5


def test_decode_of_a_segmented_layout_is_the_last_rows_of_the_whole_sequence():
    p = attncc.load("specs/vit_cls_natten.attn", registers=2, height=4, width=4, kernel=3)
    n = 1 + 2 + 16
    q, k, v = _qkv(n, n)
    ref = attncc.reference(p, q, k, v)
    lens = torch.tensor([n], dtype=torch.int32)
    for backend in ("torch", "interpret", "reference"):
        kern = attncc.compile(p, backend=backend)
        out = kern.decode(q[:, :, -3:], k, v, lens)
        assert (out.double() - ref[:, :, -3:]).abs().max() < 1e-4, backend


def test_decode_refuses_separate_query_and_key_layouts():
    p = attncc.load("specs/hilo.attn", height=4, width=4, pool=2, hifi_heads=1, heads=2)
    kern = attncc.compile(p, backend="torch")
    q, k, v = _qkv(16, 20)
    from attncc.runtime.decode import DecodeError
    with pytest.raises(DecodeError, match="separate query and key layouts"):
        kern.decode(q[:, :, -1:], k, v, torch.tensor([20], dtype=torch.int32))


SEG = "pattern x\nlayout tokens(t = 5)\nlayout grid(y = 4, x = 4)\n"
RUNTIME_CASES = {
    "document ids": (SEG + "input doc: int[b, k]\n"
                     "mask (q.t | k.t | neighborhood(3)) & doc[b, q] == doc[b, k]\n", 21, 21,
                     lambda g: {"doc": torch.tensor([[0] * 8 + [1] * 13, [0] * 21])}),
    "output scale": (SEG + "input w: float[b, q, h]\nmask q.t | k.t | neighborhood(3)\n"
                     "output scale w[b, q, h]\n", 21, 21,
                     lambda g: {"w": torch.rand(2, 21, 2, generator=g)}),
    "blocks": (SEG + "input gate: float[b, h, q_blocks, k_blocks]\n"
               "mask blocks(gate, block = 8, top = 0.5) & (q.t | k.t | neighborhood(3))\n", 21, 21,
               lambda g: {"gate": torch.randn(2, 2, 3, 3, generator=g)}),
    "query tokens over a key grid": (
        "pattern y\nlayout q_tokens(c = 3)\nlayout q_grid(y = 4, x = 4)\n"
        "layout k_grid(y = 2, x = 2)\nmask q.c | neighborhood(1)\n", 19, 4, None),
    "grids of different rank": (
        "pattern z\nlayout q_grid(t = 2, y = 4, x = 4)\nlayout k_grid(y = 4, x = 4)\n"
        "mask abs(q.y - k.y) + abs(q.x - k.x) <= q.t + 1\n", 32, 16, None),
}


@pytest.mark.parametrize("backend", ["interpret", "torch", "dense", "flex"])
@pytest.mark.parametrize("case", list(RUNTIME_CASES))
def test_runtime_inputs_and_mixed_sides_match_the_reference(case, backend):
    text, lq, lkv, make = RUNTIME_CASES[case]
    p = attncc.parse(text)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 2, lq, 16, generator=g)
    k, v = (torch.randn(2, 2, lkv, 16, generator=g) for _ in range(2))
    inputs = make(g) if make else {}
    tiles = dict(q_tile=(4, 4), kv_tile=(4, 4)) if text.startswith(SEG) else {}
    out = attncc.compile(p, backend=backend, block_m=16, block_n=16, **tiles)(q, k, v, **inputs)
    assert (out.double() - attncc.reference(p, q, k, v, **inputs)).abs().max() < 1e-4


def test_separate_grids_get_their_own_boxes():
    # 64×64 queries over 32×32 keys: 8×8 query boxes see a 7×7 window around cells of an
    # 8×8 key box; 1-D rows (the flat tiling) compute 31% more pairs.
    p = attncc.parse("pattern pooled\nlayout q_grid(y = 64, x = 64)\nlayout k_grid(y = 32, x = 32)\n"
                     "mask neighborhood(7)\n")
    s = build_schedule(p)
    assert (s.q_grid.tile, s.kv_grid.tile) == ((8, 8), (8, 8))
    flat = build_schedule(p, options=CompileOptions(tile_1d=True))
    assert s.stats["kept_pairs"] == flat.stats["kept_pairs"]
    assert s.stats["computed_pairs"] * 1.3 < flat.stats["computed_pairs"]
