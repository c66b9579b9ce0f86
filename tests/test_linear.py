"""`normalize none` (linear attention): language, reference, separability proof, the chunked
linear-time algorithm (torch and Triton under the interpreter), the quadratic fallback and the
recurrent `Kernel.step`, each checked against an independent float64 formula written here."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attncc
from attncc.frontend.format import format_spec
from attncc.frontend.parser import parse_spec
from attncc.ir.inputs import InputError
from attncc.passes.linear import analyze, decide

LIGHTNING = """pattern lightning(heads = 8)
mask    causal
score   s * exp(-exp2(-8.0 * (h + 1) / heads) * (q - k))
normalize none
"""


def spec(mask="causal", score=None, extra="", heads=4):
    text = f"pattern lin(heads = {heads})\nmask {mask}\n"
    text += f"score {score}\n" if score else ""
    return attncc.parse(text + "normalize none\n" + extra)


def decayed(q, k, v, lam, scale, c=None, offset=0):
    """Independent formula: out[i] = c_h Σ_{j <= i + offset} λ_h^(i - j) scale (q_i·k_j) v_j in
    float64 (GQA by repeat), with λ_h given per query head."""
    q, k, v = (t.detach().to(torch.float64) for t in (q, k, v))
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    i = torch.arange(q.shape[2]).view(-1, 1)
    j = torch.arange(k.shape[2]).view(1, -1)
    lam = torch.as_tensor(lam, dtype=torch.float64).view(1, -1, 1, 1)
    dist = (i - j).to(torch.float64)
    w = torch.where(j <= i + offset, lam ** dist, torch.zeros((), dtype=torch.float64))
    out = (torch.einsum("bhid,bhjd->bhij", q, k) * scale * w) @ v
    if c is not None:
        out = out * torch.as_tensor(c, dtype=torch.float64).view(1, -1, 1, 1)
    return out


def lightning_decay(heads):
    return [math.exp(-2.0 ** (-8.0 * (h + 1) / heads)) for h in range(heads)]


def qkv(B, Hq, Hkv, Lq, Lkv, D, Dv, seed=0, dtype=torch.float32, grad=False):
    gen = torch.Generator().manual_seed(seed)
    out = [torch.randn(B, Hq, Lq, D, generator=gen), torch.randn(B, Hkv, Lkv, D, generator=gen),
           torch.randn(B, Hkv, Lkv, Dv, generator=gen)]
    return [t.to(dtype).requires_grad_(grad) for t in out]


# ---- language ---------------------------------------------------------------------------------

def test_parse_print_round_trip_and_ir():
    ast = parse_spec(LIGHTNING)
    assert parse_spec(format_spec(ast)) == ast
    assert "normalize none" in format_spec(ast)
    p = attncc.parse(LIGHTNING)
    assert p.normalize == "none" and "normalize none" in p.ir_text()
    soft = attncc.parse(LIGHTNING.replace("normalize none\n", ""))
    assert soft.normalize == "softmax" and "normalize" not in soft.ir_text()
    assert attncc.parse(LIGHTNING.replace("none", "softmax")).ir_hash() == soft.ir_hash()


def test_normalize_errors():
    with pytest.raises(attncc.SpecError) as e:
        attncc.parse("pattern x\nmask causal\nnormalize nome\n", filename="x.attn")
    text = str(e.value)
    assert "x.attn:3:11: error: unknown normalization 'nome'" in text
    assert "did you mean 'none'" in text
    with pytest.raises(attncc.SpecError) as e:
        attncc.parse("pattern x\nmask causal\nnormalize none\nnormalize none\n", filename="x.attn")
    assert "x.attn:4:1: error: duplicate normalize clause" in str(e.value)


def test_reference_matches_formula_and_lse():
    p = attncc.parse(LIGHTNING, heads=4)
    q, k, v = qkv(2, 4, 2, 19, 19, 8, 5, dtype=torch.float64)
    out, lse = attncc.reference(p, q, k, v, scale=0.5, return_lse=True)
    torch.testing.assert_close(out, decayed(q, k, v, lightning_decay(4), 0.5), rtol=1e-12, atol=1e-12)
    assert torch.equal(lse, torch.zeros_like(lse))
    # causal with a shorter key sequence: the first queries see nothing (output 0, lse -inf)
    q, k, v = qkv(1, 4, 4, 9, 5, 8, 5, dtype=torch.float64)
    out, lse = attncc.reference(p, q, k, v, return_lse=True)
    assert torch.isneginf(lse[..., :4]).all() and (lse[..., 4:] == 0).all()
    assert (out[..., :4, :] == 0).all()


# ---- the separability proof ----------------------------------------------------------------------

@pytest.mark.parametrize("mask,score,linear,why", [
    ("causal", None, True, "separable"),
    ("causal", "s * exp(-exp2(-8.0 * (h + 1) / heads) * (q - k))", True, "separable"),
    ("k <= q", "2.0 * s / exp2(0.5 * (q - k)) * (h + 1)", True, "separable"),
    ("q >= k + 2", "s * exp(0.25 * (k - q) - 1.0)", True, "separable"),
    ("causal & q - k < 8", None, False, "not a causal diagonal"),
    ("k < q | k == 0", None, False, "not a causal diagonal"),
    ("causal", "s * exp(0.1 * (q - k))", False, "decay r_h = 1.10517 > 1"),
    ("causal", "s * s", False, "exactly once"),
    ("causal", "tanh(s)", False, "tanh(s)"),
    ("causal", "s * exp(-0.1 * (q + k))", False, "not a function of q - k"),
    ("causal", "s * exp(-0.1 * (q - k) * (q - k))", False, "not affine"),
    ("causal", "1.0 / s", False, "divides by an expression of s"),
])
def test_separability_decisions(mask, score, linear, why):
    dec, _ = decide(spec(mask, score), 4, 16, 16)
    assert dec.linear is linear
    assert why in dec.reason


def test_per_head_decay_and_constants():
    dec, (c, log_r) = decide(attncc.parse(LIGHTNING, heads=6), 6, 10, 10)
    assert dec.linear
    torch.testing.assert_close(log_r.exp(), torch.tensor(lightning_decay(6), dtype=torch.float64))
    assert torch.equal(c, torch.ones(6, dtype=torch.float64))
    dec, (c, log_r) = decide(spec("k <= q", "2.0 * s / exp2(0.5 * (q - k) + 1.0) * (h + 1)"), 3, 4, 4)
    torch.testing.assert_close(c, torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    torch.testing.assert_close(log_r, torch.full((3,), -0.5 * math.log(2), dtype=torch.float64))
    assert analyze(attncc.parse(LIGHTNING.replace("normalize none\n", ""))).linear is False
    # an output scale is not handled by the linear algorithm
    p = spec(extra="input w: float[b, q, h]\noutput scale w[b, q, h]\n")
    assert "output scale" in analyze(p).reason


# ---- the linear algorithm: torch path, output and gradients --------------------------------------

@settings(max_examples=12)
@given(heads=st.sampled_from([1, 2, 4]), group=st.sampled_from([1, 2]),
       decay=st.floats(0.0, 3.0), L=st.integers(1, 150), block=st.sampled_from([16, 32, 64]),
       kv_extra=st.sampled_from([0, 0, 3, -3]), seed=st.integers(0, 3))
def test_linear_torch_matches_formula(heads, group, decay, L, block, kv_extra, seed):
    hq = heads * group
    Lq, Lkv = L, max(1, L + kv_extra)
    p = spec("causal", f"s * exp(-{decay!r} * (h + 1) / heads * (q - k))", heads=hq)
    kern = attncc.compile(p, backend="torch", block_m=block)
    q, k, v = qkv(2, hq, heads, Lq, Lkv, 8, 6, seed=seed, grad=True)
    out = kern(q, k, v)
    assert kern.last_algorithm.linear
    lam = [math.exp(-decay * (h + 1) / hq) for h in range(hq)]
    ref = decayed(q, k, v, lam, 8 ** -0.5, offset=Lkv - Lq)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 7))
    out.backward(g)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    decayed_ad(leaves, lam, 8 ** -0.5, Lkv - Lq).backward(g.double())
    for t, r in zip((q, k, v), leaves):
        torch.testing.assert_close(t.grad.double(), r.grad, rtol=1e-4, atol=1e-4)


def decayed_ad(leaves, lam, scale, offset):
    """`decayed` written with differentiable ops (no detach)."""
    q, k, v = leaves
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    i = torch.arange(q.shape[2]).view(-1, 1)
    j = torch.arange(k.shape[2]).view(1, -1)
    w = torch.where(j <= i + offset, torch.tensor(lam, dtype=torch.float64).view(1, -1, 1, 1)
                    ** (i - j).to(torch.float64), torch.zeros((), dtype=torch.float64))
    return (q @ k.transpose(-1, -2) * scale * w) @ v


def test_chunked_backward_gradcheck():
    """The chunked algorithm's own backward (reverse state scan) against finite differences."""
    from attncc.runtime.linear import chunked_linear
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 2, 21, 3, generator=gen, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    log_r = torch.tensor([-0.3, 0.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b, c: chunked_linear(a, b, c, log_r, 8)[0], (q, k, v))


def test_linear_bfloat16_and_float64():
    p = attncc.parse(LIGHTNING, heads=2)
    q, k, v = qkv(1, 2, 2, 70, 70, 16, 16, dtype=torch.float64)
    out = attncc.compile(p, backend="torch")(q, k, v)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, decayed(q, k, v, lightning_decay(2), 0.25), rtol=1e-10, atol=1e-10)
    qb, kb, vb = (t.to(torch.bfloat16) for t in (q, k, v))
    out = attncc.compile(p, backend="torch")(qb, kb, vb)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), decayed(qb, kb, vb, lightning_decay(2), 0.25),
                               rtol=2e-2, atol=2e-2)


