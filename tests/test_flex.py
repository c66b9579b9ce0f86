"""FlexAttention interop: IR lowered to mask_mod/score_mod, and `backend="flex"` outputs.

Oracles: `Pattern.dense_mask` (the dense IR evaluator), `attncc.ir.dense.eval_expr` for
score/output modifiers, and `attncc.reference` (float64) for whole attention outputs.
A cold `torch.compile(flex_attention)` costs 10–20 s per mask_mod on a 2-core CPU, so the
default run compiles only three patterns; the sweep over the library is marked `slow`.
"""
import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import create_mask

import attncc
from attncc.ir.dense import eval_expr
from attncc.ir.lower_torch import RUNTIME_SELECTOR_ERROR, output_scale, to_mask_mod, to_score_mod
from attncc.ir.nodes import (FALSE, TRUE, Binary, Blocks, Const, Coord, FCall, Load, Route,
                             Select, Unary, Var)
from attncc.ir.printer import format_expr
from attncc.ir.pattern import Axis, InputDecl, Layout, Pattern
from attncc.runtime.backends.flex import flex_forward

SPECS = os.path.join(os.path.dirname(__file__), os.pardir, "specs")


def spec(name, **params):
    return attncc.load(os.path.join(SPECS, name + ".attn"), **params)


def flex_dense(p, B, H, Lq, Lkv, inputs=None):
    mm = to_mask_mod(p, inputs or {}, q_len=Lq, kv_len=Lkv, heads=H)
    return create_mask(mm, B, H, Lq, Lkv)


# ---- mask_mod lowering: random IR ----------------------------------------------------

B, H, LQ, LKV = 2, 3, 13, 17
TABLE = torch.tensor([[3, -1, 0, 7, 2, -5, 4, 4, 1, 0, 9, -2, 6, 3, 3, 0, 1],
                      [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8]])  # int[b, k]
DECL = InputDecl("t", "int", ("b", "k"))

int_leaves = st.one_of(
    st.sampled_from([Var("q"), Var("k"), Var("h"), Var("b"), Var("Q_LEN"), Var("KV_LEN"),
                     Var("HEADS")]),
    st.integers(-9, 9).map(Const),
    st.just(Load("t", (Var("b"), Var("k")), "int")),
    st.just(Binary("sub", Var("q"), Var("k"))),  # signed operands exercise floor // and %
)
nonzero = st.integers(-7, 7).filter(bool).map(Const)


def _int_ext(children):
    return st.one_of(
        st.builds(Binary, st.sampled_from(["add", "sub", "mul", "min", "max"]), children, children),
        st.builds(Binary, st.sampled_from(["floordiv", "mod"]), children, nonzero),
        # a divisor that depends on indices but is never zero: ±(|e| + 1)
        st.builds(lambda op, a, e, sign: Binary(op, a, sign(Binary("add", Unary("abs", e), Const(1)))),
                  st.sampled_from(["floordiv", "mod"]), children, children,
                  st.sampled_from([lambda x: x, lambda x: Unary("neg", x)])),
        st.builds(Unary, st.sampled_from(["neg", "abs"]), children),
    )


int_exprs = st.recursive(int_leaves, _int_ext, max_leaves=6)


def _bool_ext(children):
    return st.one_of(
        st.builds(Binary, st.sampled_from(["and", "or", "eq", "ne"]), children, children),
        st.builds(Unary, st.just("not"), children),
        st.builds(Select, children, children, children),
    )


compares = st.builds(Binary, st.sampled_from(["lt", "le", "gt", "ge", "eq", "ne"]),
                     int_exprs, int_exprs)
float_compares = st.builds(
    lambda op, a, c, b: Binary(op, Binary("mul", Unary("float", a), Const(c)), Unary("float", b)),
    st.sampled_from(["lt", "ge"]), int_exprs, st.sampled_from([0.5, 0.25, 2.0, -1.5]), int_exprs)
bool_exprs = st.recursive(st.one_of(compares, float_compares, st.sampled_from([TRUE, FALSE])),
                          _bool_ext, max_leaves=4)


@given(bool_exprs)
def test_random_mask_lowering_matches_dense(mask):
    p = Pattern("rand", (), None, (DECL,), mask)
    want = p.dense_mask(LQ, LKV, heads=H, batch=B, inputs={"t": TABLE})
    got = flex_dense(p, B, H, LQ, LKV, {"t": TABLE})
    assert got.dtype == torch.bool and got.shape == want.shape
    assert torch.equal(got, want), format_expr(mask)


