"""`kern(q, k, v, return_block_scores=β)`: SeerAttention's block-level ground truth (pooled
softmax probabilities) against the pooled dense softmax written out here."""
import os

import pytest
import torch
import torch.nn.functional as F

import attncc
from attncc.ir.inputs import InputError

SPECS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "specs")


def dense_probs(q, k, keep, scale, score=None):
    g = q.shape[1] // k.shape[1]
    s = q.double() @ k.double().repeat_interleave(g, 1).transpose(-1, -2) * scale
    if score is not None:
        s = score(s)
    p = torch.softmax(s.masked_fill(~keep, float("-inf")), -1)
    return p.nan_to_num(0.0)


def mean_pool(p, beta):
    B, H, Lq, Lk = p.shape
    nq, nk = -(-Lq // beta), -(-Lk // beta)
    out = torch.zeros(B, H, nq, nk, dtype=p.dtype)
    for i in range(nq):
        for j in range(nk):
            out[:, :, i, j] = p[:, :, i * beta:(i + 1) * beta, j * beta:(j + 1) * beta].mean((-1, -2))
    return out


def test_max_and_mean_pooled_probabilities(backend="torch"):
    p = attncc.parse("pattern w(heads = 2)\nmask causal & q - k < 40\nscore softcap(s, 5.0)\n")
    gen = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 4, 70, 8, generator=gen), torch.randn(2, 2, 70, 8, generator=gen), \
        torch.randn(2, 2, 70, 8, generator=gen)
    kern = attncc.compile(p, backend=backend)
    out, scores = kern(q, k, v, return_block_scores=16)
    i, j = torch.arange(70).view(-1, 1), torch.arange(70).view(1, -1)
    probs = dense_probs(q, k, (j <= i) & (i - j < 40), 8 ** -0.5, lambda s: 5.0 * torch.tanh(s / 5.0))
    expect = F.max_pool2d(probs, 16, ceil_mode=True)
    assert scores.shape == (2, 4, 5, 5) and scores.dtype == torch.float32
    torch.testing.assert_close(scores.double(), expect, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.double(), attncc.reference(p, q, k, v), rtol=1e-4, atol=1e-4)
    out2, lse, scores = kern(q, k, v, return_block_scores=16, block_scores_pool="mean",
                             return_lse=True)
    torch.testing.assert_close(scores.double(), mean_pool(probs, 16), rtol=1e-4, atol=1e-6)
    assert lse.shape == (2, 4, 70)


def test_block_gate_pattern_and_empty_rows():
    p = attncc.load(os.path.join(SPECS, "seer_gate.attn"), block=16, keep=0.5)
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 64, 8, generator=gen) for _ in range(3))
    gate = torch.randn(1, 2, 4, 4, generator=gen)
    _, scores = attncc.compile(p, backend="torch")(q, k, v, gate=gate, return_block_scores=16)
    keep = p.dense_mask(64, 64, heads=2, inputs={"gate": gate})
    probs = dense_probs(q, k, keep, 8 ** -0.5)
    torch.testing.assert_close(scores.double(), F.max_pool2d(probs, 16), rtol=1e-4, atol=1e-5)
    # blocks the gate dropped have probability 0
    assert (scores[~keep.view(1, 2, 4, 16, 4, 16).any(-1).any(-2)] == 0).all()


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
