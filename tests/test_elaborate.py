"""Elaboration: parameter binding and overrides, def expansion, typing/promotion, golden IR
text of library specs, hash-consing, and elaboration of hand-built ASTs."""
import os

import pytest

import attncc
from attncc.api import prelude_defs
from attncc.frontend import ast as A
from attncc.ir.nodes import Binary, Const, Coord, FCall, Route, Blocks, Unary, Var
from attncc.passes.elaborate import elaborate

SPECS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "specs")
q, k, h = Var("q"), Var("k"), Var("h")


def parse(text, **params):
    return attncc.parse(text, **params)


def test_defaults_may_refer_to_earlier_params():
    p = parse("pattern p(a = 3, b2 = a * 2 + 1, big = b2 > 5)\nmask q - k < b2 & big")
    assert p.params == (("a", 3), ("b2", 7), ("big", True))
    assert p.mask is Binary("and", Binary("lt", Binary("sub", q, k), Const(7)), Const(True))


def test_override_wins_and_feeds_later_defaults():
    p = parse("pattern p(a = 3, b2 = a * 2)\nmask q - k < b2", a=5)
    assert p.params == (("a", 5), ("b2", 10))
    p = parse("pattern p(a = 3, b2 = a * 2)\nmask q - k < b2", b2=1)
    assert p.params == (("a", 3), ("b2", 1))


def test_float_and_bool_params():
    p = parse("pattern p(t = 0.5, on = true)\nmask on & causal\nscore s / t")
    assert p.params == (("t", 0.5), ("on", True))
    assert p.score is Binary("div", Var("s"), Const(0.5))


def test_def_expansion_is_substitution():
    a = parse("pattern p\ndef near(w, lo = 0) = lo <= q - k & q - k < w\nmask near(4)")
    b = parse("pattern p\nmask 0 <= q - k & q - k < 4")
    assert a.mask is b.mask
    c = parse("pattern p\ndef near(w, lo = 0) = lo <= q - k & q - k < w\nmask near(lo = 1, w = 4)")
    assert c.mask is parse("pattern p\nmask 1 <= q - k & q - k < 4").mask


def test_chained_comparison_shares_the_middle():
    p = parse("pattern p\nmask 0 <= q - k < 4")
    d = Binary("sub", q, k)
    assert p.mask is Binary("and", Binary("le", Const(0), d), Binary("lt", d, Const(4)))


def test_prelude_primitives_exact_formulas():
    off = Binary("sub", Var("KV_LEN"), Var("Q_LEN"))
    causal = Binary("le", k, Binary("add", q, off))
    assert parse("pattern p\nmask causal").mask is causal
    assert parse("pattern p\nmask window(8)").mask is Binary(
        "and", causal, Binary("lt", Binary("sub", Binary("add", q, off), k), Const(8)))
    assert parse("pattern p\nmask chunked(16)").mask is Binary(
        "eq", Binary("floordiv", q, Const(16)), Binary("floordiv", k, Const(16)))
    assert parse("pattern p\nmask prefix(3)").mask is Binary("lt", k, Const(3))
    assert parse("pattern p\nmask sinks(3)").mask is Binary("lt", k, Const(3))


def test_score_promotion_inserts_float():
    p = parse("pattern p\nmask causal\nscore s + (k - q)")
    assert p.score is Binary("add", Var("s"), Unary("float", Binary("sub", k, q)))
    p = parse("pattern p\nmask causal\nscore softcap(s, 30)")
    assert p.score is Binary("mul", Const(30.0),
                             FCall("tanh", (Binary("div", Var("s"), Const(30.0)),)))


def test_blocked_route_blocks_nodes():
    p = parse("pattern p\nlayout grid(y = 8, x = 6)\nmask blocked((4, 3))")
    y = lambda s: Coord(s, 0, "y")  # noqa: E731
    x = lambda s: Coord(s, 1, "x")  # noqa: E731
    same = lambda a, b, n: Binary("eq", Binary("floordiv", a, Const(n)),  # noqa: E731
                                  Binary("floordiv", b, Const(n)))
    assert p.mask is Binary("and", same(y("q"), y("k"), 4), same(x("q"), x("k"), 3))
    assert parse("pattern p\nmask blocked(4)").mask is same(q, k, 4)
    p = parse("pattern p\nlayout grid(y = 8, x = 8)\nmask route(region = 4, topk = 2)")
    assert p.mask is Route((4, 4), 2)
    p = parse("pattern p\ninput g: float[b, h, q_blocks, k_blocks]\n"
              "mask blocks(g, block = 16, threshold = 0.25)")
    assert p.mask is Blocks("g", 16, threshold=0.25)


def test_layout_and_inputs_are_declared():
    p = parse("pattern p(n = 4)\nlayout grid(t = 2, y = n, x = n * 2)\n"
              "input bias: float[h, 7]\nmask true\nscore s + bias[h, 3]")
    assert p.layout.shape == (2, 4, 8)
    assert [str(d) for d in p.inputs] == ["input bias: float[h, 7]"]


def test_no_mask_clause_means_full_attention():
    assert parse("pattern p\nscore s * 2").mask is Const(True)


def test_hash_consing_same_spec_twice():
    for name in ("natten2d", "bigbird", "alibi"):
        a = attncc.load(os.path.join(SPECS, name + ".attn"))
        b = attncc.load(os.path.join(SPECS, name + ".attn"))
        assert a.mask is b.mask and a.score is b.score and a == b
        assert a.ir_hash() == b.ir_hash()


def test_hand_built_ast():
    loc = A.Loc("<ast>", 1, 1)
    spec = A.Spec(A.Header("w", (A.Param("width", A.Num(4)),)), (
        A.MaskClause(A.Binary("&", A.Name("causal"),
                              A.Compare(("<",), (A.Binary("-", A.Name("q"), A.Name("k")),
                                                 A.Name("width"))))),), loc=loc)
    p = elaborate(spec, {"width": 6}, prelude=list(prelude_defs()))
    assert p.mask is parse("pattern w(width = 4)\nmask causal & q - k < width", width=6).mask


def test_prelude_is_parsed_once():
    assert prelude_defs() is prelude_defs()
    names = {d.name for d in prelude_defs()}
    assert {"causal", "window", "chunked", "prefix", "sinks", "dilated", "softcap",
            "alibi"} <= names


@pytest.mark.parametrize("name", ["sliding_window", "natten2d", "gna", "bigbird", "moa",
                                  "alibi", "softcap", "seer_gate", "maxvit_grid"])
def test_golden_ir(name, golden):
    small = {"natten2d": dict(height=8, width=8, kernel=3, dilation=2),
             "gna": dict(height=16, width=16, kernel=4, stride=2)}.get(name, {})
    p = attncc.load(os.path.join(SPECS, name + ".attn"), **small)
    golden(f"ir/{name}.txt", p.ir_text())
