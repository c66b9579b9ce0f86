"""`neighborhood`, `blocked` and `route` with separate query and key grids (passes/grid_map.py):
masks against independent formulas written here (hypothesis over grid sizes), located errors,
and every backend against the float64 reference."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import attncc
from attncc.ir.segmented import mapped_cell


def cell(i, Q, K):
    """Key cell containing the centre of query cell i: floor((i + 1/2) * K / Q)."""
    return torch.div((2 * i + 1) * K, 2 * Q, rounding_mode="floor")


def natten(i, j, L, K, d=1, s=1, causal=False):
    """NATTEN along one axis (DESIGN §4) with query position i and key position j on an axis
    of length L."""
    g = i % d
    ip, jp = i // d, j // d
    Lg = L // d + (g < L % d).long()
    if causal:
        leader = torch.minimum((ip // s) * s + s - 1, Lg - 1)
        ok = (torch.clamp(leader - K + 1, min=0) <= jp) & (jp <= ip)
    else:
        leader = torch.minimum((ip // s) * s + s // 2, Lg - 1)
        start = torch.maximum(torch.minimum(leader - K // 2, Lg - K), torch.zeros_like(leader))
        ok = (start <= jp) & (jp < start + K)
    return ok & (j % d == g)


def coords(n, shape):
    idx = torch.arange(n)
    out, rest = [], idx
    for size in reversed(shape):
        out.append(rest % size)
        rest = rest // size
    return list(reversed(out))


def spec(qshape, kshape, mask, names=("y", "x")):
    q = ", ".join(f"{a} = {n}" for a, n in zip(names, qshape))
    k = ", ".join(f"{a} = {n}" for a, n in zip(names, kshape))
    return f"pattern two\nlayout q_grid({q})\nlayout k_grid({k})\nmask {mask}\n"


def test_mapped_cell_examples():
    assert [mapped_cell(i, 8, 4) for i in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]   # pooled by 2
    assert [mapped_cell(i, 4, 8) for i in range(4)] == [1, 3, 5, 7]               # 2x finer keys
    assert [mapped_cell(i, 5, 5) for i in range(5)] == [0, 1, 2, 3, 4]
    assert [mapped_cell(i, 3, 2) for i in range(3)] == [0, 1, 1]
    assert [mapped_cell(i, 6, 4) for i in range(6)] == [0, 1, 1, 2, 3, 3]


sizes = st.integers(2, 9)


@settings(max_examples=40)
@given(Q=st.tuples(sizes, sizes), K=st.tuples(sizes, sizes), kernel=st.integers(1, 4),
       dilation=st.integers(1, 2), stride=st.integers(1, 4), causal=st.booleans())
def test_neighborhood_on_the_key_grid_matches_natten_at_the_mapped_cell(Q, K, kernel, dilation,
                                                                        stride, causal):
    stride = min(stride, kernel)
    if any(kernel * dilation > k for k in K):
        return
    c = "true" if causal else "false"
    p = attncc.parse(spec(Q, K, f"neighborhood({kernel}, dilation = {dilation}, "
                                f"stride = {stride}, causal = {c})"))
    nq, nk = math.prod(Q), math.prod(K)
    qc, kc = coords(nq, Q), coords(nk, K)
    want = torch.ones(nq, nk, dtype=torch.bool)
    for a in range(2):
        i = cell(qc[a], Q[a], K[a])[:, None]
        want &= natten(i, kc[a][None, :], K[a], kernel, dilation, stride, causal)
    assert torch.equal(p.dense_mask(nq, nk)[0, 0], want)


@settings(max_examples=30)
@given(Q=st.tuples(sizes, sizes, sizes), K=st.tuples(sizes, sizes, sizes),
       size=st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3)))
def test_blocked_on_the_key_grid_matches_the_formula(Q, K, size):
    p = attncc.parse(spec(Q, K, f"blocked(({size[0]}, {size[1]}, {size[2]}))", ("t", "y", "x")))
    nq, nk = math.prod(Q), math.prod(K)
    qc, kc = coords(nq, Q), coords(nk, K)
    want = torch.ones(nq, nk, dtype=torch.bool)
    for a in range(3):
        want &= (cell(qc[a], Q[a], K[a]) // size[a])[:, None] == (kc[a] // size[a])[None, :]
    assert torch.equal(p.dense_mask(nq, nk)[0, 0], want)


def route_reference(q, k, Q, K, region, topk):
    """BiFormer routing with queries placed on the key grid: regions of `region` key cells per
    axis (row-major), a query in the region of its mapped cell; region means of q and k
    (0 for a region without queries), affinity, top-k key regions per query region."""
    nq, nk = math.prod(Q), math.prod(K)
    counts = [-(-K[a] // region[a]) for a in range(len(K))]
    qc, kc = coords(nq, Q), coords(nk, K)
    rq = torch.zeros(nq, dtype=torch.long)
    rk = torch.zeros(nk, dtype=torch.long)
    for a in range(len(K)):
        rq = rq * counts[a] + cell(qc[a], Q[a], K[a]) // region[a]
        rk = rk * counts[a] + kc[a] // region[a]
    n = math.prod(counts)
    qbar = torch.zeros(q.shape[0], q.shape[1], n, q.shape[3], dtype=torch.float64)
    kbar = torch.zeros(k.shape[0], k.shape[1], n, k.shape[3], dtype=torch.float64)
    for r in range(n):
        if (rq == r).any():
            qbar[:, :, r] = q[:, :, rq == r].double().mean(2)
        kbar[:, :, r] = k[:, :, rk == r].double().mean(2)
    aff = qbar @ kbar.transpose(-1, -2)
    sel = torch.zeros_like(aff, dtype=torch.bool)
    for b in range(aff.shape[0]):
        for h in range(aff.shape[1]):
            for r in range(n):
                order = sorted(range(n), key=lambda j: (-aff[b, h, r, j].item(), j))[:topk]
                sel[b, h, r, order] = True
    return sel[:, :, rq][:, :, :, rk]


@settings(max_examples=15, deadline=None)
@given(Q=st.tuples(st.integers(2, 8), st.integers(2, 8)),
       K=st.tuples(st.integers(2, 6), st.integers(2, 6)),
       region=st.tuples(st.integers(1, 3), st.integers(1, 3)), topk=st.integers(1, 3),
       seed=st.integers(0, 100))
def test_route_on_the_key_grid_matches_an_independent_implementation(Q, K, region, topk, seed):
    p = attncc.parse(spec(Q, K, f"route(region = ({region[0]}, {region[1]}), topk = {topk})"))
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 2, math.prod(Q), 4, generator=g)
    k = torch.randn(1, 2, math.prod(K), 4, generator=g)
    got = p.dense_mask(math.prod(Q), math.prod(K), heads=2, inputs={"query": q, "key": k})
    assert torch.equal(got, route_reference(q, k, Q, K, region, topk))


@pytest.mark.parametrize("text, message", [
    (spec((4, 4), (2, 2), "neighborhood(3)"),
     "neighborhood kernel 3 x dilation 1 = 3 exceeds the length 2 of axis 'y' of the key grid"),
    ("pattern two\nlayout q_grid(y = 4, x = 4)\nlayout k_grid(t = 2, y = 2, x = 2)\n"
     "mask blocked(1)\n",
     "'blocked' places each query on the key grid axis by axis: the query and key grids need "
     "the same axes (query grid: y, x; key grid: t, y, x)"),
    ("pattern two\nlayout q_grid(y = 4, x = 4)\nlayout k_tokens(text = 7)\n"
     "mask neighborhood(3)\n",
     "'neighborhood' needs a query grid and a key grid (the key layout has no grid)"),
    ("pattern two\nlayout q_grid(y = 4, x = 4)\nlayout k_grid(y = 4, x = 4)\n"
     "layout k_tokens(text = 2)\nmask route(region = 2, topk = 1)\n",
     "route(...) is not supported on a layout with token segments"),
    (spec((4, 4), (4, 4), "neighborhood((3, 3, 3))"),
     "'kernel' of 'neighborhood' has 3 values but the layout has 2 axes (y, x)"),
])
def test_misuse_is_a_located_error(text, message):
    with pytest.raises(attncc.SpecError) as e:
        attncc.parse(text, filename="two.attn")
    first = str(e.value).splitlines()[0]
    assert first.startswith("two.attn:4:") or first.startswith("two.attn:5:")
    assert first.split(": error: ", 1)[1] == message


KERNEL_CASES = {
    "pooled keys": (spec((8, 8), (4, 4), "neighborhood(3)"), {}),
    "finer keys": (spec((4, 4), (8, 8), "neighborhood(2, causal = true) | blocked(4)"), {}),
    "route": (spec((8, 8), (4, 4), "route(region = 2, topk = 2)"), {}),
    "boxes": (spec((8, 8), (4, 4), "neighborhood(3)"),
              {"q_tile": (4, 4), "kv_tile": (2, 8)}),
}


@pytest.mark.parametrize("backend", ["interpret", "torch", "dense", "flex"])
@pytest.mark.parametrize("case", list(KERNEL_CASES))
def test_backends_match_the_reference(case, backend):
    text, opts = KERNEL_CASES[case]
    if backend != "interpret" and opts:
        return  # tile shapes matter to the generated kernel (and the torch path)
    p = attncc.parse(text)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, p.fixed_length, 16, generator=g)
    k, v = (torch.randn(1, 2, p.fixed_kv_length, 16, generator=g) for _ in range(2))
    ref = attncc.reference(p, q, k, v)
    out = attncc.compile(p, backend=backend, block_m=16, block_n=16, **opts)(q, k, v)
    assert (out.double() - ref).abs().max() < 1e-4
