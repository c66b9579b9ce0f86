"""Runtime pre-pass: tile lists of route / blocks / documents equal the dense selection.

The expected tile classes are computed test-side from the dense token-level mask built with
`attncc.ir.dense.route_selection` / `select_blocks` (the independent reference selections),
per tile by brute force over the tile's token slots.
"""
import os
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from attncc.helpers import HelperError, check_document_ids, document_ids, document_offsets, moh_weights
from attncc.ir.dense import region_index, route_selection, select_blocks
from attncc.runtime.conjuncts import document_classes, pattern_classes, token_range_classes
from attncc.runtime.prepass import (EMPTY, FULL, PARTIAL, PrepassError, block_lists, block_select,
                                    lists_from_classes, route_lists, route_select, static_classes)
from attncc.schedule.schedule import TileGrid
import attncc

SPECS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "specs")


def tile_classes(mask: torch.Tensor, q_grid: TileGrid, kv_grid: TileGrid) -> torch.Tensor:
    """Brute-force classes of a dense bool mask [B, H, Lq, Lkv] → int8 [B, H, nQT, nKT]."""
    qs, ks = q_grid.token_index(), kv_grid.token_index()
    B, H = mask.shape[:2]
    out = torch.empty(B, H, qs.shape[0], ks.shape[0], dtype=torch.int8)
    for i, qrow in enumerate(qs):
        qrow = qrow[qrow >= 0]
        for j, krow in enumerate(ks):
            krow = krow[krow >= 0]
            sub = mask[:, :, qrow][:, :, :, krow].flatten(2)
            out[:, :, i, j] = torch.where(sub.all(-1), FULL, torch.where(sub.any(-1), PARTIAL, EMPTY))
    return out


def route_dense(q, k, region, topk, shape):
    sel = route_selection(q, k, region, topk, shape)
    rq = region_index(shape or (q.shape[2],), region if shape is None else _tup(region, len(shape)))
    rk = region_index(shape or (k.shape[2],), region if shape is None else _tup(region, len(shape)))
    return sel[:, :, rq][:, :, :, rk]


def _tup(r, n):
    return (r,) * n if isinstance(r, int) else tuple(r)


@st.composite
def route_cases(draw):
    two_d = draw(st.booleans())
    if two_d:
        shape = (draw(st.integers(2, 7)), draw(st.integers(2, 7)))
        region = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
        tq = (draw(st.sampled_from([1, 2, 4])), draw(st.sampled_from([2, 4])))
        tk = (draw(st.sampled_from([2, 4])), draw(st.sampled_from([1, 2, 4])))
        L = math.prod(shape)
    else:
        shape = None
        L = draw(st.integers(3, 40))
        region = draw(st.integers(1, 9))
        tq, tk = draw(st.sampled_from([4, 8, 16])), draw(st.sampled_from([4, 8, 16]))
    hkv = draw(st.integers(1, 2))
    ratio = draw(st.integers(1, 2))
    B = draw(st.integers(1, 2))
    topk = draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**16))
    return shape, L, region, topk, tq, tk, B, hkv, ratio, seed


@given(route_cases())
def test_route_lists_equal_dense_selection(case):
    shape, L, region, topk, tq, tk, B, hkv, ratio, seed = case
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, hkv * ratio, L, 4, generator=g)
    k = torch.randn(B, hkv, L, 4, generator=g)
    sel, _, _ = route_select(q, k, region, topk, shape)
    assert torch.equal(sel, route_selection(q, k, region, topk, shape))
    lists = route_lists(q, k, region, topk, shape, q_tile=tq, kv_tile=tk)
    grid_shape = shape or (L,)
    qg = TileGrid(grid_shape, tq) if isinstance(tq, tuple) else TileGrid((L,), (tq,))
    kg = TileGrid(grid_shape, tk) if isinstance(tk, tuple) else TileGrid((L,), (tk,))
    expected = tile_classes(route_dense(q, k, region, topk, shape), qg, kg)
    assert torch.equal(lists.classes(), expected)


