"""Segmented layouts (plain-token segments and one grid in one sequence): masks against
independent formulas written here (hypothesis over random segment sizes), membership, the
impossibility of reading a coordinate outside the grid, call-time lengths, errors, kernels."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import attncc
from attncc import helpers


def natten_axis(i, j, L, K):
    start = (i - K // 2).clamp(0, L - K)
    return (start <= j) & (j < start + K)


def expected(pre, H, W, post, K, kv_text=True):
    n = pre + H * W + post
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    in_grid = lambda t: (t >= pre) & (t < pre + H * W)  # noqa: E731
    gi, gj = (i - pre), (j - pre)
    nat = natten_axis(gi // W, gj // W, H, K) & natten_axis(gi % W, gj % W, W, K)
    text = lambda t: (t < pre) | (t >= pre + H * W)  # noqa: E731
    return text(i) | text(j) | (in_grid(i) & in_grid(j) & nat)


def spec(pre, H, W, post, K):
    lines = [f"pattern seg(kernel = {K})"]
    if pre:
        lines.append(f"layout tokens(text = {pre})")
    lines.append(f"layout grid(y = {H}, x = {W})")
    if post:
        lines.append(f"layout tokens(tail = {post})")
    cond = " | ".join([f"q.{s} | k.{s}" for s, n in (("text", pre), ("tail", post)) if n]
                      + ["neighborhood(kernel)"])
    lines.append(f"mask {cond}")
    return "\n".join(lines) + "\n"


@settings(max_examples=20)
@given(pre=st.integers(0, 5), H=st.integers(3, 7), W=st.integers(3, 7), post=st.integers(0, 3),
       K=st.sampled_from([1, 3]))
def test_token_segments_and_grid_match_the_formula(pre, H, W, post, K):
    p = attncc.parse(spec(pre, H, W, post, K))
    n = pre + H * W + post
    assert torch.equal(p.dense_mask(n, n)[0, 0], expected(pre, H, W, post, K))


def test_membership_and_coordinates_within_the_grid():
    p = attncc.parse("pattern m\nlayout tokens(cls = 1, reg = 2)\nlayout grid(y = 3, x = 4)\n"
                     "mask q.reg & k.grid & k.y == 1 | q.cls & k.cls\n")
    i, j = torch.arange(15)[:, None], torch.arange(15)[None, :]
    want = ((i >= 1) & (i < 3) & (j >= 3) & ((j - 3) // 4 == 1)) | ((i == 0) & (j == 0))
    assert torch.equal(p.dense_mask(15, 15)[0, 0], want)


def test_a_coordinate_outside_the_grid_keeps_nothing():
    # `k.x == q.x` never holds when either token is outside the grid (never read there).
    p = attncc.parse("pattern c\nlayout tokens(text = 4)\nlayout grid(y = 2, x = 3)\n"
                     "mask q.x == k.x\n")
    m = p.dense_mask(10, 10)[0, 0]
    assert not m[:4].any() and not m[:, :4].any()
    i = torch.arange(6)
    assert torch.equal(m[4:, 4:], (i[:, None] % 3) == (i[None, :] % 3))


@pytest.mark.parametrize("text, message", [
    ("layout tokens(text = 2)\nlayout grid(y = 2)\nmask q.y == k.y\nscore s + q.y\n",
     "grid coordinates cannot be used in the score clause of a layout with token segments "
     "(only compared in the mask)"),
    ("layout grid(y = 2)\nlayout grid(x = 2)\nmask true\n", "a layout has at most one grid segment"),
    ("layout tokens(text = 2)\nlayout grid(y = 4, x = 4)\nmask route(region = (2, 2), topk = 1)\n",
     "route(...) is not supported on a layout with token segments"),
    ("input t: int[8]\nlayout tokens(text = 2)\nlayout grid(y = 2, x = 3)\n"
     "mask t[q.x] == k.x\n",
     "grid coordinates cannot index an input in a layout with token segments (only compared)"),
    ("layout tokens(text = 0)\nlayout grid(y = 2)\nmask true\n",
     "size of segment 'text' must be a positive integer, got 0"),
    ("layout tokens(grid = 2)\nlayout grid(y = 2)\nmask true\n",
     "bad segment name 'grid' ('grid' names the grid segment)"),
])
def test_misuse_is_a_located_error(text, message):
    with pytest.raises(attncc.SpecError) as e:
        attncc.parse("pattern bad\n" + text, filename="bad.attn")
    assert str(e.value).splitlines()[0].split(": error: ", 1)[1] == message


def test_calls_check_the_total_length():
    p = attncc.load("specs/vit_cls_natten.attn", registers=2, height=4, width=4, kernel=3)
    kern = attncc.compile(p, backend="reference")
    q = torch.randn(1, 1, 19, 8)
    assert kern(q, q, q).shape == (1, 1, 19, 8)
    bad = torch.randn(1, 1, 20, 8)
    with pytest.raises(attncc.SpecError, match="has 19 tokens, but q has sequence length 20"):
        kern(bad, bad, bad)


@pytest.mark.parametrize("backend", ["dense", "torch", "interpret"])
def test_backends_match_the_reference(backend):
    p = attncc.load("specs/mmdit_natten.attn", text=5, frames=3, height=4, width=4, kernel_t=3,
                    kernel=3)
    n = 5 + 48
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 8, generator=g) for _ in range(3))
    ref = attncc.reference(p, q, k, v)
    out = attncc.compile(p, backend=backend, block_m=16, block_n=16)(q, k, v)
    assert (out.double() - ref).abs().max() < 1e-4


def test_library_specs():
    p = attncc.load("specs/vit_cls_natten.attn", registers=3, height=5, width=6, kernel=3)
    n = 1 + 3 + 30
    assert torch.equal(p.dense_mask(n, n)[0, 0], expected(4, 5, 6, 0, 3))
    p = attncc.load("specs/mmdit_natten.attn", text=7, frames=3, height=4, width=5, kernel_t=3,
                    kernel=3)
    n = 7 + 60
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    gi, gj = i - 7, j - 7
    nat = natten_axis(gi // 20, gj // 20, 3, 3) & natten_axis((gi // 5) % 4, (gj // 5) % 4, 4, 3) \
        & natten_axis(gi % 5, gj % 5, 5, 3)
    want = (i < 7) | (j < 7) | ((i >= 7) & (j >= 7) & nat)
    assert torch.equal(p.dense_mask(n, n)[0, 0], want)


# ---- separate query and key layouts ------------------------------------------------------------

@settings(max_examples=15)
@given(h2=st.integers(1, 4), w2=st.integers(1, 4), pool=st.integers(1, 3), r=st.integers(0, 2))
def test_separate_query_and_key_grids_match_the_formula(h2, w2, pool, r):
    H, W = h2 * pool, w2 * pool
    p = attncc.parse(f"pattern lofi\nlayout q_grid(y = {H}, x = {W})\n"
                     f"layout k_grid(y = {h2}, x = {w2})\n"
                     f"mask abs(q.y // {pool} - k.y) <= {r} & abs(q.x // {pool} - k.x) <= {r}\n")
    i, j = torch.arange(H * W)[:, None], torch.arange(h2 * w2)[None, :]
    want = ((i // W // pool - j // w2).abs() <= r) & ((i % W // pool - j % w2).abs() <= r)
    assert torch.equal(p.dense_mask(H * W, h2 * w2)[0, 0], want)


@settings(max_examples=20, deadline=None)
@given(H=st.integers(2, 7), W=st.integers(2, 7), pool=st.integers(1, 3), hifi=st.integers(0, 3))
def test_hilo_mask_matches_the_formula(H, W, pool, hifi):
    pool = min(pool, H, W)
    heads = 3
    p = attncc.load("specs/hilo.attn", height=H, width=W, pool=pool, hifi_heads=hifi,
                    heads=heads)
    n, npool = H * W, (H // pool) * (W // pool)
    assert (p.fixed_length, p.fixed_kv_length) == (n, n + npool)
    m = p.dense_mask(heads=heads)[0]
    i, j = torch.arange(n)[:, None], torch.arange(n + npool)[None, :]
    full = j < n
    window = full & (i // W // pool == j // W // pool) & (i % W // pool == j % W // pool)
    for h in range(heads):
        want = window if h < hifi else ~full
        assert torch.equal(m[h], want.expand(n, n + npool)), h


def test_hilo_kv_pools_like_avg_pool2d():
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, 3, 5 * 7, 4, generator=g), torch.randn(2, 3, 5 * 7, 6, generator=g)
    k2, v2 = helpers.hilo_kv(k, v, height=5, width=7, pool=2)
    for x, x2 in ((k, k2), (v, v2)):
        D = x.shape[-1]
        img = x.reshape(2 * 3, 5, 7, D).permute(0, 3, 1, 2)
        pooled = torch.nn.functional.avg_pool2d(img, 2).permute(0, 2, 3, 1).reshape(2, 3, 6, D)
        assert x2.shape == (2, 3, 35 + 6, D)
        assert torch.equal(x2[:, :, :35], x)
        assert torch.allclose(x2[:, :, 35:], pooled, atol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    (dict(height=4, width=4, pool=0), "pool must be a positive int, got 0"),
    (dict(height=4, width=5, pool=2), "k and v must hold height*width = 20 tokens, got 16 and 16"),
    (dict(height=2, width=8, pool=4), "pool 4 exceeds the map 2 x 8"),
])
def test_hilo_kv_errors(kwargs, message):
    k = torch.randn(1, 1, 16, 4)
    with pytest.raises(helpers.HelperError, match=message.replace("*", r"\*")):
        helpers.hilo_kv(k, k, **kwargs)


def test_hilo_lengths_are_checked():
    p = attncc.load("specs/hilo.attn", height=4, width=6, pool=2, hifi_heads=1, heads=2)
    kern = attncc.compile(p, backend="dense")
    q = torch.randn(1, 2, 24, 8)
    with pytest.raises(attncc.SpecError, match="the key layout has 30 tokens, but k has sequence "
                                                "length 24"):
        kern(q, q, q)


@pytest.mark.parametrize("text, message", [
    ("layout q_grid(y = 4)\nmask true\n",
     "separate layouts need a query and a key layout; the key layout (k_grid or k_tokens) is "
     "missing"),
    ("layout q_grid(y = 4)\nlayout k_grid(z = 2)\nmask q.y == k.y\n",
     "unknown segment or axis 'y' of the key layout (it has grid, z)"),
    ("layout q_grid(y = 4)\nlayout k_grid(z = 2)\nmask neighborhood(1)\n",
     "'neighborhood' places each query on the key grid axis by axis: the query and key grids "
     "need the same axes (query grid: y; key grid: z)"),
    ("layout q_grid(y = 4)\nlayout k_grid(y = 2)\nlayout tokens(t = 1)\nmask true\n",
     "'tokens' cannot be combined with q_grid / k_grid layouts"),
])
def test_two_grid_misuse_is_a_located_error(text, message):
    with pytest.raises(attncc.SpecError) as e:
        attncc.parse("pattern bad\n" + text, filename="bad.attn")
    assert str(e.value).splitlines()[0].split(": error: ", 1)[1] == message


def test_blocked_on_a_one_axis_grid_after_tokens_uses_grid_coordinates():
    p = attncc.parse("pattern b\nlayout tokens(t = 3)\nlayout grid(x = 8)\nmask blocked(4)\n")
    i, j = torch.arange(11)[:, None], torch.arange(11)[None, :]
    want = (i >= 3) & (j >= 3) & ((i - 3) // 4 == (j - 3) // 4)
    assert torch.equal(p.dense_mask()[0, 0], want)
