"""`kern(q, k, v, return_block_scores=β)`: SeerAttention's block-level ground truth (pooled
softmax probabilities) against the pooled dense float64 softmax written out here, on the
generated kernel's own pass (interpret), the torch tile pass and the dense reference."""
import os

import pytest
import torch
import torch.nn.functional as F

import attncc
from attncc.ir.inputs import InputError

SPECS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "specs")


def dense_probs(q, k, keep, scale, score=None):
    """float64 softmax probabilities [B, Hq, Lq, Lkv] (0 where masked or on empty rows)."""
    g = q.shape[1] // k.shape[1]
    s = q.double() @ k.double().repeat_interleave(g, 1).transpose(-1, -2) * scale
    if score is not None:
        s = score(s)
    p = torch.softmax(s.masked_fill(~keep, float("-inf")), -1)
    return p.nan_to_num(0.0)


def max_pool(p, beta):
    return F.max_pool2d(p, beta, ceil_mode=True)


def mean_pool(p, beta):
    """Mean over each block's real (query, key) pairs (border blocks are smaller)."""
    B, H, Lq, Lk = p.shape
    nq, nk = -(-Lq // beta), -(-Lk // beta)
    out = torch.zeros(B, H, nq, nk, dtype=p.dtype)
    for i in range(nq):
        for j in range(nk):
            out[:, :, i, j] = p[:, :, i * beta:(i + 1) * beta, j * beta:(j + 1) * beta].mean((-1, -2))
    return out


def _qkv(seed, B=2, Hq=4, Hkv=2, Lq=70, Lkv=70, D=8):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, Lq, D, generator=gen), torch.randn(B, Hkv, Lkv, D, generator=gen),
            torch.randn(B, Hkv, Lkv, D, generator=gen))


WINDOW = "pattern w(heads = 2)\nmask causal & q + KV_LEN - Q_LEN - k < 40\nscore softcap(s, 5.0)\n"


def _window_probs(q, k):
    Lq, Lkv = q.shape[2], k.shape[2]
    i, j = torch.arange(Lq).view(-1, 1) + (Lkv - Lq), torch.arange(Lkv).view(1, -1)
    return dense_probs(q, k, (j <= i) & (i - j < 40), q.shape[-1] ** -0.5,
                       lambda s: 5.0 * torch.tanh(s / 5.0))


# β = 16 and 32 divide 16-token tiles (kernel pass; 32 with tiles of 32 as well), 24 has no
# power-of-two divisor >= 16 (tile pass after the kernel's forward).
@pytest.mark.parametrize("backend,beta,how", [
    ("interpret", 16, "kernel"), ("interpret", 32, "kernel"), ("interpret", 24, "tiles"),
    ("torch", 16, "tiles"), ("torch", 24, "tiles"), ("reference", 16, "dense"),
    ("flex", 32, "tiles")])
@pytest.mark.parametrize("lens", [(70, 70), (45, 70)])
def test_pooled_probabilities_match_dense_softmax(backend, beta, how, lens):
    p = attncc.parse(WINDOW)
    q, k, v = _qkv(0, Lq=lens[0], Lkv=lens[1])
    kern = attncc.compile(p, backend=backend, block_m=32, block_n=32)
    probs = _window_probs(q, k)
    nq, nk = -(-lens[0] // beta), -(-lens[1] // beta)
    out, scores = kern(q, k, v, return_block_scores=beta)
    assert kern.last_block_scores == how
    assert scores.shape == (2, 4, nq, nk) and scores.dtype == torch.float32
    torch.testing.assert_close(scores.double(), max_pool(probs, beta), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.double(), attncc.reference(p, q, k, v), rtol=1e-4, atol=1e-4)
    out2, lse, mean = kern(q, k, v, return_block_scores=beta, block_scores_pool="mean",
                           return_lse=True)
    torch.testing.assert_close(mean.double(), mean_pool(probs, beta), rtol=1e-4, atol=1e-7)
    assert lse.shape == (2, 4, lens[0])


def test_kernel_pass_is_deterministic_and_skips_no_kept_tile():
    """Two runs of the kernel's mean pass are bit-identical; blocks with a kept pair are > 0
    and blocks without one are exactly 0."""
    p = attncc.parse("pattern c\nmask causal\n")
    q, k, v = _qkv(3, Lq=100, Lkv=100)
    kern = attncc.compile(p, backend="interpret", block_m=16, block_n=16)
    a = kern(q, k, v, return_block_scores=32, block_scores_pool="mean")[1]
    b = kern(q, k, v, return_block_scores=32, block_scores_pool="mean")[1]
    assert kern.last_block_scores == "kernel"
    assert torch.equal(a, b)
    upper = torch.triu(torch.ones(4, 4, dtype=torch.bool), 1)
    assert (a[..., upper] == 0).all() and (a[..., ~upper] > 0).all()


def test_block_gate_pattern_and_empty_rows():
    p = attncc.load(os.path.join(SPECS, "seer_gate.attn"), block=16, keep=0.5)
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 64, 8, generator=gen) for _ in range(3))
    gate = torch.randn(1, 2, 4, 4, generator=gen)
    keep = p.dense_mask(64, 64, heads=2, inputs={"gate": gate})
    probs = dense_probs(q, k, keep, 8 ** -0.5)
    for backend in ("interpret", "torch"):
        kern = attncc.compile(p, backend=backend, block_m=16, block_n=16)
        _, scores = kern(q, k, v, gate=gate, return_block_scores=16)
        torch.testing.assert_close(scores.double(), max_pool(probs, 16), rtol=1e-4, atol=1e-6)
        _, mean = kern(q, k, v, gate=gate, return_block_scores=32, block_scores_pool="mean")
        torch.testing.assert_close(mean.double(), mean_pool(probs, 32), rtol=1e-4, atol=1e-7)
        # blocks the gate dropped have probability 0
        assert (scores[~keep.view(1, 2, 4, 16, 4, 16).any(-1).any(-2)] == 0).all()