def test_floor_semantics_on_negative_operands():
    # (q - k) // 4 and (q - k) % 4 must floor like Python: -3 // 4 == -1, -3 % 4 == 1.
    d = Binary("sub", Var("q"), Var("k"))
    mask = Binary("and", Binary("eq", Binary("floordiv", d, Const(4)), Const(-1)),
                  Binary("eq", Binary("mod", d, Const(4)), Const(1)))
    got = flex_dense(Pattern("f", (), None, (), mask), 1, 1, 8, 8)[0, 0]
    i, j = torch.arange(8)[:, None], torch.arange(8)[None, :]
    assert torch.equal(got, (i - j == -3))


def test_grid_coordinates():
    layout = Layout((Axis("y", 5), Axis("x", 6)))
    mask = Binary("and",
                  Binary("le", Unary("abs", Binary("sub", Coord("q", 0, "y"), Coord("k", 0, "y"))), Const(1)),
                  Binary("le", Unary("abs", Binary("sub", Coord("q", 1, "x"), Coord("k", 1, "x"))), Const(2)))
    got = flex_dense(Pattern("g", (), layout, (), mask), 1, 1, 30, 30)[0, 0]
    t = torch.arange(30)
    y, x = t // 6, t % 6
    want = ((y[:, None] - y[None, :]).abs() <= 1) & ((x[:, None] - x[None, :]).abs() <= 2)
    assert torch.equal(got, want)


STATIC_LIBRARY = {  # name -> (params keeping sizes small, q_len, kv_len)
    "causal": ({}, 70, 90), "sliding_window": ({"window": 9}, 70, 70),
    "chunked": ({"chunk": 16}, 70, 70), "prefix_lm": ({"prefix": 11}, 60, 60),
    "streaming_sinks": ({"sinks": 3, "window": 8}, 60, 60),
    "dilated_1d": ({"width": 9, "dilation": 3}, 60, 60),
    "natten1d": ({"kernel": 5, "dilation": 2}, 40, 40),
    "natten2d": ({"height": 9, "width": 11, "kernel": 3, "dilation": 2}, None, None),
    "natten3d": ({"depth": 4, "height": 5, "width": 6, "kernel_t": 3, "kernel": 3}, None, None),
    "gna": ({"height": 12, "width": 10, "kernel": 5, "stride": 2}, None, None),
    "maxvit_block": ({"height": 8, "width": 12, "window": 4}, None, None),
    "maxvit_grid": ({"height": 8, "width": 12, "grid": 4}, None, None),
    "longformer": ({"radius": 5, "globals": 2}, 50, 50),
    "bigbird": ({"block": 8, "globals": 1, "density": 30}, 64, 64),
    "moa": ({"sink": 2, "short": 5, "long": 20, "split": 2}, 50, 50),
    "alibi": ({}, 30, 40), "softcap": ({}, 30, 30),
}


@pytest.mark.parametrize("name", sorted(STATIC_LIBRARY))
def test_library_mask_mod_matches_dense(name):
    params, lq, lkv = STATIC_LIBRARY[name]
    p = spec(name, **params)
    want = p.dense_mask(lq, lkv, heads=4)
    lq, lkv = want.shape[2], want.shape[3]
    assert torch.equal(flex_dense(p, 1, 4, lq, lkv), want)


def test_document_mask_mod_reads_captured_input():
    doc = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2], [0, 1, 1, 1, 1, 1, 2, 3, 3]])
    p = spec("document")
    assert torch.equal(flex_dense(p, 2, 1, 9, 9, {"doc": doc}),
                       p.dense_mask(9, 9, batch=2, inputs={"doc": doc}))


# ---- score_mod and output scale -------------------------------------------------------

def _grid(Bn, Hn, lq, lkv):
    return (torch.arange(Bn).view(-1, 1, 1, 1), torch.arange(Hn).view(1, -1, 1, 1),
            torch.arange(lq).view(1, 1, -1, 1), torch.arange(lkv).view(1, 1, 1, -1))