# ---- non-separable specs fall back to the quadratic path -------------------------------------------

@pytest.mark.parametrize("mask,score", [
    ("causal & q - k < 20", "s * exp(-0.1 * (q - k))"),     # causal band
    ("causal & q - k < 7", None),
    ("causal", "s * exp(0.05 * (q - k))"),                  # decay > 1
    ("abs(q - k) <= 9", "tanh(s)"),
    ("causal", "s * s"),
])
@pytest.mark.parametrize("backend", ["torch", "interpret"])
def test_fallback_matches_reference(mask, score, backend):
    p = spec(mask, score)
    kern = attncc.compile(p, backend=backend, block_m=16, block_n=16)
    q, k, v = qkv(1, 4, 2, 45, 45, 8, 8, seed=1, grad=True)
    out, lse = kern(q, k, v, return_lse=True)
    assert kern.last_algorithm.linear is False
    if backend == "interpret":  # gradients by the generated dQ and dK/dV kernels
        assert "normalize none: the weights are the scores" in kern.backward_source
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = attncc.reference(p, *leaves, return_lse=True)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g.double())
    for t, r in zip((q, k, v), leaves):
        torch.testing.assert_close(t.grad.double(), r.grad, rtol=1e-4, atol=1e-4)


def test_generated_backward_without_softmax_table_gqa_and_lengths():
    """Non-separable `normalize none` trains through the generated kernels: a learned table in
    the score (its gradient too), GQA 2:1, Lq != Lkv, a band that leaves rows empty."""
    p = attncc.parse("pattern nb\ninput bias: float[h, 64]\nmask q - k < 20 & k - q < 9 & q >= 3\n"
                     "score tanh(s) * exp(-0.1 * abs(q - k)) + bias[h, clamp(q - k + 30, 0, 63)]\n"
                     "normalize none\n")
    kern = attncc.compile(p, backend="interpret", block_m=16, block_n=16)
    q, k, v = qkv(1, 4, 2, 37, 41, 16, 16, seed=3, grad=True)
    bias = torch.randn(4, 64, generator=torch.Generator().manual_seed(4), requires_grad=True)
    out = kern(q, k, v, bias=bias)
    leaves = [q, k, v, bias]
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, g)
    rl = [t.detach().double().requires_grad_() for t in leaves]
    ref = attncc.reference(p, *rl[:3], bias=rl[3])
    want = torch.autograd.grad(ref, rl, g.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    assert not out[:, :, :3].any()
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mask,score", [
    ("causal & q - k < 20", "s * exp(-0.1 * (q - k))"),
    ("k < 5", "2.0"),
])
def test_generated_kernel_without_softmax(mask, score):
    """Without gradients the interpreter runs the generated block-sparse kernel with the
    no-softmax key-tile step (codegen/none_step.py)."""
    p = spec(mask, score)
    kern = attncc.compile(p, backend="interpret", block_m=16, block_n=16)
    q, k, v = qkv(1, 4, 2, 45, 45, 8, 8, seed=5)
    out, lse = kern(q, k, v, return_lse=True)
    assert "No softmax (normalize none)" in kern.source_for(kern.schedule(45, 45, 4))
    ref, ref_lse = attncc.reference(p, q.double(), k.double(), v.double(), return_lse=True)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lse.double(), ref_lse)


