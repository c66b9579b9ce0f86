"""Library specs of issue 12 (lightning, music_transformer, t5_bias, s2_attention, swin,
swin_shifted): each mask / score against an independent formula written here (the papers'
reference constructions), and a compiled kernel against `attncc.reference`."""
import math
import os

import pytest
import torch

import attncc

SPECS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "specs")


def spec(name, **params):
    return attncc.load(os.path.join(SPECS, name + ".attn"), **params)


def qkv(B, H, L, D=8, seed=0, grad=False, Hkv=None):
    gen = torch.Generator().manual_seed(seed)
    Hkv = Hkv or H
    ts = [torch.randn(B, H, L, D, generator=gen), torch.randn(B, Hkv, L, D, generator=gen),
          torch.randn(B, Hkv, L, D, generator=gen)]
    return [t.requires_grad_(grad) for t in ts]


def softmax_attention(q, k, v, scores_fn, keep, scale):
    """Dense float64 attention with an additive score term and a keep mask."""
    q, k, v = (t.detach().double() for t in (q, k, v))
    s = q @ k.transpose(-1, -2) * scale + scores_fn
    s = s.masked_fill(~keep, float("-inf"))
    return torch.softmax(s, -1).nan_to_num(0.0) @ v


def kernel_vs_reference(p, q, k, v, backend="torch", atol=2e-4, **inputs):
    kern = attncc.compile(p, backend=backend, block_m=16, block_n=16)
    out = kern(q, k, v, **inputs)
    ref = attncc.reference(p, q.double(), k.double(), v.double(),
                           **{n: (t.double() if t.is_floating_point() else t) for n, t in inputs.items()})
    torch.testing.assert_close(out.double(), ref, rtol=atol, atol=atol)
    return kern, out


# ---- lightning ----------------------------------------------------------------------------------

def test_lightning():
    p = spec("lightning", heads=4)
    assert p.normalize == "none"
    i, j = torch.arange(20).view(-1, 1), torch.arange(20).view(1, -1)
    assert torch.equal(p.dense_mask(20, 20, heads=4)[0, 0], j <= i)
    q, k, v = qkv(1, 4, 50)
    lam = torch.tensor([math.exp(-2.0 ** (-8 * (h + 1) / 4)) for h in range(4)],
                       dtype=torch.float64).view(1, -1, 1, 1)
    i, j = torch.arange(50).view(-1, 1), torch.arange(50).view(1, -1)
    w = torch.where(j <= i, lam ** (i - j).double(), torch.zeros((), dtype=torch.float64))
    expect = (q.double() @ k.double().transpose(-1, -2) * 8 ** -0.5 * w) @ v.double()
    torch.testing.assert_close(attncc.reference(p, q, k, v), expect)
    kern, out = kernel_vs_reference(p, q, k, v)
    assert kern.last_algorithm.linear


# ---- Music Transformer ------------------------------------------------------------------------------