@pytest.mark.parametrize("name", ["softcap", "alibi"])
def test_score_mod_matches_evaluator(name):
    p = spec(name)
    b, h, q, k = _grid(1, 4, 6, 9)
    s = torch.randn(1, 4, 6, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 60
    sm = to_score_mod(p, q_len=6, kv_len=9, heads=4, float_dtype=torch.float64)
    want = eval_expr(p.score, {"s": s, "b": b, "h": h, "q": q, "k": k, "Q_LEN": 6,
                               "KV_LEN": 9, "HEADS": 4})
    torch.testing.assert_close(sm(s, b, h, q, k), want, rtol=1e-12, atol=1e-12)


def test_score_mod_absent_or_identity():
    assert to_score_mod(spec("causal"), q_len=4, kv_len=4) is None
    p = Pattern("i", (), None, (), TRUE, score=Var("s"))
    assert to_score_mod(p, q_len=4, kv_len=4) is None


def test_score_mod_with_select_and_function():
    # s > 0 ? sqrt(s) : exp(s) - 1, on the float64 path.
    s_ = Var("s")
    expr = Select(Binary("gt", s_, Const(0.0)), FCall("sqrt", (s_,)),
                  Binary("sub", FCall("exp", (s_,)), Const(1.0)))
    sm = to_score_mod(Pattern("x", (), None, (), TRUE, score=expr), q_len=3, kv_len=3,
                      float_dtype=torch.float64)
    s = torch.tensor([-2.0, -0.5, 0.0, 0.25, 4.0], dtype=torch.float64)
    zero = torch.zeros((), dtype=torch.int64)
    want = torch.where(s > 0, s.clamp(min=0).sqrt(), torch.expm1(s))
    torch.testing.assert_close(sm(s, zero, zero, zero, zero), want, rtol=1e-12, atol=1e-12)


def test_output_scale_layout():
    w = torch.rand(2, 5, 3)  # weight[b, q, h]
    got = output_scale(spec("moh"), {"weight": w}, batch=2, heads=3, q_len=5, kv_len=5)
    assert got.shape == (2, 3, 5) and torch.equal(got, w.permute(0, 2, 1))


# ---- errors -----------------------------------------------------------------------------

def test_runtime_selectors_have_no_static_mask_mod():
    for mask in (Binary("and", Route((4,), 2), TRUE), Blocks("g", 4, top=0.5)):
        p = Pattern("r", (), None, (InputDecl("g", "float", ("b", "h", "q_blocks", "k_blocks")),), mask)
        with pytest.raises(ValueError) as e:
            to_mask_mod(p, q_len=8, kv_len=8)
        assert str(e.value) == RUNTIME_SELECTOR_ERROR
    assert RUNTIME_SELECTOR_ERROR == (
        "a pattern with runtime selectors (route/blocks) has no static mask_mod or BlockMask: "
        "its blocks are chosen per call by the runtime pre-pass "
        "(attncc.compile(p, backend='flex') runs it)")


def test_flex_runs_data_dependent_patterns_through_the_prepass():
    """route / blocks / document ids: a per-call BlockMask from the pre-pass classes; the output
    matches the float64 reference; every block holding a kept pair is visited and, for route
    and documents (one data-dependent conjunct, exact per-tile classes), no other block is.
    seer_gate intersects two conjuncts per tile, a sound over-approximation."""
    from attncc.helpers import document_ids
    from attncc.runtime.backends.flex import _runtime_block_mask
    g = torch.Generator().manual_seed(3)
    cases = [
        (spec("seer_gate", block=32, keep=0.25), 300, {"gate": torch.randn(2, 2, 10, 10, generator=g)}),
        (spec("biformer", height=16, width=16, region=4, topk=3), 256, {}),
        (spec("document"), 300, {"doc": document_ids([[100, 120], [250]], 300)}),
    ]
    for p, L, inputs in cases:
        q, k, v = (torch.randn(2, 2, L, 16, generator=g) for _ in range(3))
        out = flex_forward(p, q, k, v, inputs=inputs)
        torch.testing.assert_close(out.double(), attncc.reference(p, q, k, v, **inputs),
                                   atol=2e-5, rtol=2e-5)
        lower = dict(q_len=L, kv_len=L, heads=2, float_dtype=torch.float32)
        bm, _ = _runtime_block_mask(p, q, k, inputs, 128, lower)
        visited = bm.to_dense().bool()                                   # [B, H, nQ, nKV]
        dense_inputs = dict(inputs, query=q, key=k) if p.name == "biformer" else inputs
        dense = p.dense_mask(L, L, heads=2, batch=2, inputs=dense_inputs)
        n = -(-L // 128)
        pad = torch.zeros(2, 2, n * 128, n * 128, dtype=torch.bool)
        pad[:, :, :L, :L] = dense
        support = pad.view(2, 2, n, 128, n, 128).any(5).any(3)
        assert not (support & ~visited).any(), p.name
        if p.name != "seer_gate":
            assert torch.equal(visited, support), p.name


def test_flex_forward_checks_inputs():
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(ValueError, match="missing input 'doc': expected int\\[b, k\\] = \\[1, 8\\]"):
        flex_forward(spec("document"), q, q, q)
    with pytest.raises(ValueError, match="q has 2 heads, not a multiple of the 3 heads of k"):
        flex_forward(spec("causal"), q, torch.randn(1, 3, 8, 4), torch.randn(1, 3, 8, 4))


# ---- whole attention: flex_forward vs attncc.reference ----------------------------------
# float32 inputs; FlexAttention accumulates in float32: tolerance atol = rtol = 2e-5 on
# outputs of magnitude ~1 (measured errors are below 1e-6).

TOL = dict(atol=2e-5, rtol=2e-5)
COMBO = """
pattern combo(window = 100)
input  weight: float[b, q, h]
mask   causal & q + KV_LEN - Q_LEN - k < window
score  softcap(s, 5.0)
output scale weight[b, q, h]
"""


def _qkv(Bn, Hq, Hkv, lq, lkv, D=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(Bn, Hq, lq, D, generator=g), torch.randn(Bn, Hkv, lkv, D, generator=g),
            torch.randn(Bn, Hkv, lkv, D, generator=g))


def _check(p, q, k, v, inputs, lse=False):
    ref = attncc.reference(p, q, k, v, return_lse=lse, **inputs)
    out = flex_forward(p, q, k, v, inputs=inputs, return_lse=lse)
    if lse:
        (out, got_lse), (ref, ref_lse) = out, ref
        assert torch.equal(torch.isinf(got_lse), torch.isinf(ref_lse))
        fin = torch.isfinite(ref_lse)
        torch.testing.assert_close(got_lse.double()[fin], ref_lse[fin], **TOL)
    assert out.dtype == q.dtype and not torch.isnan(out).any()
    torch.testing.assert_close(out.double(), ref, **TOL)
    return ref


def test_flex_combo_gqa_empty_rows_score_and_output_scale():
    # Lq > Lkv: bottom-right causal leaves the first Lq - Lkv query rows without keys.
    p = attncc.parse(COMBO)
    q, k, v = _qkv(2, 4, 2, 300, 200)
    w = torch.rand(2, 300, 4, generator=torch.Generator().manual_seed(3))
    ref = _check(p, q, k, v, {"weight": w})
    assert (ref[:, :, :100] == 0).all() and (ref[:, :, 100:].abs().sum(-1) > 0).all()
    out, lse = flex_forward(p, q, k, v, inputs={"weight": w}, return_lse=True)  # eager path
    assert (out[:, :, :100] == 0).all() and torch.isneginf(lse[:, :, :100]).all()
    _check(p, q, k, v, {"weight": w}, lse=True)


def test_flex_natten2d_grid():
    p = spec("natten2d", height=16, width=20, kernel=5, dilation=2)
    _check(p, *_qkv(1, 2, 2, 320, 320), {})


def test_flex_document():
    # Two batch entries with different documents: the mask_mod must read doc[b] per entry
    # while the BlockMask (batch dimension 1) is shared.
    doc = torch.stack([torch.repeat_interleave(torch.arange(5), torch.tensor([40, 100, 7, 90, 19])),
                       torch.repeat_interleave(torch.arange(3), torch.tensor([200, 1, 55]))])
    _check(spec("document"), *_qkv(2, 2, 1, 256, 256), {"doc": doc})
    # Same shape, new document ids: the cached block structure gets the new mask_mod.
    _check(spec("document"), *_qkv(2, 2, 1, 256, 256, seed=1), {"doc": doc.flip(-1).neg()})


SWEEP_INPUTS = {"moh": lambda Bn, Hn, L: {"weight": torch.rand(Bn, L, Hn)},
                "document": lambda Bn, Hn, L: {"doc": torch.sort(torch.randint(0, 6, (Bn, L))).values}}


@pytest.mark.slow  # compiles FlexAttention once per spec (10-20 s each on 2 CPU cores)
@pytest.mark.parametrize("name", sorted(STATIC_LIBRARY) + ["moh"])
def test_flex_library_sweep(name):
    params, _, _ = STATIC_LIBRARY.get(name, ({}, None, None))
    p = spec(name, **params)
    L = p.layout.numel if p.layout is not None else 256
    inputs = SWEEP_INPUTS.get(name, lambda *a: {})(1, 2, L)
    _check(p, *_qkv(1, 2, 2, L, L), inputs)


def test_cpu_gradients_are_refused_clearly():
    from attncc.runtime.backends.flex import FLEX_CPU_GRAD_ERROR
    q = torch.randn(1, 1, 16, 8, requires_grad=True)
    with pytest.raises(ValueError) as e:
        flex_forward(spec("causal"), q, q, q)
    assert str(e.value) == FLEX_CPU_GRAD_ERROR
    assert "backend 'flex' cannot compute gradients on CPU" in FLEX_CPU_GRAD_ERROR
    with torch.no_grad():  # inference on the same tensors is fine
        ref = attncc.reference(spec("causal"), q.detach(), q.detach(), q.detach())
        torch.testing.assert_close(flex_forward(spec("causal"), q, q, q, return_lse=True)[0].double(),
                                   ref, **TOL)
