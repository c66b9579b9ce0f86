"""Every spec of the library loads, and its dense mask (at small sizes) equals an
independent formula written out here with plain torch index arithmetic or Python loops."""
import glob
import math
import os

import pytest
import torch

import attncc
from attncc.ir.dense import eval_expr
from attncc.ir.nodes import Load, Var

from test_natten import natten_axis, natten_grid

SPECS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "specs")
LIBRARY = ["causal", "sliding_window", "chunked", "prefix_lm", "streaming_sinks", "dilated_1d",
           "natten1d", "natten2d", "natten3d", "gna", "maxvit_block", "maxvit_grid",
           "longformer", "bigbird", "document", "moa", "biformer", "seer_gate", "moh", "alibi",
           "softcap",
           # issue 12 (mask and score formulas in tests/test_specs_extra.py)
           "lightning", "music_transformer", "t5_bias", "s2_attention", "swin", "swin_shifted",
           "routing", "moba", "combiner",
           # issue 13: token segments beside a grid (tests/test_segments.py)
           "mmdit_natten", "vit_cls_natten", "hilo"]


def spec(name, **params):
    return attncc.load(os.path.join(SPECS, name + ".attn"), **params)


def ij(lq, lkv):
    return torch.arange(lq)[:, None], torch.arange(lkv)[None, :]


def grid_ij(*shape):
    """Per-axis coordinates of query (column vector) and key (row vector) tokens."""
    n = math.prod(shape)
    flat = torch.arange(n)
    coords, rest = [], flat
    for size in reversed(shape):
        coords.append(rest % size)
        rest = rest // size
    coords = coords[::-1]
    return [(c[:, None], c[None, :]) for c in coords]


def test_library_is_complete():
    found = sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(SPECS, "*.attn")))
    assert found == sorted(LIBRARY)
    for name in LIBRARY:
        with open(os.path.join(SPECS, name + ".attn")) as f:
            assert f.readline().startswith("# "), f"{name}.attn must open with a citation comment"


@pytest.mark.parametrize("name", LIBRARY)
def test_loads_with_defaults(name):
    p = spec(name)
    assert p.name == name
    assert p.mask.dtype == "bool"


@pytest.mark.parametrize("lq,lkv", [(7, 7), (5, 9)])
def test_causal(lq, lkv):
    i, j = ij(lq, lkv)
    assert torch.equal(spec("causal").dense_mask(lq, lkv)[0, 0], j <= i + (lkv - lq))


@pytest.mark.parametrize("lq,lkv", [(9, 9), (6, 10)])
def test_sliding_window(lq, lkv):
    i, j = ij(lq, lkv)
    off = lkv - lq
    want = (j <= i + off) & (i + off - j < 3)
    got = spec("sliding_window", window=3).dense_mask(lq, lkv)[0, 0]
    assert torch.equal(got, want)
    if lq == lkv:
        assert got.sum(-1).tolist() == [min(r + 1, 3) for r in range(lq)]  # w keys incl. self


