"""Combiner-Fixed (specs/combiner.attn + attncc.helpers.combiner_kv): the mask against its
definition, the whole layer against the paper's formula written directly here in float64
(Ren et al. 2021, `sqrt_fixed_full`), and the kernels against the reference."""
import os

import pytest
import torch

import attncc
from attncc.helpers import HelperError, combiner_kv

SPECS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "specs")


def combiner(segment):
    return attncc.load(os.path.join(SPECS, "combiner.attn"), segment=segment)


def qkv(B, Hq, Hkv, L, D=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, L, D, generator=gen), torch.randn(B, Hkv, L, D, generator=gen),
            torch.randn(B, Hkv, L, D, generator=gen))


def combiner_direct(q, k, v, segment, pool="mean"):
    """The paper's layer per query, in float64 loops: query i of segment s attends, in one
    softmax, to keys j of segment s with j <= i (logit q_i·k_j·scale) and to the summary of
    every segment r < s (logit q_i·k̄_r·scale, value v̄_r = Σ_{j in r} softmax_j(q̄_r·k_j·scale)
    v_j, with q̄_r, k̄_r the mean (or max) over the segment's tokens)."""
    q, k, v = (t.double() for t in (q, k, v))
    B, Hq, L, D = q.shape
    g = Hq // k.shape[1]
    scale = D ** -0.5
    red = (lambda x: x.mean(0)) if pool == "mean" else (lambda x: x.amax(0))
    rows = []
    n = -(-L // segment)
    for b in range(B):
        for h in range(Hq):
            K, V, Q = k[b, h // g], v[b, h // g], q[b, h]
            kbar, vbar = [], []
            for r in range(n):
                lo, hi = r * segment, min(L, (r + 1) * segment)
                kbar.append(red(K[lo:hi]))
                w = torch.softmax(K[lo:hi] @ red(Q[lo:hi]) * scale, 0)
                vbar.append(w @ V[lo:hi])
            for i in range(L):
                s = i // segment
                local = list(range(s * segment, i + 1))
                keys = torch.stack([K[j] for j in local] + kbar[:s])
                vals = torch.stack([V[j] for j in local] + vbar[:s])
                rows.append(torch.softmax(keys @ Q[i] * scale, 0) @ vals)
    return torch.stack(rows).view(B, Hq, L, -1)


def test_mask_matches_the_definition():
    for L, seg in ((100, 16), (64, 16), (37, 8)):
        n = -(-L // seg)
        m = combiner(seg).dense_mask(L, L + n)[0, 0]
        i, j = torch.arange(L)[:, None], torch.arange(L + n)[None, :]
        token = (j < L) & (j // seg == i // seg) & (j <= i)
        summary = (j >= L) & (j - L < i // seg)
        assert torch.equal(m, token | summary)


@pytest.mark.parametrize("backend", ["torch", "interpret", "flex"])
@pytest.mark.parametrize("B,Hq,Hkv,L,seg", [(1, 2, 2, 100, 16), (2, 4, 2, 64, 16)])
def test_layer_matches_the_paper_formula(backend, B, Hq, Hkv, L, seg):
    q, k, v = qkv(B, Hq, Hkv, L, seed=L)
    keys, values = combiner_kv(q, k, v, seg)
    assert keys.shape == (B, Hq, L + -(-L // seg), 8)
    kern = attncc.compile(combiner(seg), backend=backend, block_m=16, block_n=16)
    out = kern(q, keys, values)
    torch.testing.assert_close(out.double(), combiner_direct(q, k, v, seg), rtol=2e-4, atol=2e-4)
    ref = attncc.reference(combiner(seg), q.double(), keys.double(), values.double())
    torch.testing.assert_close(out.double(), ref, rtol=2e-4, atol=2e-4)


def test_max_pooling_and_gradients_through_the_summaries():
    q, k, v = qkv(1, 2, 1, 40, seed=3)
    q64, k64, v64 = (t.double().requires_grad_(True) for t in (q, k, v))
    keys, values = combiner_kv(q64, k64, v64, 8, pool="max")
    out = attncc.compile(combiner(8), backend="torch", block_m=16, block_n=16)(q64, keys, values)
    torch.testing.assert_close(out, combiner_direct(q, k, v, 8, pool="max"), rtol=1e-9, atol=1e-9)
    out.sum().backward()
    leaves = [t.double().requires_grad_(True) for t in (q, k, v)]
    combiner_direct(*leaves, 8, pool="max").sum().backward()
    for got, want in zip((q64, k64, v64), leaves):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-7, atol=1e-9)


def test_helper_errors():
    q, k, v = qkv(1, 2, 2, 16)
    with pytest.raises(HelperError, match="segment must be a positive integer, got 0"):
        combiner_kv(q, k, v, 0)
    with pytest.raises(HelperError, match="pool must be 'mean' or 'max', got 'sum'"):
        combiner_kv(q, k, v, 4, pool="sum")
    with pytest.raises(HelperError, match="Hq % Hkv == 0"):
        combiner_kv(q, k[:, :, :8], v, 4)
