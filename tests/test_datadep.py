"""Data-dependent patterns end to end: the block-sparse forward equals `attncc.reference`.

`attncc.reference` evaluates route / blocks / document masks densely with its own selection
code (`attncc.ir.dense`), so these tests compare two independent implementations. Sizes are
small (a few tiles) to keep the suite fast.
"""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attncc
from attncc.helpers import document_ids, moh_weights
from attncc.ir.inputs import InputError
from attncc.runtime.blocksparse import blocksparse_attention
from attncc.runtime.prepass import PrepassError

ATOL = 2e-5


def check(p, q, k, v, inputs, skipped=None, **kw):
    """Compare with the reference; `skipped` bool [B, H, Lq] marks rows of skipped
    (batch, head, query tile) triples, whose lse is -inf by contract."""
    out, lse, stats = blocksparse_attention(p, q, k, v, inputs, **kw)
    ref, ref_lse = attncc.reference(p, q, k, v, return_lse=True, **inputs)
    torch.testing.assert_close(out.double(), ref, atol=ATOL, rtol=1e-4)
    if skipped is not None:
        assert torch.isneginf(lse[skipped]).all()
        ref_lse = ref_lse.masked_fill(skipped, -math.inf)
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), fin)
    torch.testing.assert_close(lse.double()[fin], ref_lse[fin], atol=ATOL, rtol=1e-4)
    return out, lse, stats


def qkv(seed, B, H, ratio, Lq, Lkv, D=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H * ratio, Lq, D, generator=g).to(dtype)
    k = torch.randn(B, H, Lkv, D, generator=g).to(dtype)
    v = torch.randn(B, H, Lkv, D, generator=g).to(dtype)
    return q, k, v, g


@given(st.integers(1, 2), st.integers(1, 2), st.integers(1, 2), st.integers(1, 50),
       st.integers(0, 20), st.sampled_from([8, 16]), st.floats(0.05, 0.9),
       st.sampled_from([16, 32]), st.integers(0, 9999))
