"""Closed-form bounds: derived for band patterns, and equal to the CSR classification (via
`bounds_matrix`) across random parameters, lengths and tile sizes."""
import random

import torch
from hypothesis import given, settings, strategies as st

import attncc
from attncc.ir.nodes import Binary, Const, Var
from attncc.ir.pattern import Pattern
from attncc.runtime.options import CompileOptions
from attncc.schedule.build import build_schedule
from attncc.schedule.closed_form import Bounds, Range, bounds_matrix, derive_bounds
from attncc.schedule.schedule import TileClass, TileGrid

from test_tiles import exact_classes

ONE_D = {
    "causal": lambda r: {},
    "sliding_window": lambda r: {"window": r.randint(1, 200)},
    "chunked": lambda r: {"chunk": r.randint(1, 150)},
    "prefix_lm": lambda r: {"prefix": r.randint(0, 200)},
    "streaming_sinks": lambda r: {"sinks": r.randint(1, 40), "window": r.randint(1, 150)},
    "natten1d": lambda r: (lambda K: {"kernel": K, "stride": r.randint(1, K),
                                      "causal": r.random() < 0.5})(r.choice([3, 5, 7, 9])),
    "moa": lambda r: {"sink": r.randint(0, 8), "short": r.randint(1, 30),
                      "long": r.randint(30, 90), "split": r.randint(0, 4)},
}


def _check(s):
    for hc in s.classes:
        assert hc.bounds is not None
        m = hc.classes(s.n_kv_tiles)
        assert torch.equal(bounds_matrix(hc.bounds), m)
    assert s.stats["bounds_dropped"] == 0


@given(st.sampled_from(sorted(ONE_D)), st.integers(0, 2 ** 32 - 1))
def test_1d_bounds_equal_csr(spec, seed):
    r = random.Random(seed)
    p = attncc.load(f"specs/{spec}.attn", **ONE_D[spec](r))
    lq, lk = r.randint(1, 400), r.randint(1, 400)
    if spec == "natten1d":
        lq = lk = max(lq, 9)
    if spec == "chunked":
        # with more queries than keys (negative causal offset) the rows of a chunk no longer
        # form one band: the schedule keeps CSR only (see test_chunked_negative_offset)
        lq = min(lq, lk)
    opts = CompileOptions(block_m=r.choice([16, 32, 64]), block_n=r.choice([16, 32, 64]))
    _check(build_schedule(p, lq, lk, 8 if spec == "moa" else 1, options=opts))


def test_chunked_negative_offset_keeps_csr_only():
    p = attncc.load("specs/chunked.attn", chunk=115)
    s = build_schedule(p, 361, 260, options=CompileOptions(block_m=64, block_n=32))
    assert s.classes[0].bounds is None and s.stats["bounds_dropped"] == 1
    dense = p.dense_mask(361, 260)[0, 0]
    assert torch.equal(s.tile_matrix(0), exact_classes(dense, s.q_grid, s.kv_grid))


NATTEN = {
    "natten2d": lambda r: dict(height=r.randint(7, 24), width=r.randint(7, 24),
                               kernel=r.choice([3, 5, 7]), stride=1),
    "gna": lambda r: dict(height=r.randint(16, 28), width=r.randint(16, 28), kernel=r.choice([4, 8]),
                          stride=r.choice([1, 2, 4])),
    "natten3d": lambda r: dict(depth=r.randint(3, 6), height=r.randint(5, 9), width=r.randint(5, 9),
                               kernel_t=3, kernel=r.choice([3, 5])),
}


@settings(max_examples=12)  # each example builds a multi-D schedule (~0.5 s)
@given(st.sampled_from(sorted(NATTEN)), st.integers(0, 2 ** 32 - 1))
def test_multi_d_bounds_equal_csr(spec, seed):
    r = random.Random(seed)
    p = attncc.load(f"specs/{spec}.attn", **NATTEN[spec](r))
    nd = len(p.layout.axes)
    tile = tuple(r.choice([2, 4, 8]) for _ in range(nd))
    ktile = tuple(r.choice([1, 2, 4, 8]) for _ in range(nd))
    s = build_schedule(p, options=CompileOptions(q_tile=tile, kv_tile=ktile))
    _check(s)
    dense = p.dense_mask()[0, 0]
    assert torch.equal(s.tile_matrix(0), exact_classes(dense, s.q_grid, s.kv_grid))


def test_bounds_representation_of_causal():
    p = attncc.load("specs/causal.attn")
    s = build_schedule(p, 64, 64, options=CompileOptions(block_m=16, block_n=16))
    b = s.classes[0].bounds
    assert b.vars == ("qt",) and [r.cls for r in b.axes[0]] == \
        [TileClass.PARTIAL, TileClass.FULL, TileClass.PARTIAL]
    assert torch.equal(bounds_matrix(b), s.tile_matrix(0))
    m = bounds_matrix(b)
    assert m.tolist()[2] == [2, 2, 1, 0]


def test_non_band_patterns_have_no_bounds():
    for spec, params in (("dilated_1d", {"width": 8, "dilation": 3}), ("longformer", {})):
        p = attncc.load(f"specs/{spec}.attn", **params)
        s = build_schedule(p, 100, 100, options=CompileOptions(block_m=16, block_n=16))
        assert s.classes[0].bounds is None and s.stats["bounds_dropped"] == 0
    # natten2d on flat 1-D tiles: coordinates are not per-axis bands of the flat index
    p = attncc.load("specs/natten2d.attn", height=16, width=16, kernel=3)
    s = build_schedule(p, options=CompileOptions(block_m=16, block_n=16, tile_1d=True))
    assert s.classes[0].bounds is None


def test_bounds_matrix_rejects_overlap():
    b = Bounds(("qt",), ((Range(Const(0), Const(2), TileClass.FULL),
                          Range(Const(1), Const(3), TileClass.PARTIAL)),), (4,), (4,))
    assert bounds_matrix(b) is None


def test_build_drops_bounds_that_disagree_with_csr(monkeypatch):
    import attncc.schedule.build as build
    q, k = Var("q"), Var("k")
    g = TileGrid((64,), (16,))
    wrong = derive_bounds(Binary("le", k, Binary("add", q, Const(16))), g, g)  # one tile off
    monkeypatch.setattr(build, "derive_bounds", lambda *a: wrong)
    p = Pattern("t", (), None, (), Binary("le", k, q))
    s = build.build_schedule(p, 64, 64, options=CompileOptions(block_m=16, block_n=16))
    assert s.classes[0].bounds is None and s.stats["bounds_dropped"] == 1
    assert s.tile_matrix(0).tolist()[0] == [1, 0, 0, 0]