def test_music_transformer_score_and_table_gradient():
    p = spec("music_transformer")
    H, L = 2, 40
    q, k, v = qkv(1, H, L, seed=1, grad=True)
    rel = torch.randn(H, 256, generator=torch.Generator().manual_seed(2), requires_grad=True)
    i, j = torch.arange(L).view(-1, 1), torch.arange(L).view(1, -1)
    rel64 = rel.detach().double().requires_grad_()
    bias = rel64[:, (i - j).clamp(0, 255)].unsqueeze(0)           # [1, H, L, L]
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    s = leaves[0] @ leaves[1].transpose(-1, -2) * 8 ** -0.5 + bias
    expect = torch.softmax(s.masked_fill(j > i, float("-inf")), -1) @ leaves[2]
    torch.testing.assert_close(attncc.reference(p, q.detach(), k.detach(), v.detach(),
                                                rel=rel.detach()), expect.detach())
    kern = attncc.compile(p, backend="torch", block_m=16, block_n=16)
    out = kern(q, k, v, rel=rel)
    torch.testing.assert_close(out.double(), expect.detach(), rtol=2e-4, atol=2e-4)
    g = torch.randn_like(out)
    out.backward(g)
    expect.backward(g.double())
    torch.testing.assert_close(rel.grad.double(), rel64.grad, rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(q.grad.double(), leaves[0].grad, rtol=2e-4, atol=2e-4)


# ---- T5 buckets ------------------------------------------------------------------------------------

def t5_bucket(rel, num_buckets=32, max_distance=128):
    """T5's _relative_position_bucket (bidirectional), written as in the reference code."""
    n = num_buckets // 2
    ret = (rel > 0).long() * n
    d = rel.abs()
    max_exact = n // 2
    small = d < max_exact
    large = max_exact + (torch.log(d.double().clamp_min(1) / max_exact)
                         / math.log(max_distance / max_exact) * (n - max_exact)).long()
    large = torch.minimum(large, torch.full_like(large, n - 1))
    return ret + torch.where(small, d, large)


def test_t5_bucket_score():
    p = spec("t5_bias")
    H, L = 2, 300
    bias = torch.randn(H, 32, generator=torch.Generator().manual_seed(3))
    from attncc.ir.dense import eval_expr
    i, j = torch.arange(L).view(1, 1, -1, 1), torch.arange(L).view(1, 1, 1, -1)
    got = eval_expr(p.score, {"s": torch.zeros(()), "h": torch.arange(H).view(1, -1, 1, 1),
                              "q": i, "k": j, "Q_LEN": L, "KV_LEN": L, "HEADS": H},
                    inputs={"bias": bias})
    bucket = t5_bucket(j - i)                                     # relative = key - query
    expect = bias[torch.arange(H).view(1, -1, 1, 1), bucket]
    torch.testing.assert_close(got.double(), expect.double())
    # every bucket but 16 occurs (a positive distance is at least 1: buckets 17..31)
    assert sorted(t5_bucket(torch.arange(-200, 201)).unique().tolist()) == [b for b in range(32) if b != 16]


def test_t5_bias_kernel():
    p = spec("t5_bias")
    q, k, v = qkv(1, 2, 70, seed=4)
    bias = torch.randn(2, 32, generator=torch.Generator().manual_seed(5))
    i, j = torch.arange(70).view(-1, 1), torch.arange(70).view(1, -1)
    expect = softmax_attention(q, k, v, bias.double()[:, t5_bucket(j - i)].unsqueeze(0),
                               torch.ones(70, 70, dtype=torch.bool), 8 ** -0.5)
    torch.testing.assert_close(attncc.reference(p, q, k, v, bias=bias), expect)
    kernel_vs_reference(p, q, k, v, bias=bias)


# ---- S2-Attention local-strided blocks -------------------------------------------------------------

def s2_mask(L, heads, block, local_blocks, vert_stride, homogeneous):
    """vLLM get_sparse_attn_mask's rule, in Python loops over blocks, then token causal."""
    step = 0 if homogeneous else max(1, vert_stride // heads)
    nb = -(-L // block)
    out = torch.zeros(heads, L, L, dtype=torch.bool)
    for h in range(heads):
        blocks = torch.zeros(nb, nb, dtype=torch.bool)
        for bi in range(nb):
            for bj in range(bi + 1):
                blocks[bi, bj] = bi - bj < local_blocks or (bj + h * step + 1) % vert_stride == 0
        tok = blocks.repeat_interleave(block, 0).repeat_interleave(block, 1)[:L, :L]
        out[h] = tok & torch.ones(L, L, dtype=torch.bool).tril()
    return out


@pytest.mark.parametrize("homogeneous", [False, True])
def test_s2_attention(homogeneous):
    params = dict(block=16, local_blocks=2, vert_stride=4, heads=4, homogeneous=homogeneous)
    p = spec("s2_attention", **params)
    L = 150
    got = p.dense_mask(L, L, heads=4)[0]
    assert torch.equal(got, s2_mask(L, 4, 16, 2, 4, homogeneous))
    # the heads together cover every causal block when heterogeneous
    if not homogeneous:
        assert torch.equal(got.any(0), torch.ones(L, L, dtype=torch.bool).tril())
    q, k, v = qkv(1, 4, 100, seed=6)
    kernel_vs_reference(p, q, k, v)


# ---- Swin windows ------------------------------------------------------------------------------------

def swin_mask(H, W, window, shift):
    """Swin's own construction: roll the map by -shift, partition into windows, and mask pairs
    from different regions (the `img_mask` slices of SwinTransformerBlock), mapped back to the
    original token order."""
    coords = torch.arange(H * W).view(H, W)
    if shift:
        coords = torch.roll(coords, shifts=(-shift, -shift), dims=(0, 1))
        img = torch.zeros(H, W, dtype=torch.long)
        cnt = 0
        sl = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
        for hs in sl:
            for ws in sl:
                img[hs, ws] = cnt
                cnt += 1
    else:
        img = torch.zeros(H, W, dtype=torch.long)
    keep = torch.zeros(H * W, H * W, dtype=torch.bool)
    for wy in range(H // window):
        for wx in range(W // window):
            sel = (slice(wy * window, (wy + 1) * window), slice(wx * window, (wx + 1) * window))
            toks, region = coords[sel].flatten(), img[sel].flatten()
            keep[toks[:, None], toks[None, :]] = region[:, None] == region[None, :]
    return keep


@pytest.mark.parametrize("name,shift", [("swin", 0), ("swin_shifted", 2)])
def test_swin_windows(name, shift):
    p = spec(name, height=8, width=12, window=4, shift=shift)
    assert torch.equal(p.dense_mask()[0, 0], swin_mask(8, 12, 4, shift))
    q, k, v = qkv(1, 2, 96, seed=7)
    kernel_vs_reference(p, q, k, v)


def test_swin_unshifted_equals_blocked():
    a = spec("swin", height=8, width=8, window=4).dense_mask()
    b = attncc.parse("pattern b\nlayout grid(y = 8, x = 8)\nmask blocked(4)\n").dense_mask()
    assert torch.equal(a, b)


# ---- Routing Transformer ---------------------------------------------------------------------------

@pytest.mark.parametrize("causal_mask", [False, True])
def test_routing_mask_and_kernel(causal_mask):
    from attncc.helpers import cluster_ids
    p = spec("routing", causal_mask=causal_mask)
    gen = torch.Generator().manual_seed(8)
    q, k, v = qkv(2, 2, 96, seed=8)
    centroids = torch.randn(2, 3, 8, generator=gen)
    qc, kc = cluster_ids(q, centroids), cluster_ids(k, centroids)
    # the helper: nearest centroid by cosine similarity, written out
    cos = torch.nn.functional.cosine_similarity(q[:, :, :, None, :], centroids[None, :, None], -1)
    assert torch.equal(qc, cos.argmax(-1))
    i, j = torch.arange(96).view(-1, 1), torch.arange(96).view(1, -1)
    expect = qc[:, :, :, None] == kc[:, :, None, :]
    if causal_mask:
        expect = expect & (j <= i)
    assert torch.equal(p.dense_mask(96, 96, heads=2, batch=2, inputs={"qc": qc, "kc": kc}), expect)
    kernel_vs_reference(p, q, k, v, qc=qc, kc=kc)


def test_routing_tiles_from_cluster_sets():
    """Tokens grouped by cluster: tiles whose id sets are disjoint are skipped, tiles of one
    shared id run without mask code."""
    from attncc.runtime.clusters import cluster_classes
    from attncc.schedule.schedule import TileGrid
    ids = ((torch.arange(128) // 32) % 3).view(1, 1, 128).expand(1, 2, 128)
    cls = cluster_classes(ids, ids, TileGrid((128,), (16,)), TileGrid((128,), (16,)))
    tile_id = (torch.arange(8) * 16 // 32) % 3
    same = tile_id[:, None] == tile_id[None, :]
    assert torch.equal(cls[0, 0], torch.where(same, 2, 0).to(torch.int8))
    mixed = torch.tensor([[0, 1] * 8 + [5] * 16])                  # 2 tiles: {0, 1} and {5}
    cls = cluster_classes(mixed[None], torch.tensor([[[1] * 16 + [5] * 16]]),
                          TileGrid((32,), (16,)), TileGrid((32,), (16,)))
    assert cls[0, 0].tolist() == [[1, 0], [0, 2]]
    p = spec("routing")
    q, k, v = qkv(1, 2, 128, seed=9)
    kern, _ = kernel_vs_reference(p, q, k, v, qc=ids, kc=ids)
    assert kern.last_stats["full_tiles"] == int(same.sum()) * 2
    assert kern.last_stats["partial_tiles"] == 0