def test_seer_gate_matches_reference(B, H, ratio, Lq, extra, block, keep, tile, seed):
    p = attncc.load("specs/seer_gate.attn", block=block, keep=keep)
    Lkv = Lq + extra
    q, k, v, g = qkv(seed, B, H, ratio, Lq, Lkv)
    gate = torch.randn(B, H * ratio, -(-Lq // block), -(-Lkv // block), generator=g)
    check(p, q, k, v, {"gate": gate}, q_tile=tile, kv_tile=16)


def test_blocks_threshold_and_fully_masked_rows_give_zero():
    p = attncc.parse("pattern t(block = 8)\ninput gate: float[b, h, q_blocks, k_blocks]\n"
                     "mask causal & blocks(gate, block = block, threshold = 0.5)")
    q, k, v, g = qkv(1, 2, 2, 1, 40, 40)
    gate = torch.randn(2, 2, 5, 5, generator=g)
    gate[0, 1, 2] = -1.0                     # query block 2 of (b0, h1) keeps nothing
    out, lse, stats = check(p, q, k, v, {"gate": gate}, q_tile=16, kv_tile=16)
    assert out[0, 1, 16:24].eq(0).all() and torch.isneginf(lse[0, 1, 16:24]).all()


@st.composite
def biformer_cases(draw):
    h, w = draw(st.integers(2, 9)), draw(st.integers(2, 9))
    region = draw(st.integers(1, 4))
    topk = draw(st.integers(1, 4))
    tiles = draw(st.sampled_from([16, (4, 4), (2, 8), (1, 16)]))
    return h, w, region, topk, tiles, draw(st.integers(1, 2)), draw(st.integers(0, 9999))


@given(biformer_cases())
def test_biformer_matches_reference(case):
    h, w, region, topk, tiles, ratio, seed = case
    p = attncc.load("specs/biformer.attn", height=h, width=w, region=region, topk=topk)
    q, k, v, _ = qkv(seed, 1, 2, ratio, h * w, h * w)
    out, _, stats = check(p, q, k, v, {}, q_tile=tiles, kv_tile=tiles)
    # Never more visited (b, h, query tile, key tile) quadruples than key tiles exist.
    n_kv = math.ceil(h * w / tiles) if isinstance(tiles, int) else \
        math.ceil(h / tiles[0]) * math.ceil(w / tiles[1])
    assert stats.full_tiles + stats.partial_tiles <= stats.head_tiles * n_kv


def test_biformer_region_aligned_tiles_are_full_and_sparse():
    # 8x8 map, 4x4 regions, 4x4 tiles: every tile is one region, so kept tiles are FULL and
    # exactly topk of the 4 key tiles are visited per query tile.
    p = attncc.load("specs/biformer.attn", height=8, width=8, region=4, topk=2)
    q, k, v, _ = qkv(5, 2, 2, 1, 64, 64)
    _, _, stats = check(p, q, k, v, {}, q_tile=(4, 4), kv_tile=(4, 4))
    assert stats.partial_tiles == 0 and stats.full_tiles == 2 * 2 * 4 * 2


@given(st.integers(1, 2), st.integers(2, 4), st.integers(1, 60), st.integers(0, 3),
       st.booleans(), st.integers(0, 9999))
def test_moh_skips_zero_weight_head_tiles(B, H, L, topk, zero_tile, seed):
    p = attncc.load("specs/moh.attn")
    q, k, v, g = qkv(seed, B, H, 1, L, L)
    w = moh_weights(torch.randn(B, L, H, generator=g), topk=min(topk, H))
    if zero_tile:
        w[:, :16, 0] = 0                     # head 0 of query tile 0 is skipped everywhere
    nqt = -(-L // 16)
    padded = torch.zeros(B, nqt * 16, H)
    padded[:, :L] = w
    dead = padded.view(B, nqt, 16, H).eq(0).all(2)          # [B, nQT, H]
    skipped = dead.permute(0, 2, 1).repeat_interleave(16, -1)[..., :L]
    out, _, stats = check(p, q, k, v, {"weight": w}, skipped, q_tile=16, kv_tile=16)
    assert stats.skipped_head_tiles == int(dead.sum())
    assert stats.head_tiles == B * H * nqt
    for b, t, h in dead.nonzero().tolist():
        assert out[b, h, t * 16:(t + 1) * 16].eq(0).all()


def test_moh_all_zero_weights_visit_nothing():
    p = attncc.load("specs/moh.attn")
    q, k, v, _ = qkv(2, 1, 2, 1, 32, 32)
    out, lse, stats = blocksparse_attention(p, q, k, v, {"weight": torch.zeros(1, 32, 2)},
                                            q_tile=16, kv_tile=16)
    assert stats.skipped_head_tiles == 4 and stats.full_tiles + stats.partial_tiles == 0
    assert out.eq(0).all() and torch.isneginf(lse).all()


@given(st.lists(st.lists(st.integers(0, 20), min_size=1, max_size=4), min_size=1, max_size=2),
       st.integers(0, 6), st.sampled_from([8, 16]), st.integers(0, 9999))
def test_document_matches_reference_and_visits_no_cross_document_tile(lengths, pad, tile, seed):
    p = attncc.load("specs/document.attn")
    B = len(lengths)
    L = max(1, max(sum(r) for r in lengths) + pad)
    doc = document_ids(lengths, L)
    q, k, v, _ = qkv(seed, B, 2, 1, L, L)
    check(p, q, k, v, {"doc": doc}, q_tile=tile, kv_tile=tile)
    # No visited tile mixes only tokens of different documents.
    from attncc.runtime.conjuncts import pattern_classes
    from attncc.schedule.schedule import TileGrid
    grid = TileGrid((L,), (tile,))
    cls, _ = pattern_classes(p, q, k, {"doc": doc}, grid, grid)
    slots = grid.token_index()
    for b, h, i, j in (cls > 0).nonzero().tolist():
        qi, kj = slots[i][slots[i] >= 0], slots[j][slots[j] >= 0]
        assert (doc[b, qi][:, None] == doc[b, kj][None, :]).any()


def test_document_padding_needs_a_guard_to_attend_nothing():
    text = "pattern d\ninput doc: int[b, k]\nmask causal & doc[b, q] == doc[b, k] & doc[b, q] >= 0"
    p = attncc.parse(text)
    doc = document_ids([[5, 6]], 16)
    q, k, v, _ = qkv(3, 1, 1, 1, 16, 16)
    out, lse, _ = check(p, q, k, v, {"doc": doc}, q_tile=8, kv_tile=8)
    assert out[0, :, 11:].eq(0).all() and torch.isneginf(lse[0, :, 11:]).all()


def test_static_and_score_modifier_through_the_cpu_path():
    p = attncc.load("specs/softcap.attn")
    q, k, v, _ = qkv(4, 1, 2, 2, 37, 45)
    check(p, q, k, v, {}, q_tile=16, kv_tile=16)


def test_half_precision_inputs():
    p = attncc.load("specs/seer_gate.attn", block=16, keep=0.5)
    q, k, v, g = qkv(6, 1, 2, 1, 48, 48, dtype=torch.float16)
    gate = torch.randn(1, 2, 3, 3, generator=g)
    out, _, _ = blocksparse_attention(p, q, k, v, {"gate": gate}, q_tile=16, kv_tile=16)
    assert out.dtype == torch.float16
    ref = attncc.reference(p, q, k, v, gate=gate)
    torch.testing.assert_close(out.double(), ref, atol=2e-3, rtol=2e-3)


# ---- bad runtime inputs ------------------------------------------------------------------

def test_bad_gate_shape_names_the_input():
    p = attncc.load("specs/seer_gate.attn", block=16, keep=0.5)
    q, k, v, _ = qkv(0, 1, 2, 1, 48, 48)
    with pytest.raises(InputError, match=r"^input 'gate' has shape \[1, 2, 3, 2\], expected "
                                         r"float\[b, h, q_blocks, k_blocks\] = \[1, 2, 3, 3\]$"):
        blocksparse_attention(p, q, k, v, {"gate": torch.zeros(1, 2, 3, 2)})


def test_nan_gate_is_rejected():
    p = attncc.load("specs/seer_gate.attn", block=16, keep=0.5)
    q, k, v, _ = qkv(0, 1, 2, 1, 48, 48)
    gate = torch.zeros(1, 2, 3, 3)
    gate[0, 0, 0, 0] = math.nan
    with pytest.raises(PrepassError, match="^input 'gate' contains NaN$"):
        blocksparse_attention(p, q, k, v, {"gate": gate})


def test_wrong_dtype_and_missing_inputs():
    p = attncc.load("specs/document.attn")
    q, k, v, _ = qkv(0, 1, 1, 1, 8, 8)
    with pytest.raises(InputError, match=r"^input 'doc' has dtype float32, expected an integer "
                                         r"tensor: int\[b, k\] = \[1, 8\]$"):
        blocksparse_attention(p, q, k, v, {"doc": torch.zeros(1, 8)})
    with pytest.raises(InputError, match=r"^missing input 'doc': expected int\[b, k\] = \[1, 8\]$"):
        blocksparse_attention(p, q, k, v, {})


def test_grid_length_mismatch():
    p = attncc.load("specs/biformer.attn", height=4, width=4, region=2, topk=1)
    q, k, v, _ = qkv(0, 1, 1, 1, 15, 15)
    with pytest.raises(InputError, match=r"has layout grid\(y = 4, x = 4\) \(16 tokens\) but Lq=15, Lkv=15"):
        blocksparse_attention(p, q, k, v, {})


# ---- the generated kernel with pre-pass lists (Triton interpreter on CPU) ------------------

def _kernel_check(p, q, k, v, inputs, skipped=None):
    kern = attncc.compile(p, backend="interpret", block_m=16, block_n=16)
    out, lse = kern(q, k, v, return_lse=True, **inputs)
    ref, ref_lse = attncc.reference(p, q, k, v, return_lse=True, **inputs)
    torch.testing.assert_close(out.double(), ref, atol=ATOL, rtol=1e-4)
    if skipped is not None:
        ref_lse = ref_lse.masked_fill(skipped, -math.inf)
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), fin)
    torch.testing.assert_close(lse.double()[fin], ref_lse[fin], atol=ATOL, rtol=1e-4)
    return kern.last_stats


@settings(max_examples=10)
@given(st.integers(1, 2), st.integers(1, 40), st.integers(0, 9), st.sampled_from([8, 16]),
       st.floats(0.1, 0.9), st.integers(0, 9999))
def test_kernel_seer_gate_matches_reference(B, Lq, extra, block, keep, seed):
    p = attncc.load("specs/seer_gate.attn", block=block, keep=keep)
    q, k, v, g = qkv(seed, B, 1, 2, Lq, Lq + extra, D=16)
    gate = torch.randn(B, 2, -(-Lq // block), -(-(Lq + extra) // block), generator=g)
    stats = _kernel_check(p, q, k, v, {"gate": gate})
    assert stats["head_tiles"] == B * 2 * -(-Lq // 16)


@settings(max_examples=10)
@given(st.integers(2, 6), st.integers(2, 6), st.integers(1, 3), st.integers(1, 3),
       st.integers(0, 9999))
def test_kernel_biformer_matches_reference(hgt, wid, region, topk, seed):
    p = attncc.load("specs/biformer.attn", height=hgt, width=wid, region=region, topk=topk)
    q, k, v, _ = qkv(seed, 1, 1, 2, hgt * wid, hgt * wid, D=16)
    _kernel_check(p, q, k, v, {})


def test_kernel_moh_skips_zero_weight_tiles():
    p = attncc.load("specs/moh.attn")
    q, k, v, g = qkv(8, 2, 3, 1, 40, 40, D=16)
    w = moh_weights(torch.randn(2, 40, 3, generator=g), topk=1)
    w[0, :16, :] = 0                              # batch 0, query tile 0: every head skipped
    w[1, 32:, 2] = 0                              # batch 1, last query tile, head 2
    tiles = torch.zeros(2, 48, 3)
    tiles[:, :40] = w
    dead = tiles.view(2, 3, 16, 3).eq(0).all(2)   # [B, nQT, H]
    skipped = dead.permute(0, 2, 1).repeat_interleave(16, -1)[..., :40]
    stats = _kernel_check(p, q, k, v, {"weight": w}, skipped)
    assert stats["skipped_head_tiles"] == int(dead.sum()) >= 4
    assert stats["head_tiles"] == 2 * 3 * 3
    assert dead[0, 0].all() and dead[1, 2, 2]


@settings(max_examples=10)
@given(st.lists(st.lists(st.integers(0, 20), min_size=1, max_size=3), min_size=1, max_size=2),
       st.integers(0, 9999))
def test_kernel_document_matches_reference(lengths, seed):
    p = attncc.load("specs/document.attn")
    L = max(1, max(sum(r) for r in lengths))
    doc = document_ids(lengths, L)
    q, k, v, _ = qkv(seed, len(lengths), 2, 1, L, L, D=16)
    _kernel_check(p, q, k, v, {"doc": doc})


def test_kernel_biformer_region_aligned_tiles():
    # 8x8 map, 4x4 regions → 4x4 tiles (one region each): kept tiles are FULL, topk per row.
    p = attncc.load("specs/biformer.attn", height=8, width=8, region=4, topk=2)
    q, k, v, _ = qkv(3, 1, 2, 1, 64, 64, D=16)
    stats = _kernel_check(p, q, k, v, {})
    assert stats["partial_tiles"] == 0 and stats["full_tiles"] == 2 * 4 * 2


def test_kernel_bad_runtime_inputs():
    kern = attncc.compile("specs/seer_gate.attn", params={"block": 16, "keep": 0.5},
                          backend="interpret")
    q, k, v, _ = qkv(0, 1, 2, 1, 48, 48, D=16)
    gate = torch.zeros(1, 2, 3, 3)
    gate[0, 1, 2, 0] = math.nan
    with pytest.raises(PrepassError, match="^input 'gate' contains NaN$"):
        kern(q, k, v, gate=gate)
    with pytest.raises(InputError, match=r"^input 'gate' has shape \[1, 2, 3\], expected "):
        kern(q, k, v, gate=torch.zeros(1, 2, 3))
    with pytest.raises(InputError, match=r"^missing input 'gate': expected "):
        kern(q, k, v)