def test_chunked():
    i, j = ij(11, 11)
    want = (i // 4 == j // 4) & (j <= i)
    assert torch.equal(spec("chunked", chunk=4).dense_mask(11, 11)[0, 0], want)


def test_prefix_lm():
    i, j = ij(8, 8)
    assert torch.equal(spec("prefix_lm", prefix=3).dense_mask(8, 8)[0, 0], (j < 3) | (j <= i))


def test_streaming_sinks():
    i, j = ij(10, 12)
    off = 2
    want = (j <= i + off) & ((j < 2) | (i + off - j < 3))
    assert torch.equal(spec("streaming_sinks", sinks=2, window=3).dense_mask(10, 12)[0, 0], want)


def test_dilated_1d():
    i, j = ij(12, 12)
    want = ((i - j).abs() <= 4) & ((i - j) % 2 == 0)
    assert torch.equal(spec("dilated_1d", width=4, dilation=2).dense_mask(12, 12)[0, 0], want)


def test_natten_specs():
    p = spec("natten1d", kernel=3, dilation=2, stride=2)
    assert torch.equal(p.dense_mask(10, 10)[0, 0], natten_axis(10, 3, 2, 2, False))
    p = spec("natten2d", height=6, width=5, kernel=3)
    assert torch.equal(p.dense_mask()[0, 0], natten_grid((6, 5), (3, 3), (1, 1), (1, 1),
                                                         (False, False)))
    p = spec("natten3d", depth=3, height=4, width=5, kernel_t=2, kernel=3)
    assert torch.equal(p.dense_mask()[0, 0], natten_grid((3, 4, 5), (2, 3, 3), (1,) * 3, (1,) * 3,
                                                         (False,) * 3))
    p = spec("gna", height=8, width=6, kernel=4, stride=3)
    assert torch.equal(p.dense_mask()[0, 0], natten_grid((8, 6), (4, 4), (1, 1), (3, 3),
                                                         (False, False)))


def test_maxvit_block():
    (yi, yj), (xi, xj) = grid_ij(6, 8)
    want = (yi // 2 == yj // 2) & (xi // 2 == xj // 2)
    assert torch.equal(spec("maxvit_block", height=6, width=8, window=2).dense_mask()[0, 0], want)


def test_maxvit_grid():
    (yi, yj), (xi, xj) = grid_ij(6, 8)
    want = (yi % 3 == yj % 3) & (xi % 4 == xj % 4)  # a 2 x 2 lattice: strides 6/2 and 8/2
    got = spec("maxvit_grid", height=6, width=8, grid=2).dense_mask()[0, 0]
    assert torch.equal(got, want)
    assert (got.sum(-1) == 4).all()


def test_longformer():
    i, j = ij(10, 10)
    want = ((i - j).abs() <= 2) | (i < 1) | (j < 1)
    assert torch.equal(spec("longformer", radius=2, globals=1).dense_mask(10, 10)[0, 0], want)


def test_bigbird():
    n, blk, density, seed = 20, 2, 300, 5
    want = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            qb, kb = i // blk, j // blk
            r = (qb * 131 + kb * 71 + seed * 29 + 7) % 1009
            want[i, j] = abs(qb - kb) <= 1 or qb < 1 or kb < 1 or r * r % 1000 < density
    got = spec("bigbird", block=blk, globals=1, density=density, seed=seed).dense_mask(n, n)[0, 0]
    assert torch.equal(got, want)
    assert not got.all()  # the random part is not everything


def test_document():
    doc = torch.tensor([[0, 0, 0, 1, 1, 2, 2, -1, -1], [0, 1, 1, 1, 1, 1, 2, 3, 3]])
    got = spec("document").dense_mask(9, 9, batch=2, inputs={"doc": doc})
    for b in range(2):
        i, j = ij(9, 9)
        want = (j <= i) & (doc[b][:, None] == doc[b][None, :]) & (doc[b][None, :] >= 0)
        assert torch.equal(got[b, 0], want)


def test_moa():
    got = spec("moa", sink=2, short=3, long=6, split=2).dense_mask(12, 12, heads=4)
    i, j = ij(12, 12)
    for h in range(4):
        span = 3 if h < 2 else 6
        assert torch.equal(got[0, h], (j <= i) & ((j < 2) | (i - j < span)))


def _topk_lowest_index(scores, t):
    """Indices of the t largest entries, ties to the lower index (independent of torch.topk)."""
    order = sorted(range(len(scores)), key=lambda r: (-scores[r], r))
    return set(order[:t])


def test_biformer_route():
    H, W, R, t, D = 4, 6, 2, 2, 3
    torch.manual_seed(0)
    q = torch.randn(1, 2, H * W, D)
    k = torch.randn(1, 2, H * W, D)
    got = spec("biformer", height=H, width=W, region=R, topk=t).dense_mask(
        heads=2, inputs={"query": q, "key": k})
    region = [(y // R) * (W // R) + (x // R) for y in range(H) for x in range(W)]
    nreg = (H // R) * (W // R)
    for h in range(2):
        qm = torch.stack([q[0, h][[n for n in range(H * W) if region[n] == r]].double().mean(0)
                          for r in range(nreg)])
        km = torch.stack([k[0, h][[n for n in range(H * W) if region[n] == r]].double().mean(0)
                          for r in range(nreg)])
        aff = (qm @ km.T).tolist()
        keep = [_topk_lowest_index(aff[r], t) for r in range(nreg)]
        want = torch.tensor([[region[j] in keep[region[i]] for j in range(H * W)]
                             for i in range(H * W)])
        assert torch.equal(got[0, h], want)


def test_seer_gate_blocks():
    L, blk, keep = 10, 2, 0.5  # 0.5 * 5 blocks -> keep 3
    nb = 5
    torch.manual_seed(1)
    gate = torch.randn(1, 2, nb, nb)
    gate[0, 1, 2, 3] = gate[0, 1, 2, 1]  # a tie: the lower block index wins
    got = spec("seer_gate", block=blk, keep=keep).dense_mask(L, L, heads=2, inputs={"gate": gate})
    n_keep = max(1, math.ceil(keep * nb))
    i, j = ij(L, L)
    for h in range(2):
        keepset = [_topk_lowest_index(gate[0, h, r].tolist(), n_keep) for r in range(nb)]
        sel = torch.tensor([[(j_ // blk) in keepset[i_ // blk] for j_ in range(L)]
                            for i_ in range(L)])
        assert torch.equal(got[0, h], sel & (j <= i))


def test_moh_output_scale():
    p = spec("moh")
    assert p.output_scale is Load("weight", (Var("b"), Var("q"), Var("h")), "float")
    i, j = ij(5, 5)
    w = torch.rand(1, 5, 2)
    assert torch.equal(p.dense_mask(5, 5, heads=2, inputs={"weight": w})[0, 1], j <= i)


def test_alibi_score():
    p = spec("alibi")
    H, L = 4, 6
    hh = torch.arange(H).view(1, -1, 1, 1)
    qq = torch.arange(L).view(1, 1, -1, 1)
    kk = torch.arange(L).view(1, 1, 1, -1)
    s = torch.randn(1, H, L, L, dtype=torch.float64)
    got = eval_expr(p.score, {"s": s, "h": hh, "q": qq, "k": kk, "HEADS": H})
    slopes = torch.tensor([2.0 ** (-8.0 * (x + 1) / H) for x in range(H)], dtype=torch.float64)
    want = s + slopes.view(1, -1, 1, 1) * (kk - qq).double()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    i, j = ij(L, L)
    assert torch.equal(p.dense_mask(L, L)[0, 0], j <= i)


def test_softcap_score():
    p = spec("softcap", cap=5.0)
    s = torch.linspace(-40, 40, 17, dtype=torch.float64)
    torch.testing.assert_close(eval_expr(p.score, {"s": s}), 5.0 * torch.tanh(s / 5.0))
