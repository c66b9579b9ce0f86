"""MoBA (specs/moba.attn): `route(region = β, topk = t, query_region = 1, causal = true)`.

The selection against MoBA's rule written here in Python loops (exact ties: lower block
wins), the helper `moba_blocks` against it, every backend against float64 attention with the
selection held fixed, gradients of q / k / v with the selection fixed, and the visited tiles
against the union of the tile's queries' selections."""
import os

import pytest
import torch

import attncc
from attncc.helpers import moba_blocks
from attncc.runtime.prepass import route_select

SPECS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "specs")


def moba(**params):
    return attncc.load(os.path.join(SPECS, "moba.attn"), **params)


def qkv(B, Hq, Hkv, Lq, Lkv, D=8, seed=0, ties=False):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Lq, D, generator=gen)
    k = torch.randn(B, Hkv, Lkv, D, generator=gen)
    v = torch.randn(B, Hkv, Lkv, D, generator=gen)
    if ties:  # integer-valued tokens and repeated key blocks: many equal gate scores
        q, k = q.round(), k.round()
        k[:, :, 16:32] = k[:, :, :16]
        k[:, :, 48:64] = k[:, :, :16]
    return q, k, v


def chosen_loops(q, k, block, topk):
    """MoBA's rule per (b, h, query token), in Python: own block o = (q + Lkv - Lq) // block;
    blocks j <= o score q · mean(k over block j) (float64; the last block is partial); the own
    block first, then the best others, ties to the lower j; at most topk in all."""
    B, Hq, Lq, _ = q.shape
    Hkv, Lkv = k.shape[1], k.shape[2]
    out = []
    for b in range(B):
        for h in range(Hq):
            kh = k[b, h // (Hq // Hkv)].double()
            for i in range(Lq):
                own = (i + Lkv - Lq) // block
                if own < 0:
                    out.append(((b, h, i), []))
                    continue
                scored = sorted(((float(q[b, h, i].double() @ kh[j * block:(j + 1) * block].mean(0)), -j)
                                 for j in range(own)), reverse=True)
                out.append(((b, h, i), [own] + [-nj for _, nj in scored][:topk - 1]))
    return out


def mask_from(chosen, Lq, Lkv, B, Hq, block):
    keep = torch.zeros(B, Hq, Lq, Lkv, dtype=torch.bool)
    off = Lkv - Lq
    for (b, h, i), blocks in chosen:
        for j in blocks:
            keep[b, h, i, j * block:min(Lkv, (j + 1) * block, i + off + 1)] = True
    return keep


def attention64(q, k, v, keep, scale):
    g = q.shape[1] // k.shape[1]
    kk, vv = (t.double().repeat_interleave(g, 1) for t in (k, v))
    s = (q.double() @ kk.transpose(-1, -2)) * scale
    return torch.softmax(s.masked_fill(~keep, float("-inf")), -1).nan_to_num(0.0) @ vv


SHAPES = [(1, 2, 2, 90, 90, False), (2, 4, 2, 61, 77, False), (1, 2, 1, 64, 64, True),
          (1, 2, 2, 40, 30, False)]


@pytest.mark.parametrize("B,Hq,Hkv,Lq,Lkv,ties", SHAPES)
def test_selection_matches_the_rule(B, Hq, Hkv, Lq, Lkv, ties):
    q, k, _ = qkv(B, Hq, Hkv, Lq, Lkv, seed=Lq, ties=ties)
    ref = chosen_loops(q, k, 16, 3)
    sel, q_gid, k_gid = route_select(q, k, 16, 3, q_region=1, causal=True)
    assert sel.shape == (B, Hq, Lq, -(-Lkv // 16)) and torch.equal(q_gid, torch.arange(Lq))
    for (b, h, i), blocks in ref:
        assert sorted(sel[b, h, i].nonzero().flatten().tolist()) == sorted(blocks), (b, h, i)
    helper = moba_blocks(q, k, 16, 3)
    for (b, h, i), blocks in ref:
        assert helper[b, h, i].tolist() == blocks + [-1] * (3 - len(blocks)), (b, h, i)
    p = moba(block=16)
    dense = p.dense_mask(Lq, Lkv, heads=Hq, batch=B, inputs={"query": q, "key": k})
    assert torch.equal(dense, mask_from(ref, Lq, Lkv, B, Hq, 16))


@pytest.mark.parametrize("backend", ["torch", "interpret", "flex", "dense", "reference"])
def test_kernels_with_the_selection_held_fixed(backend):
    B, Hq, Hkv, Lq, Lkv = 2, 4, 2, 61, 77
    q, k, v = qkv(B, Hq, Hkv, Lq, Lkv, seed=1)
    keep = mask_from(chosen_loops(q, k, 16, 3), Lq, Lkv, B, Hq, 16)
    kern = attncc.compile(moba(block=16), backend=backend, block_m=16, block_n=16)
    out, lse = kern(q, k, v, return_lse=True)
    torch.testing.assert_close(out.double(), attention64(q, k, v, keep, 8 ** -0.5),
                               rtol=2e-4, atol=2e-4)
    assert torch.isfinite(lse).all()


@pytest.mark.parametrize("backend", ["torch", "interpret"])
def test_gradients_with_the_selection_fixed(backend):
    """Gradients of q, k, v equal those of float64 attention under the (constant) mask of the
    selection: no gradient flows through the block choice."""
    B, Hq, Hkv, L = 1, 2, 1, 48
    q, k, v = qkv(B, Hq, Hkv, L, L, seed=2)
    keep = mask_from(chosen_loops(q, k, 16, 2), L, L, B, Hq, 16)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    kern = attncc.compile(moba(block=16, topk=2), backend=backend, block_m=16, block_n=16)
    do = torch.randn(B, Hq, L, 8, generator=torch.Generator().manual_seed(3))
    (kern(*leaves) * do).sum().backward()
    ref = [t.double().requires_grad_(True) for t in (q, k, v)]
    (attention64(*ref, keep, 8 ** -0.5) * do.double()).sum().backward()
    for got, want in zip(leaves, ref):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=2e-4, atol=2e-4)


def test_unselected_key_tiles_are_skipped():
    """Visited (b, h, query tile, key tile) = causal tiles holding a key block some query of
    the tile selected; the rest (all earlier blocks no query chose) are never visited."""
    B, H, L, block, tile = 1, 2, 256, 32, 16
    q, k, v = qkv(B, H, H, L, L, seed=4)
    chosen = chosen_loops(q, k, block, 2)
    expect, causal_tiles = 0, 0
    for b in range(B):
        for h in range(H):
            for t in range(L // tile):
                rows = [blocks for (bb, hh, i), blocks in chosen
                        if (bb, hh) == (b, h) and i // tile == t]
                picked = set(j for r in rows for j in r)
                for n in range(t + 1):
                    causal_tiles += 1
                    expect += (n * tile) // block in picked
    for backend in ("torch", "interpret"):
        kern = attncc.compile(moba(block=block, topk=2), backend=backend, block_m=tile, block_n=tile)
        kern(q, k, v)
        st = kern.last_stats
        assert st["full_tiles"] + st["partial_tiles"] == expect < causal_tiles


def test_route_argument_errors_are_located():
    def err(text):
        with pytest.raises(attncc.SpecError) as e:
            attncc.parse(text)
        return str(e.value)
    msg = err("pattern m\nmask causal & route(region = 8, topk = 2, causal = 1)\n")
    assert msg.startswith("<spec>:2:52: error: 'causal' of 'route' must be true or false\n"
                          "  mask causal & route(region = 8, topk = 2, causal = 1)\n"
                          "                                                     ^")
    msg = err("pattern m\nlayout grid(y = 8, x = 8)\n"
              "mask route(region = (4, 4), topk = 2, causal = true)\n")
    assert msg.startswith("<spec>:3:48: error: 'causal' of 'route' needs a 1-D sequence; the "
                          "layout grid(y = 8, x = 8) has 2 axes\n")
    msg = err("pattern m\nmask route(region = 8, topk = 2, query_region = 0)\n")
    assert msg.startswith("<spec>:2:49: error: 'query_region' of 'route' must be an integer "
                          ">= 1, got 0\n")
    msg = err("pattern m\nmask route(region = 8, topk = 2, causl = true)\n")
    assert msg.startswith("<spec>:2:34: error: 'route' has no parameter 'causl' (did you mean "
                          "'causal'?)\n")