@pytest.mark.parametrize("tile_1d,how", [(False, "tiles"), (True, "kernel")])
def test_grid_pattern(tile_1d, how):
    """A grid pattern's box tiles do not align with runs of β tokens: the kernel's forward,
    then the tile pass; with 1-D tiles requested the kernel pools them itself."""
    p = attncc.parse("pattern n\nlayout grid(y = 8, x = 12)\nmask neighborhood(3)\n")
    q, k, v = _qkv(5, B=1, Hq=2, Hkv=2, Lq=96, Lkv=96)
    keep = p.dense_mask(96, 96)
    probs = dense_probs(q, k, keep, 8 ** -0.5)
    kern = attncc.compile(p, backend="interpret", tile_1d=tile_1d)
    _, scores = kern(q, k, v, return_block_scores=32)
    assert kern.last_block_scores == how
    torch.testing.assert_close(scores.double(), max_pool(probs, 32), rtol=1e-4, atol=1e-6)


def test_gradients_still_flow_and_the_default_cpu_choice_pools_over_tiles():
    p = attncc.parse(WINDOW)
    q, k, v = _qkv(2)
    q.requires_grad_(True)
    kern = attncc.compile(p)                        # CPU, no backend: the cost rule picks
    out, scores = kern(q, k, v, return_block_scores=16)
    assert kern.last_backend == "torch" and kern.last_block_scores == "tiles"
    assert "block scores" in kern.last_choice.reason
    assert not scores.requires_grad
    torch.testing.assert_close(scores.double(), max_pool(_window_probs(q.detach(), k), 16),
                               rtol=1e-4, atol=1e-6)
    out.sum().backward()
    qd = q.detach().double().requires_grad_(True)
    attncc.reference(p, qd, k.double(), v.double()).sum().backward()
    torch.testing.assert_close(q.grad.double(), qd.grad, rtol=1e-4, atol=1e-5)
    # generated kernels under autograd: their forward, then the tile pass
    kern = attncc.compile(p, backend="interpret", block_m=16, block_n=16)
    _, scores = kern(q, k, v, return_block_scores=16)
    assert kern.last_block_scores == "tiles"
    torch.testing.assert_close(scores.double(), max_pool(_window_probs(q.detach(), k), 16),
                               rtol=1e-4, atol=1e-6)


def test_errors():
    kern = attncc.compile("pattern c\nmask causal\n", backend="torch")
    q = torch.randn(1, 1, 8, 4)
    with pytest.raises(InputError, match="return_block_scores must be a positive block size"):
        kern(q, q, q, return_block_scores=0)
    with pytest.raises(InputError, match="block_scores_pool must be 'max' or 'mean'"):
        kern(q, q, q, return_block_scores=4, block_scores_pool="min")
    lin = attncc.compile("pattern l\nmask causal\nnormalize none\n", backend="torch")
    with pytest.raises(InputError, match="needs softmax probabilities"):
        lin(q, q, q, return_block_scores=4)