def test_fallback_band_formula():
    """A causal band with decay (not separable) against the independent formula."""
    p = spec("causal & q - k < 5", "s * exp(-0.3 * (q - k))")
    q, k, v = qkv(1, 4, 4, 33, 33, 8, 8, seed=2)
    out = attncc.compile(p, backend="torch", block_m=16, block_n=16)(q, k, v)
    i = torch.arange(33).view(-1, 1)
    j = torch.arange(33).view(1, -1)
    band = decayed(q, k, v, [math.exp(-0.3)] * 4, 8 ** -0.5) - decayed(
        q, k, v, [math.exp(-0.3)] * 4, 8 ** -0.5, offset=-5)
    torch.testing.assert_close(out.double(), band, rtol=1e-4, atol=1e-4)
    assert ((i - j) < 5).any()


# ---- Triton linear kernel (interpreter) -----------------------------------------------------------

def test_linear_triton_interpret():
    """Triton forward and backward kernels (codegen/linear.py) under the interpreter: a partial
    tail block, two value-channel slices, GQA (2 query heads on 1 key head)."""
    L, D, Dv = 45, 16, 40
    p = attncc.parse(LIGHTNING, heads=2)
    kern = attncc.compile(p, backend="interpret")
    q, k, v = qkv(1, 2, 1, L, L, D, Dv, seed=3, grad=True)
    out = kern(q, k, v)
    assert kern.last_algorithm.linear
    ref = decayed(q, k, v, lightning_decay(2), D ** -0.5)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    g = torch.randn_like(out)
    out.backward(g)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    decayed_ad(leaves, lightning_decay(2), D ** -0.5, 0).backward(g.double())
    for t, r in zip((q, k, v), leaves):
        torch.testing.assert_close(t.grad.double(), r.grad, rtol=1e-4, atol=1e-4)


