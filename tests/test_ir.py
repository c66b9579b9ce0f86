"""IR nodes: hash-consing, type checking, traversal and the stable text form."""
import pytest

from attncc.ir.nodes import (FALSE, TRUE, Binary, Blocks, Const, Coord, FCall, IRTypeError, Load,
                             Route, Select, Unary, Var, free_vars, transform, walk)
from attncc.ir.printer import format_dag, format_expr

q, k = Var("q"), Var("k")


def test_equal_structures_are_one_node():
    a = Binary("and", Binary("ge", Binary("sub", q, k), Const(0)), Binary("lt", Binary("sub", q, k), Const(4)))
    b = Binary("and", Binary("ge", Binary("sub", Var("q"), Var("k")), Const(0)),
               Binary("lt", Binary("sub", Var("q"), Var("k")), Const(4)))
    assert a is b
    assert a.a.a is a.b.a  # the shared q - k is one node


def test_constants_keep_their_type():
    assert Const(1) is not Const(True)
    assert Const(1) is not Const(1.0)
    assert Const(1).dtype == "int" and Const(True).dtype == "bool" and Const(1.0).dtype == "float"


@pytest.mark.parametrize("build, message", [
    (lambda: Binary("add", q, TRUE), "add of int and bool"),
    (lambda: Binary("and", q, k), "and of int and int"),
    (lambda: Binary("lt", TRUE, FALSE), "lt of bool and bool"),
    (lambda: Binary("div", q, k), "true division of int"),
    (lambda: Select(q, q, k), "select condition of type int"),
    (lambda: Unary("not", q), "not of int"),
    (lambda: FCall("tanh", (q,)), "tanh takes float arguments"),
    (lambda: Var("z"), "unknown variable 'z'"),
    (lambda: Blocks("g", 64), "exactly one of top / threshold"),
    (lambda: Route((0,), 2), "bad route"),
])
def test_ill_typed_nodes_are_rejected(build, message):
    with pytest.raises(IRTypeError, match=message.replace("(", r"\(")):
        build()


def test_walk_visits_shared_nodes_once_children_first():
    d = Binary("sub", q, k)
    e = Binary("and", Binary("ge", d, Const(0)), Binary("lt", d, Const(4)))
    order = list(walk(e))
    assert order.count(d) == 1
    assert order.index(d) < order.index(e.a) and order[-1] is e


def test_transform_rewrites_bottom_up():
    e = Binary("lt", Binary("sub", q, k), Var("KV_LEN"))
    out = transform(e, lambda n: Const(100) if n is Var("KV_LEN") else None)
    assert out is Binary("lt", Binary("sub", q, k), Const(100))


def test_free_vars_counts_coordinates_as_their_side():
    e = Binary("le", Unary("abs", Binary("sub", Coord("q", 0, "y"), Coord("k", 0, "y"))), Var("h"))
    assert free_vars(e) == {"q", "k", "h"}


def test_printer_text_is_stable():
    d = Binary("sub", q, k)
    e = Binary("and", Binary("ge", d, Const(0)), Binary("lt", d, Const(4)))
    assert format_expr(e) == "((q - k) >= 0) & ((q - k) < 4)"
    assert format_dag({"mask": e}) == "%0 = q - k\nmask = (%0 >= 0) & (%0 < 4)"
    load = Load("doc", (Var("b"), q), "int")
    assert format_expr(Binary("eq", load, Load("doc", (Var("b"), k), "int"))) == "doc[b, q] == doc[b, k]"
    assert format_expr(Route((8, 8), 4)) == "route(region=(8, 8), topk=4)"
    assert format_expr(Blocks("gate", 64, top=0.1)) == "blocks(gate, block=64, top=0.1)"
    sel = Select(Binary("lt", Var("h"), Const(4)), Const(256), Const(2048))
    assert format_expr(Binary("min", sel, Coord("k", 1, "x"))) == "min((h < 4) ? 256 : 2048, k.x)"
