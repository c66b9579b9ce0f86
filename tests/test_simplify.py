"""Simplifier: named rules, substitution, and the property that simplification preserves the
dense mask (compared element-wise with the dense evaluator on random IR)."""
import random

import torch
from hypothesis import given, strategies as st

import attncc
from attncc.ir.dense import Evaluator
from attncc.ir.nodes import FALSE, TRUE, Binary, Const, Select, Unary, Var
from attncc.ir.printer import format_expr
from attncc.passes.simplify import opt_text, simplify, simplify_pattern, substitute

q, k = Var("q"), Var("k")


def B(op, a, b):
    return Binary(op, a, b)


def C(v):
    return Const(v)


def text(e):
    return format_expr(simplify(e))


def test_constant_folding_uses_floor_semantics():
    assert simplify(B("floordiv", C(-7), C(2))) is C(-4)
    assert simplify(B("mod", C(-7), C(2))) is C(1)
    assert simplify(B("mod", C(7), C(-2))) is C(-1)
    assert simplify(B("min", C(3), B("max", C(-1), C(9)))) is C(3)
    assert simplify(B("lt", C(2), C(3))) is TRUE
    assert simplify(Unary("neg", Unary("abs", C(-5)))) is C(-5)


def test_division_by_zero_is_not_folded():
    e = B("floordiv", C(1), C(0))
    assert simplify(e) is e


def test_logic_identities():
    a = B("lt", q, k)
    assert simplify(B("and", a, TRUE)) is a
    assert simplify(B("or", FALSE, a)) is a
    assert simplify(B("and", a, FALSE)) is FALSE
    assert simplify(B("or", a, TRUE)) is TRUE
    assert simplify(Unary("not", Unary("not", a))) is a
    assert simplify(B("and", a, a)) is a
    assert simplify(B("and", a, Unary("not", a))) is FALSE
    assert text(Unary("not", a)) == "q >= k"


def test_select_and_affine():
    assert simplify(Select(TRUE, q, k)) is q
    assert simplify(Select(B("lt", q, k), k, k)) is k
    assert text(B("sub", B("add", q, C(3)), C(1))) == "q + 2"
    assert simplify(B("sub", B("sub", q, k), B("sub", q, k))) is C(0)
    assert simplify(B("gt", B("add", q, C(1)), q)) is TRUE
    assert text(B("min", q, B("add", q, C(3)))) == "q"
    assert text(B("lt", C(3), q)) == "q > 3"
    # a cancelled term that could divide by zero is kept
    risky = B("floordiv", q, k)
    assert simplify(B("sub", risky, risky)) is not C(0)


def test_substitute_specializes_lengths():
    e = B("le", k, B("add", q, B("sub", Var("KV_LEN"), Var("Q_LEN"))))
    assert text(substitute(e, {"KV_LEN": 10, "Q_LEN": 10})) == "k <= q"
    assert text(substitute(e, {"KV_LEN": 12, "Q_LEN": 10})) == "k <= (q + 2)"


def test_opt_text_and_simplify_pattern():
    p = attncc.parse("pattern t\nmask !!(q - k < 4) & true")
    assert simplify_pattern(p).mask is simplify(p.mask)
    assert opt_text(p).splitlines()[-1] == "mask = (q - k) < 4"


# ---- property: simplify preserves values --------------------------------------------------

_QS = torch.arange(-3, 12).view(-1, 1)
_KS = torch.arange(-2, 13).view(1, -1)


def random_int_expr(rng, depth, leaves=(q, k)):
    """A random int IR expression (floor `//` and `%` by nonzero constants only)."""
    if depth == 0 or rng.random() < 0.15:
        return rng.choice(leaves) if rng.random() < 0.7 else C(rng.randint(-6, 6))
    r = rng.random()
    sub = lambda: random_int_expr(rng, depth - 1, leaves)  # noqa: E731
    if r < 0.4:
        return B(rng.choice(["add", "sub", "mul", "min", "max"]), sub(), sub())
    if r < 0.7:
        return B(rng.choice(["floordiv", "mod"]), sub(), C(rng.choice([-3, -2, 2, 3, 5])))
    if r < 0.85:
        return Unary(rng.choice(["neg", "abs"]), sub())
    return Select(random_bool_expr(rng, depth - 1, leaves), sub(), sub())


def random_bool_expr(rng, depth, leaves=(q, k)):
    """A random bool IR expression over `leaves`."""
    r = rng.random()
    if depth <= 0 or r < 0.35:
        if rng.random() < 0.05:
            return rng.choice([TRUE, FALSE])
        return B(rng.choice(["lt", "le", "gt", "ge", "eq", "ne"]),
                 random_int_expr(rng, 2, leaves), random_int_expr(rng, 2, leaves))
    sub = lambda: random_bool_expr(rng, depth - 1, leaves)  # noqa: E731
    if r < 0.85:
        return B(rng.choice(["and", "or", "eq", "ne"]), sub(), sub())
    return Unary("not", sub())


def _value(e):
    return Evaluator({"q": _QS, "k": _KS}).evaluate(e).expand(_QS.shape[0], _KS.shape[1])


@given(st.integers(0, 2 ** 32 - 1))
def test_simplify_preserves_dense_values(seed):
    e = random_bool_expr(random.Random(seed), 3)
    s = simplify(e)
    assert torch.equal(_value(e), _value(s)), (format_expr(e), format_expr(s))
    assert simplify(s) is s  # fixed point