def test_triton_source_parses():
    import ast as pyast

    from attncc.codegen.linear import generate_linear_forward
    from attncc.codegen.linear import generate_linear_backward
    src = generate_linear_forward(attncc.CompileOptions())
    pyast.parse(src)
    assert "def attncc_linear_fwd_" in src and "META = " in src
    src = generate_linear_backward(attncc.CompileOptions())
    pyast.parse(src)
    for g in ("dq", "dk", "dv"):
        assert f"def attncc_linear_bwd_{g}_" in src


# ---- recurrent form ---------------------------------------------------------------------------

def test_step_matches_formula():
    p = attncc.parse(LIGHTNING, heads=4)
    kern = attncc.compile(p, backend="torch")
    q, k, v = qkv(2, 4, 2, 41, 41, 8, 6, seed=4)
    state, outs = None, []
    for a, b in [(0, 1), (1, 2), (2, 19), (19, 40), (40, 41)]:
        o, state = kern.step(state, q[:, :, a:b], k[:, :, a:b], v[:, :, a:b])
        outs.append(o)
    assert state.shape == (2, 4, 8, 6) and state.dtype == torch.float32
    torch.testing.assert_close(torch.cat(outs, 2).double(),
                               decayed(q, k, v, lightning_decay(4), 8 ** -0.5), rtol=1e-4, atol=1e-4)
    # the state is Σ_k λ^(t - k) k vᵀ
    lam = torch.tensor(lightning_decay(4), dtype=torch.float64).view(1, 4, 1, 1)
    w = lam ** torch.arange(40, -1, -1, dtype=torch.float64).view(1, 1, -1, 1)
    kk, vv = (t.double().repeat_interleave(2, 1) for t in (k, v))
    torch.testing.assert_close(state.double(), (kk * w).transpose(-1, -2) @ vv, rtol=1e-4, atol=1e-4)


def test_step_errors():
    kern = attncc.compile(spec("causal & q - k < 4"), backend="torch")
    q, k, v = qkv(1, 4, 4, 1, 1, 8, 8)
    with pytest.raises(InputError, match="has no recurrent form: the mask"):
        kern.step(None, q, k, v)
    kern = attncc.compile(attncc.parse(LIGHTNING, heads=4), backend="torch")
    with pytest.raises(InputError, match=r"state must be a tensor \[B, Hq, D, Dv\]"):
        kern.step(torch.zeros(1, 4, 8), q, k, v)


def test_inspect_schedule_names_the_algorithm():
    from attncc.pipeline import Shape, dump
    text = dump("schedule", LIGHTNING, {"heads": 2}, Shape(q_len=100, heads=2))
    assert text.startswith("algorithm: linear, chunked (Lightning Attention-2) "
                           "(q_len=100 kv_len=100 heads=2)\n  why: separable")
    assert "decay r_h: 0.939413, 0.996101" in text
    assert "def attncc_linear_fwd_" in dump("triton", LIGHTNING, {}, Shape(q_len=64))
    text = dump("schedule", "pattern b\nmask causal & q - k < 100\nnormalize none\n", {},
                Shape(q_len=256))
    assert text.startswith("algorithm: quadratic block-sparse, no softmax (q_len=256 kv_len=256 "
                           "heads=1)\n  why: not separable: the mask")
    assert "\nschedule b: q_len=256" in text


def test_decode_refuses_normalize_none():
    kern = attncc.compile(attncc.parse(LIGHTNING, heads=2), backend="torch")
    q = torch.randn(1, 2, 1, 8)
    cache = torch.randn(1, 2, 10, 8)
    with pytest.raises(InputError, match="use Kernel.step"):
        kern.decode(q, cache, cache, torch.tensor([10], dtype=torch.int32))
