"""Float64 reference attention vs a naive loop softmax and vs torch SDPA."""
import importlib
import itertools
import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

import attncc
from attncc.ir.nodes import TRUE, Binary, Const, FCall, Load, Route, Var
from attncc.ir.pattern import Axis, InputDecl, Layout, Pattern

reference_module = importlib.import_module("attncc.reference")
q_, k_, h_, b_ = Var("q"), Var("k"), Var("h"), Var("b")
CAUSAL = Pattern("causal", (), None, (), Binary("le", k_, q_))
DENSE = Pattern("dense", (), None, (), TRUE)


def loop_attention(q, k, v, visible, scale, score=lambda s, b, h, i, j: s,
                   out_scale=lambda b, h, i: 1.0):
    """out, lse by explicit loops; visible(b, h, i, j) -> bool."""
    B, Hq, Lq, D = q.shape
    Lkv, Dv = k.shape[2], v.shape[3]
    ratio = Hq // k.shape[1]
    out = torch.zeros(B, Hq, Lq, Dv, dtype=torch.float64)
    lse = torch.full((B, Hq, Lq), -math.inf, dtype=torch.float64)
    for b, h, i in itertools.product(range(B), range(Hq), range(Lq)):
        scores = {}
        for j in range(Lkv):
            if visible(b, h, i, j):
                s = sum(float(q[b, h, i, d]) * float(k[b, h // ratio, j, d]) for d in range(D))
                scores[j] = score(s * scale, b, h, i, j)
        if not scores:
            continue
        m = max(scores.values())
        z = sum(math.exp(s - m) for s in scores.values())
        lse[b, h, i] = m + math.log(z)
        for j, s in scores.items():
            out[b, h, i] += math.exp(s - m) / z * v[b, h // ratio, j].double()
        out[b, h, i] *= out_scale(b, h, i)
    return out, lse


def rand(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


@given(st.integers(1, 2), st.sampled_from([(1, 1), (2, 2), (4, 2), (3, 1)]), st.integers(1, 9),
       st.integers(1, 9), st.sampled_from([4, 8]), st.integers(0, 1000))
def test_matches_sdpa_dense_and_causal(B, heads, Lq, Lkv, D, seed):
    Hq, Hkv = heads
    q, k, v = rand(B, Hq, Lq, D, seed=seed), rand(B, Hkv, Lkv, D, seed=seed + 1), \
        rand(B, Hkv, Lkv, 5, seed=seed + 2)
    kr, vr = k.repeat_interleave(Hq // Hkv, 1), v.repeat_interleave(Hq // Hkv, 1)
    got = attncc.reference(DENSE, q, k, v)
    assert got.dtype == torch.float64 and got.shape == (B, Hq, Lq, 5)
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, kr, vr), rtol=0, atol=1e-12)
    # bottom-right causal: k <= q + (KV_LEN - Q_LEN)
    off = Binary("add", q_, Binary("sub", Var("KV_LEN"), Var("Q_LEN")))
    causal = Pattern("causal", (), None, (), Binary("le", k_, off))
    allowed = torch.ones(Lq, Lkv, dtype=torch.bool).tril(Lkv - Lq)
    want = F.scaled_dot_product_attention(q, kr, vr, attn_mask=allowed)
    want = torch.where(allowed.any(-1)[:, None], want, torch.zeros_like(want))  # empty rows → 0
    torch.testing.assert_close(attncc.reference(causal, q, k, v), want, rtol=0, atol=1e-12)


def test_matches_loop_with_gqa_scale_and_lse():
    q, k, v = rand(2, 4, 5, 3, seed=1), rand(2, 2, 6, 3, seed=2), rand(2, 2, 6, 2, seed=3)
    out, lse = attncc.reference(CAUSAL, q, k, v, scale=0.7, return_lse=True)
    want, want_lse = loop_attention(q, k, v, lambda b, h, i, j: j <= i, 0.7)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=1e-12)
    with mock.patch.object(reference_module, "_SCORE_ELEMS", 1):  # one head per chunk
        out1, lse1 = attncc.reference(CAUSAL, q, k, v, scale=0.7, return_lse=True)
    assert torch.equal(out1, out) and torch.equal(lse1, lse)


def test_fully_masked_rows_give_zero_and_neg_inf_lse():
    p = Pattern("late", (), None, (), Binary("and", Binary("ge", q_, Const(2)),
                                             Binary("le", k_, q_)))
    q, k, v = rand(1, 2, 4, 4, seed=4), rand(1, 2, 4, 4, seed=5), rand(1, 2, 4, 4, seed=6)
    out, lse = attncc.reference(p, q, k, v, return_lse=True)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.equal(out[:, :, :2], torch.zeros(1, 2, 2, 4, dtype=torch.float64))
    assert torch.isneginf(lse[:, :, :2]).all() and torch.isfinite(lse[:, :, 2:]).all()
    want, want_lse = loop_attention(q, k, v, lambda b, h, i, j: i >= 2 and j <= i, 0.5)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-12)
    empty = Pattern("none", (), None, (), Binary("lt", k_, Const(0)))
    out, lse = attncc.reference(empty, q, k, v, return_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


def test_softcap_score_modifier_applies_before_masking():
    cap = 0.3
    score = Binary("mul", Const(cap), FCall("tanh", (Binary("div", Var("s"), Const(cap)),)))
    p = Pattern("softcap", (), None, (), CAUSAL.mask, score=score)
    q, k, v = rand(1, 2, 5, 4, seed=7) * 3, rand(1, 2, 5, 4, seed=8) * 3, rand(1, 2, 5, 3, seed=9)
    out, lse = attncc.reference(p, q, k, v, return_lse=True)
    want, want_lse = loop_attention(q, k, v, lambda b, h, i, j: j <= i, 0.5,
                                    score=lambda s, *_: cap * math.tanh(s / cap))
    torch.testing.assert_close(out, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=1e-12)
    assert not torch.allclose(out, attncc.reference(CAUSAL, q, k, v))


def test_score_bias_table_and_output_scale_inputs():
    # score s + bias[h, q - k + KV_LEN - 1]; output scaled by weight[b, q, h]
    idx = Binary("add", Binary("sub", q_, k_), Binary("sub", Var("KV_LEN"), Const(1)))
    score = Binary("add", Var("s"), Load("bias", (h_, idx), "float"))
    out_scale = Load("weight", (b_, q_, h_), "float")
    decls = (InputDecl("bias", "float", ("h", 9)), InputDecl("weight", "float", ("b", "q", "h")))
    p = Pattern("moh", (), None, decls, CAUSAL.mask, score=score, output_scale=out_scale)
    B, H, Lq, Lkv = 2, 2, 4, 5
    q, k, v = rand(B, H, Lq, 3, seed=10), rand(B, 1, Lkv, 3, seed=11), rand(B, 1, Lkv, 2, seed=12)
    bias, weight = rand(H, 9, seed=13), rand(B, Lq, H, seed=14, dtype=torch.float32)
    weight[0, 1, 1] = 0.0
    out = attncc.reference(p, q, k, v, bias=bias, weight=weight)
    want, _ = loop_attention(q, k, v, lambda b, h, i, j: j <= i, 1 / math.sqrt(3),
                             score=lambda s, b, h, i, j: s + float(bias[h, i - j + Lkv - 1]),
                             out_scale=lambda b, h, i: float(weight[b, i, h]))
    torch.testing.assert_close(out, want, rtol=0, atol=1e-12)
    assert torch.equal(out[0, 1, 1], torch.zeros(2, dtype=torch.float64))


def test_route_pattern_and_pattern_holder():
    layout = Layout((Axis("y", 4), Axis("x", 4)))
    p = Pattern("biformer", (), layout, (), Route((2, 2), 2))
    q, k, v = rand(1, 2, 16, 4, seed=15), rand(1, 2, 16, 4, seed=16), rand(1, 2, 16, 4, seed=17)
    mask = p.dense_mask(heads=2, inputs={"query": q, "key": k})
    assert int(mask[0, 0].sum()) == 16 * 8  # two 2x2 regions of 4 tokens kept per query

    class Holder:
        pattern = p
    got = attncc.reference(Holder(), q, k, v)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_low_precision_inputs_give_float64_output():
    q, k, v = (rand(1, 1, 3, 4, seed=s, dtype=torch.bfloat16) for s in (18, 19, 20))
    got = attncc.reference(CAUSAL, q, k, v)
    want, _ = loop_attention(q.double(), k.double(), v.double(), lambda b, h, i, j: j <= i, 0.5)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_errors():
    q = rand(1, 2, 12, 4)
    grid = Pattern("g", (), Layout((Axis("y", 3), Axis("x", 3))), (), TRUE)
    with pytest.raises(ValueError) as e:
        attncc.reference(grid, q, q, q)
    assert str(e.value) == ("q_len=12 does not match the layout grid(y = 3, x = 3) of pattern "
                            "'g' (9 tokens)")
    with pytest.raises(TypeError) as e:
        attncc.reference("causal", q, q, q)
    assert str(e.value) == "expected an attncc Pattern (or an object with a .pattern), got str"
    with pytest.raises(ValueError) as e:
        attncc.reference(CAUSAL, q, q, q, doc=torch.zeros(1))
    assert str(e.value).startswith("unknown input 'doc' for pattern 'causal'")


def test_spec_text_softcap_and_moh():
    p = attncc.load("specs/softcap.attn", cap=0.4)
    q, k, v = rand(1, 2, 5, 4, seed=21) * 2, rand(1, 2, 5, 4, seed=22) * 2, rand(1, 2, 5, 3, seed=23)
    want, _ = loop_attention(q, k, v, lambda b, h, i, j: j <= i, 0.5,
                             score=lambda s, *_: 0.4 * math.tanh(s / 0.4))
    torch.testing.assert_close(attncc.reference(p, q, k, v), want, rtol=0, atol=1e-12)
    p = attncc.load("specs/moh.attn")
    weight = rand(1, 5, 2, seed=24)
    want, _ = loop_attention(q, k, v, lambda b, h, i, j: j <= i, 0.5,
                             out_scale=lambda b, h, i: float(weight[b, i, h]))
    torch.testing.assert_close(attncc.reference(p, q, k, v, weight=weight), want,
                               rtol=0, atol=1e-12)
    with pytest.raises(ValueError) as e:
        attncc.reference(p, q, k, v)
    assert str(e.value) == "missing input 'weight': expected float[b, q, h] = [1, 5, 2]"


TABLE = Pattern("table", (), None, (InputDecl("allow", "bool", ("b", "h", "q", "k")),),
                Load("allow", (b_, h_, q_, k_), "bool"))


@given(st.integers(1, 2), st.sampled_from([(1, 1), (2, 1), (4, 2)]), st.integers(1, 6),
       st.integers(1, 6), st.floats(0.0, 1.0), st.integers(0, 10_000))
def test_arbitrary_masks_match_loop(B, heads, Lq, Lkv, density, seed):
    """Any mask (a random bool table, empty rows included) against the loop softmax."""
    Hq, Hkv = heads
    g = torch.Generator().manual_seed(seed)
    allow = torch.rand(B, Hq, Lq, Lkv, generator=g) < density
    q, k, v = rand(B, Hq, Lq, 3, seed=seed), rand(B, Hkv, Lkv, 3, seed=seed + 1), \
        rand(B, Hkv, Lkv, 2, seed=seed + 2)
    out, lse = attncc.reference(TABLE, q, k, v, allow=allow, return_lse=True)
    want, want_lse = loop_attention(q, k, v, lambda b, h, i, j: bool(allow[b, h, i, j]),
                                    1 / math.sqrt(3))
    torch.testing.assert_close(out, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=1e-12)