@given(st.integers(1, 70), st.integers(1, 70), st.sampled_from([4, 8, 16]), st.sampled_from([8, 16]),
       st.sampled_from([8, 16, 32]), st.one_of(st.floats(0.01, 1.0), st.none()), st.integers(0, 999))
def test_block_lists_equal_dense_selection(lq, lkv, block, tq, tk, top, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(2, 3, -(-lq // block), -(-lkv // block), generator=g)
    kw = dict(top=top) if top is not None else dict(threshold=0.3)
    sel = select_blocks(scores, **kw)
    assert torch.equal(block_select(scores, **kw), sel)
    lists = block_lists(scores, block, **kw, q_tile=tq, kv_tile=tk, q_len=lq, kv_len=lkv)
    qb = torch.arange(lq) // block
    kb = torch.arange(lkv) // block
    dense = sel[:, :, qb][:, :, :, kb]
    assert torch.equal(lists.classes(), tile_classes(dense, TileGrid((lq,), (tq,)), TileGrid((lkv,), (tk,))))


def test_block_ties_go_to_lower_index_and_n_keep_is_exact():
    scores = torch.zeros(1, 1, 2, 10)
    scores[0, 0, 1, 7] = 1.0
    sel = block_select(scores, top=0.25)           # n_keep = ceil(2.5) = 3
    assert sel[0, 0, 0].nonzero().flatten().tolist() == [0, 1, 2]
    assert sel[0, 0, 1].nonzero().flatten().tolist() == [0, 1, 7]
    assert block_select(scores, top=0.7).sum(-1).tolist() == [[[7, 7]]]   # not 8
    assert block_select(scores, top=1e-9).sum(-1).tolist() == [[[1, 1]]]  # at least one


def test_route_ties_go_to_lower_region_index():
    # Keys constant: every key region has the same mean, so every affinity row is a tie.
    q = torch.randn(1, 2, 16, 4)
    k = torch.ones(1, 1, 16, 4)
    sel, qg, kg = route_select(q, k, 4, 2)
    assert sel.shape == (1, 2, 4, 4)
    assert sel[0, :, :, :2].all() and not sel[0, :, :, 2:].any()
    # Two identical key regions (1 and 3) beating the rest: both kept, lower first on topk=1.
    k = torch.zeros(1, 1, 16, 4)
    k[0, 0, 4:8] = 1.0
    k[0, 0, 12:16] = 1.0
    q = torch.ones(1, 1, 16, 4)
    sel, _, _ = route_select(q, k, 4, 1)
    assert sel[0, 0].nonzero()[:, 1].tolist() == [1, 1, 1, 1]


def test_route_gqa_uses_key_head_h_over_ratio():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 24, 8, generator=g)
    k = torch.randn(1, 2, 24, 8, generator=g)
    sel, _, _ = route_select(q, k, 6, 1)
    for h in range(4):
        one, _, _ = route_select(q[:, h:h + 1], k[:, h // 2:h // 2 + 1], 6, 1)
        assert torch.equal(sel[:, h:h + 1], one)


def test_static_intersection_full_only_where_static_full():
    p = attncc.parse("pattern c\nmask causal")
    qg = kg = TileGrid((64,), (16,))
    stat = static_classes(p.mask, None, qg, kg, 1, 64, 64)
    assert stat[0].tolist() == [[FULL if j < i else PARTIAL if j == i else EMPTY for j in range(4)]
                                for i in range(4)]
    scores = torch.zeros(1, 1, 4, 4)           # threshold -1 keeps everything: selector all FULL
    lists = block_lists(scores, 16, threshold=-1.0, q_tile=16, kv_tile=16, static=stat)
    assert torch.equal(lists.classes()[0, 0], stat[0])
    scores[0, 0, :, 0] = -5                      # drop key block 0 everywhere
    lists = block_lists(scores, 16, threshold=-1.0, q_tile=16, kv_tile=16, static=stat)
    want = stat[0].clone()
    want[:, 0] = EMPTY
    assert torch.equal(lists.classes()[0, 0], want)


def test_selector_tile_spanning_blocks_is_partial():
    scores = torch.tensor([[[[1.0, -1.0], [1.0, 1.0]]]])          # block 8, tiles of 16
    lists = block_lists(scores, 8, threshold=0.0, q_tile=16, kv_tile=16)
    assert lists.classes().tolist() == [[[[PARTIAL]]]]
    lists = block_lists(scores, 8, threshold=-2.0, q_tile=16, kv_tile=16)
    assert lists.classes().tolist() == [[[[FULL]]]]


@given(st.integers(0, 999))
def test_lists_round_trip_and_are_ascending(seed):
    g = torch.Generator().manual_seed(seed)
    cls = torch.randint(0, 3, (2, 3, 5, 7), generator=g).to(torch.int8)
    lists = lists_from_classes(cls)
    assert torch.equal(lists.classes(), cls)
    assert lists.full.dtype == lists.full_counts.dtype == torch.int32
    for idx, cnt, val in ((lists.full, lists.full_counts, FULL), (lists.partial, lists.partial_counts, PARTIAL)):
        for b in range(2):
            for h in range(3):
                for t in range(5):
                    n = int(cnt[b, h, t])
                    assert idx[b, h, t, :n].tolist() == (cls[b, h, t] == val).nonzero().flatten().tolist()
                    assert idx[b, h, t, n:].eq(0).all()


@given(st.lists(st.lists(st.integers(0, 9), min_size=1, max_size=4), min_size=1, max_size=3),
       st.sampled_from([4, 8]), st.sampled_from([4, 8, 16]))
def test_document_classes_match_dense(lengths, tq, tk):
    L = max(sum(r) for r in lengths) + 3
    doc = document_ids(lengths, L)
    qg, kg = TileGrid((L,), (tq,)), TileGrid((L,), (tk,))
    dense = (doc[:, :, None] == doc[:, None, :])[:, None]
    assert torch.equal(document_classes(doc, qg, kg), tile_classes(dense, qg, kg))


@given(st.lists(st.lists(st.integers(0, 9), min_size=1, max_size=4), min_size=1, max_size=3),
       st.integers(0, 5), st.sampled_from([4, 8]), st.sampled_from([4, 8, 16]))
def test_document_spec_classes_are_tight_with_padding(lengths, pad, tq, tk):
    """The library document spec (causal, same document, padding ids < 0 excluded): the
    pre-pass classes equal the brute-force classes of the dense mask, so tiles inside one
    document are FULL and padding tiles are EMPTY."""
    L = max(sum(r) for r in lengths) + pad + 1
    doc = document_ids(lengths, L)
    p = attncc.load(os.path.join(SPECS, "document.attn"))
    q = torch.zeros(doc.shape[0], 1, L, 4)
    qg, kg = TileGrid((L,), (tq,)), TileGrid((L,), (tk,))
    cls, _ = pattern_classes(p, q, q, {"doc": doc}, qg, kg)
    dense = p.dense_mask(L, L, batch=doc.shape[0], inputs={"doc": doc})
    assert torch.equal(cls, tile_classes(dense, qg, kg))


@pytest.mark.parametrize("op, c, want", [
    ("ge", 0, [FULL, PARTIAL, EMPTY]), ("lt", 0, [EMPTY, PARTIAL, FULL]),
    ("eq", 1, [PARTIAL, PARTIAL, EMPTY])  # sound between the ends of a range, ("ne", -1, [FULL, PARTIAL, EMPTY]),
])
def test_token_range_classes(op, c, want):
    values = torch.tensor([[0, 1, 2, 2, -1, 3, -1, -1, -1]])
    got = token_range_classes(values, TileGrid((9,), (3,)), op, c)
    assert got.tolist() == [want]


def test_route_bad_arguments():
    q = torch.randn(1, 2, 16, 4)
    with pytest.raises(PrepassError, match=r"route: topk must be a positive int, got 0"):
        route_select(q, q, 4, 0)
    with pytest.raises(PrepassError, match=r"route: layout \(3, 4\) does not match Lq=16, Lkv=16"):
        route_select(q, q, 2, 1, (3, 4))
    with pytest.raises(PrepassError, match=r"route region \(2, 2, 2\) does not fit a 2-D token grid"):
        route_select(q, q, (2, 2, 2), 1, (4, 4))


def test_block_bad_arguments():
    with pytest.raises(PrepassError, match="^scores contains NaN$"):
        block_select(torch.tensor([[[[0.0, math.nan]]]]), top=0.5)
    with pytest.raises(PrepassError, match=r"scores must be a 4-D tensor \[batch, heads, q_blocks, k_blocks\], got \[2, 2\]"):
        block_select(torch.zeros(2, 2), top=0.5)
    with pytest.raises(PrepassError, match="^scores must be a floating-point tensor, got torch.int64$"):
        block_select(torch.zeros(1, 1, 2, 2, dtype=torch.long), top=0.5)
    with pytest.raises(PrepassError, match=r"scores \[1, 1, 2, 2\] do not match q_len=40, kv_len=32 with block=16"):
        block_lists(torch.zeros(1, 1, 2, 2), 16, top=0.5, q_tile=16, kv_tile=16, q_len=40, kv_len=32)


# ---- helpers ---------------------------------------------------------------------------

def test_moh_weights_formula():
    logits = torch.tensor([[[0.3, 1.0, 2.0, 2.0, -1.0, 0.5]]])
    w = moh_weights(logits, topk=2, shared=2)
    p = torch.softmax(logits[0, 0, 2:], 0)
    # Routed heads 2..5: p[0] == p[1] (tie) are the top 2 (heads 2 and 3).
    assert w[0, 0, :2].tolist() == [1.0, 1.0]
    torch.testing.assert_close(w[0, 0, 2:], torch.stack([p[0], p[1], torch.tensor(0.), torch.tensor(0.)]) / (p[0] + p[1]))
    # Ties resolve to the lower head index.
    w = moh_weights(torch.zeros(1, 1, 4), topk=1)
    assert w.tolist() == [[[1.0, 0.0, 0.0, 0.0]]]
    assert moh_weights(logits, topk=0, shared=1)[0, 0].tolist() == [1, 0, 0, 0, 0, 0]


@pytest.mark.parametrize("args, message", [
    ((torch.zeros(2, 3), 1), r"router_logits must be 3-D \[batch, seq_len, heads\], got shape \[2, 3\]"),
    ((torch.zeros(1, 2, 3, dtype=torch.long), 1), "router_logits must be a floating-point tensor, got int64"),
    ((torch.zeros(1, 2, 4), 4, 1), r"topk must be an int in \[0, 3\] \(the number of routed heads\), got 4"),
    ((torch.zeros(1, 2, 4), 1, 5), r"shared must be an int in \[0, 4\] \(the number of heads\), got 5"),
    ((torch.full((1, 2, 4), math.nan), 1), "router_logits contains NaN"),
])
def test_moh_weights_errors(args, message):
    with pytest.raises(HelperError, match=f"^{message}$"):
        moh_weights(*args)


def test_document_ids_and_offsets():
    doc = document_ids([[5, 3], [8], [0, 2, 0, 1]], 9)
    assert doc.dtype == torch.int32
    assert doc.tolist() == [[0, 0, 0, 0, 0, 1, 1, 1, -1], [0] * 8 + [-1], [1, 1, 3] + [-1] * 6]
    assert document_offsets([[5, 3], [8]]).tolist() == [[0, 5, 8], [0, 8, 8]]
    assert document_ids(torch.tensor([[2, 2]]), 4).tolist() == [[0, 0, 1, 1]]
    assert document_ids([3], 3).tolist() == [[0, 0, 0]]


@pytest.mark.parametrize("args, message", [
    (([[4, -1]], 8), r"lengths\[0\]\[1\] = -1 is negative"),
    (([[4, 4], [5, 4]], 8), r"lengths\[1\] sum to 9, more than total_len=8"),
    (([[1.5]], 8), r"lengths\[0\] must be a list of ints, got \[1.5\]"),
    ((torch.ones(1, 2), 8), "lengths must be an integer tensor, got float32"),
    (([[1]], -1), "total_len must be a non-negative int, got -1"),
])
def test_document_ids_errors(args, message):
    with pytest.raises(HelperError, match=f"^{message}$"):
        document_ids(*args)


def test_check_document_ids():
    check_document_ids(torch.tensor([[0, 0, -1]]), batch=1, length=3)
    with pytest.raises(HelperError, match=r"^doc\[0, 1\] = -2 is out of range \(ids are >= 0, or -1 for padding\)$"):
        check_document_ids(torch.tensor([[0, -2, -1]]), batch=1, length=3)
    with pytest.raises(HelperError, match=r"^doc has shape \[1, 3\], expected \[2, 3\]$"):
        check_document_ids(torch.tensor([[0, 0, -1]]), batch=2, length=3)
    with pytest.raises(HelperError, match="^doc must be an integer tensor, got float32$"):
        check_document_ids(torch.zeros(1, 3), batch=1, length=3)


# ---- lowering selectors for kernels ------------------------------------------------------

@pytest.mark.parametrize("spec, params, L", [
    ("biformer", dict(height=6, width=10, region=4, topk=2), 60),
    ("biformer", dict(height=5, width=3, region=2, topk=3), 15),
    ("seer_gate", dict(block=8, keep=0.3), 37),
])
def test_lowered_selectors_evaluate_to_the_dense_selection(spec, params, L):
    """The selection loads that kernels evaluate per element (`lower_selectors`) give exactly
    the dense mask of the original selector (region / block index arithmetic in the IR)."""
    from attncc.runtime.conjuncts import pattern_classes
    from attncc.runtime.prepass_kernel import lower_selectors
    p = attncc.load(f"specs/{spec}.attn", **params)
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 2, L, 4, generator=g), torch.randn(2, 1, L, 4, generator=g)
    inputs = {}
    if spec == "seer_gate":
        nb = -(-L // params["block"])
        inputs["gate"] = torch.randn(2, 2, nb, nb, generator=g)
    grid = TileGrid((L,), (16,))
    _, selections = pattern_classes(p, q, k, inputs, grid, grid)
    lowered, tensors = lower_selectors(p, selections)
    assert list(tensors) == ["attncc_sel0"] and lowered.inputs[-1].name == "attncc_sel0"
    extra = dict(query=q, key=k) if spec == "biformer" else {}
    want = p.dense_mask(q_len=L, kv_len=L, heads=2, batch=2, inputs=dict(inputs, **extra))
    assert all(t.dtype == torch.int8 for t in tensors.values())
    got = lowered.dense_mask(q_len=L, kv_len=L, heads=2, batch=2,
                             inputs={n: t.bool() for n, t in tensors.items()})
    assert torch.equal(got, want)


def test_lists_scale_with_tiles_not_tokens():
    """128K tokens: a [L, L] mask would need 16 GiB; the pre-pass only builds [nQT, nKT]."""
    L = 1 << 17
    scores = torch.randn(1, 1, L // 128, L // 128, generator=torch.Generator().manual_seed(0))
    lists = block_lists(scores, 128, top=0.01, q_tile=128, kv_tile=128, q_len=L, kv_len=L)
    assert lists.shape == (1, 1, 1024) and lists.partial.shape[-1] == 0
    assert lists.full_counts.eq(11).all()                 # ceil(0.01 · 1024) = 11 blocks
    q = torch.randn(1, 1, L, 4, generator=torch.Generator().manual_seed(1))
    lists = route_lists(q, q, 512, 3, q_tile=128, kv_tile=128)
    assert lists.full_counts.eq(12).all() and lists.partial_counts.eq(0).all()
