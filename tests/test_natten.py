"""`neighborhood` (NATTEN semantics, DESIGN §4) against an independent loop implementation,
in 1-D (flat index, lengths known only at call time) and on 2-D / 3-D grid layouts."""
import itertools
import math

import pytest
import torch

import attncc
from attncc.passes.elaborate import check_lengths


def natten_axis(L, K, d, s, causal):
    """bool [L, L]: NATTEN's reference mask along one axis, written from the definition."""
    m = torch.zeros(L, L, dtype=torch.bool)
    for i in range(L):
        g, ip = i % d, i // d
        Lg = L // d + (1 if g < L % d else 0)
        for j in range(L):
            if j % d != g:
                continue
            jp = j // d
            if causal:
                leader = min((ip // s) * s + s - 1, Lg - 1)
                m[i, j] = max(leader - K + 1, 0) <= jp <= ip
            else:
                leader = min((ip // s) * s + s // 2, Lg - 1)
                start = leader - K // 2
                start = 0 if start < 0 else (Lg - K if start > Lg - K else start)
                m[i, j] = start <= jp < start + K
    return m


def natten_grid(shape, Ks, ds, ss, cs):
    """bool [N, N] over row-major flattened grid tokens: AND of the per-axis masks."""
    n = math.prod(shape)
    coords = list(itertools.product(*[range(x) for x in shape]))
    out = torch.ones(n, n, dtype=torch.bool)
    for a, L in enumerate(shape):
        m = natten_axis(L, Ks[a], ds[a], ss[a], cs[a])
        ci = torch.tensor([c[a] for c in coords])
        out &= m[ci[:, None], ci[None, :]]
    return out


def _b(v):
    return "true" if v else "false"


def _tup(v):
    return f"({', '.join(_b(x) if isinstance(x, bool) else str(x) for x in v)})"


CASES_1D = [(L, K, d, s, c)
            for L in (5, 8, 13)
            for K in (1, 2, 3, 4, 5)
            for d in (1, 2, 3)
            for s in (1, 2, 3)
            for c in (False, True)
            if K * d <= L and s <= K]


@pytest.mark.parametrize("L,K,d,s,c", CASES_1D)
def test_natten_1d_flat(L, K, d, s, c):
    p = attncc.parse(f"pattern n\nmask neighborhood({K}, dilation = {d}, stride = {s}, "
                     f"causal = {_b(c)})")
    got = p.dense_mask(L, L)[0, 0]
    want = natten_axis(L, K, d, s, c)
    assert torch.equal(got, want)
    if not c:
        assert (got.sum(-1) == K).all()  # every query sees exactly K keys


@pytest.mark.parametrize("shape,K,d,s,c", [
    ((6, 7), (3, 2), (2, 3), (1, 2), (False, False)),
    ((5, 8), (3, 5), (1, 1), (3, 2), (False, True)),
    ((8, 8), (4, 4), (2, 1), (2, 4), (True, False)),
    ((7, 6), (2, 3), (3, 2), (2, 1), (True, True)),
    ((3, 4, 5), (3, 2, 3), (1, 2, 1), (1, 1, 3), (False, False, False)),
    ((4, 4, 6), (2, 3, 2), (2, 1, 3), (2, 3, 1), (True, False, True)),
])
def test_natten_grid_per_axis(shape, K, d, s, c):
    names = ["t", "y", "x"][-len(shape):]
    grid = ", ".join(f"{n} = {L}" for n, L in zip(names, shape))
    p = attncc.parse(f"pattern n\nlayout grid({grid})\n"
                     f"mask neighborhood({_tup(K)}, dilation = {_tup(d)}, stride = {_tup(s)}, "
                     f"causal = {_tup(c)})")
    got = p.dense_mask()[0, 0]
    want = natten_grid(shape, K, d, s, c)
    assert torch.equal(got, want)
    if not any(c):
        assert (got.sum(-1) == math.prod(K)).all()


def test_natten_scalar_broadcast():
    p = attncc.parse("pattern n\nlayout grid(y = 6, x = 7)\n"
                     "mask neighborhood(3, dilation = 2, stride = 2)")
    assert torch.equal(p.dense_mask()[0, 0],
                       natten_grid((6, 7), (3, 3), (2, 2), (2, 2), (False, False)))


def test_natten_stride_equal_kernel_is_blocked():
    a = attncc.parse("pattern n\nlayout grid(y = 8, x = 8)\nmask neighborhood(4, stride = 4)")
    b = attncc.parse("pattern n\nlayout grid(y = 8, x = 8)\nmask blocked(4)")
    assert torch.equal(a.dense_mask(), b.dense_mask())


def test_kernel_times_dilation_exceeds_grid_axis():
    with pytest.raises(attncc.SpecError) as e:
        attncc.parse("pattern n\nlayout grid(y = 6, x = 9)\nmask neighborhood((3, 3), dilation = 3)")
    assert str(e.value) == (
        "<spec>:3:6: error: neighborhood kernel 3 x dilation 3 = 9 exceeds the length 6 of axis 'y'\n"
        "  mask neighborhood((3, 3), dilation = 3)\n"
        "       ^" + "~" * 33)


def test_stride_exceeds_kernel():
    with pytest.raises(attncc.SpecError) as e:
        attncc.parse("pattern n\nmask neighborhood(3, stride = 4)")
    assert str(e.value) == (
        "<spec>:2:6: error: neighborhood stride 4 exceeds the kernel size 3 "
        "(NATTEN requires stride <= kernel)\n"
        "  mask neighborhood(3, stride = 4)\n"
        "       ^" + "~" * 26)


def test_flat_length_checked_at_call_time():
    p = attncc.parse("pattern n\nmask neighborhood(5, dilation = 2)", filename="n.attn")
    check_lengths(p, 10, 10)  # 5 * 2 <= 10
    with pytest.raises(attncc.SpecError) as e:
        check_lengths(p, 9, 9)
    assert str(e.value) == (
        "n.attn:2:6: error: neighborhood kernel 5 x dilation 2 = 10 exceeds the sequence length 9\n"
        "  mask neighborhood(5, dilation = 2)\n"
        "       ^" + "~" * 28)
    with pytest.raises(attncc.SpecError):
        p.dense_mask(9, 9)


def test_natten_library_specs():
    p = attncc.load("specs/natten1d.attn", kernel=3, dilation=2, stride=3, causal=True)
    assert torch.equal(p.dense_mask(11, 11)[0, 0], natten_axis(11, 3, 2, 3, True))
    p = attncc.load("specs/natten2d.attn", height=7, width=6, kernel=3, dilation=2)
    assert torch.equal(p.dense_mask()[0, 0],
                       natten_grid((7, 6), (3, 3), (2, 2), (1, 1), (False, False)))
    p = attncc.load("specs/natten3d.attn", depth=3, height=5, width=4, kernel_t=2, kernel=3)
    assert torch.equal(p.dense_mask()[0, 0],
                       natten_grid((3, 5, 4), (2, 3, 3), (1, 1, 1), (1, 1, 1), (False,) * 3))
    p = attncc.load("specs/gna.attn", height=8, width=8, kernel=4, stride=2)
    assert torch.equal(p.dense_mask()[0, 0],
                       natten_grid((8, 8), (4, 4), (1, 1), (2, 2), (False, False)))
