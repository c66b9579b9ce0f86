"""Compiled Triton kernels on CUDA against the float64 reference (bf16/fp16/fp32).

Every test here is marked `gpu` and skipped without a CUDA device (tests/conftest.py); the
same kernels are checked on CPU through the Triton interpreter in test_verify.py.
"""
import os

import pytest
import torch

import attncc
from attncc.runtime.verify import verify

pytestmark = pytest.mark.gpu

SPECS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "specs")

CASES = [
    ("causal", {}, dict(q_len=1000, kv_len=1000)),
    ("causal", {}, dict(q_len=257, kv_len=999)),          # bottom-right alignment, tails
    ("sliding_window", {"window": 100}, dict(q_len=1500)),
    ("chunked", {"chunk": 96}, dict(q_len=700)),
    ("document", {}, dict(q_len=1024)),
    ("softcap", {}, dict(q_len=500)),
    ("alibi", {}, dict(q_len=500)),
    ("moh", {}, dict(q_len=600)),
    ("moa", {}, dict(q_len=1200)),
    ("longformer", {"radius": 64, "globals": 2}, dict(q_len=900)),
    ("natten1d", {"kernel": 13, "dilation": 2}, dict(q_len=777)),
    ("natten2d", {"height": 32, "width": 40, "kernel": 7}, {}),
    ("natten3d", {"depth": 6, "height": 16, "width": 16, "kernel_t": 3, "kernel": 5}, {}),
    ("gna", {"height": 48, "width": 48, "kernel": 16, "stride": 8}, {}),
    ("maxvit_block", {"height": 28, "width": 28, "window": 7}, {}),
    ("biformer", {"height": 32, "width": 32, "region": 8, "topk": 4}, {}),
    ("seer_gate", {"block": 64, "keep": 0.2}, dict(q_len=1000)),
]


def _id(case):
    name, params, shape = case
    return name + "-" + "-".join(f"{k}{v}" for k, v in {**params, **shape}.items())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_triton_matches_reference(case, dtype):
    name, params, shape = case
    p = attncc.load(os.path.join(SPECS, name + ".attn"), **params)
    heads = 8 if name == "moa" else 4
    r = verify(p, backend="triton", dtype=dtype, device="cuda", batch=2, heads=heads,
               kv_heads=heads // 2, head_dim=64, **shape)
    assert r.ok, f"\n{r}"


@pytest.mark.parametrize("head_dim", [32, 64, 128])
def test_triton_head_dims_fp32(head_dim):
    p = attncc.load(os.path.join(SPECS, "sliding_window.attn"), window=77)
    r = verify(p, backend="triton", dtype=torch.float32, device="cuda", q_len=333,
               head_dim=head_dim)
    assert r.ok, f"\n{r}"


def test_triton_noncontiguous_and_autograd():
    kern = attncc.compile(os.path.join(SPECS, "causal.attn"))
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, 300, 4, 64, device="cuda", generator=g).transpose(1, 2).half()
    k = torch.randn(2, 300, 2, 64, device="cuda", generator=g).transpose(1, 2).half()
    v = torch.randn(2, 300, 2, 64, device="cuda", generator=g).transpose(1, 2).half()
    assert kern.backend is None and not q.is_contiguous()
    out = kern(q, k, v)
    ref = attncc.reference(kern.pattern, q, k, v)
    torch.testing.assert_close(out.double(), ref, atol=1e-2, rtol=1e-2)
    q.requires_grad_()
    kern(q, k, v).float().sum().backward()
    qd = q.detach().double().requires_grad_()
    attncc.reference(kern.pattern, qd, k.double(), v.double()).sum().backward()
    torch.testing.assert_close(q.grad.double(), qd.grad, atol=2e-2, rtol=2e-2)


def test_triton_autotune_keeps_a_valid_config():
    p = attncc.load(os.path.join(SPECS, "natten2d.attn"), height=32, width=32, kernel=7)
    kern = attncc.compile(p, autotune=True)
    r = verify(kern, dtype=torch.bfloat16, device="cuda", head_dim=64)
    assert r.ok, f"\n{r}"
    (tuned,) = kern._tuned.values()
    from attncc.runtime import compile as rc
    assert (tuned.num_warps, tuned.num_stages) in rc.AUTOTUNE_CONFIGS


GRAD_CASES = [("causal", {}, dict(q_len=517)), ("sliding_window", {"window": 100}, dict(q_len=700)),
              ("document", {}, dict(q_len=512)), ("softcap", {}, dict(q_len=300)),
              ("natten2d", {"height": 24, "width": 24, "kernel": 7}, {}),
              ("moh", {}, dict(q_len=300))]


@pytest.mark.parametrize("backend", ["triton", "flex", "torch"])
@pytest.mark.parametrize("case", GRAD_CASES, ids=_id)
def test_gradients_on_cuda_match_reference(case, backend):
    # Generated dQ/dK/dV kernels (triton), FlexAttention's own backward (flex) and the torch
    # block-sparse backward, each against autograd through the float64 reference.
    name, params, shape = case
    p = attncc.load(os.path.join(SPECS, name + ".attn"), **params)
    r = verify(p, backend=backend, dtype=torch.float32, device="cuda", batch=2, heads=4,
               kv_heads=2, head_dim=64, grad=True, **shape)
    assert r.ok, f"\n{r}"


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_backward_on_cuda_is_bit_identical(backend):
    # Deterministic gradients on the device: the generated kernels sum GQA heads and table
    # gradients in a fixed order; the torch backend accumulates dK/dV without atomics.
    p = attncc.parse("pattern rb(maxd = 64)\ninput bias: float[h, 2 * maxd + 1]\n"
                     "mask causal & q - k < 200\nscore s + bias[h, clamp(q - k, 0, 2 * maxd)]\n")
    kern = attncc.compile(p, backend=backend)
    g = torch.Generator(device="cuda").manual_seed(0)
    base = [torch.randn(2, s, 700, 64, device="cuda", generator=g) for s in (8, 2, 2)]
    bias0 = torch.randn(8, 129, device="cuda", generator=g)
    runs = []
    for _ in range(2):
        q, k, v = (t.clone().requires_grad_() for t in base)
        bias = bias0.clone().requires_grad_()
        kern(q, k, v, bias=bias).sum().backward()
        runs.append([q.grad, k.grad, v.grad, bias.grad])
    for a, b in zip(*runs):
        assert torch.equal(a, b)
