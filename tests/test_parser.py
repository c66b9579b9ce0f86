"""Parser and formatter: round trips, precedence, layout of the source, locations."""
import dataclasses
import pathlib

import pytest
from hypothesis import given

from attncc.frontend import ast
from attncc.frontend.ast import (Attr, Binary, Bool, Call, Compare, Def, Index, InputDecl,
                                 Keyword, LayoutDecl, MaskClause, Name, Num, OutputClause,
                                 Param, ScoreClause, Ternary, Tuple, Unary)
from attncc.frontend.format import format_expr, format_spec
from attncc.frontend.parser import parse_expr, parse_spec

from strategies import exprs, specs

ROOT = pathlib.Path(__file__).resolve().parent.parent


def strict(x):
    """Structure with Python types spelled out: `Num(2) != Num(2.0)`, locations ignored."""
    if isinstance(x, ast.Node):
        return (type(x).__name__,) + tuple(strict(getattr(x, f.name))
                                           for f in dataclasses.fields(x) if f.name != "loc")
    if isinstance(x, tuple):
        return tuple(strict(i) for i in x)
    return (type(x).__name__, x)


def n(i):
    return Name(i)


# ---- round trips ------------------------------------------------------------------------------

@given(exprs())
def test_expr_roundtrip(e):
    text = format_expr(e)
    back = parse_expr(text)
    assert strict(back) == strict(e), text
    assert format_expr(back) == text


def all_nodes(x):
    if isinstance(x, ast.Node):
        yield x
        for f in dataclasses.fields(x):
            yield from all_nodes(getattr(x, f.name))
    elif isinstance(x, tuple):
        for i in x:
            yield from all_nodes(i)


@given(specs())
def test_spec_roundtrip(s):
    text = format_spec(s)
    back = parse_spec(text, "r.attn")
    assert strict(back) == strict(s), text
    assert format_spec(back) == text
    lines = text.splitlines()
    for node in all_nodes(back):
        if node is back and not s.decls and s.header is None:
            continue  # an empty file has no span
        loc = node.loc
        assert loc is not None and loc.file == "r.attn", node
        assert (loc.line, loc.col) <= (loc.end_line, loc.end_col), node
        if isinstance(node, (ast.Name, ast.Num, ast.Bool)):
            assert loc.line == loc.end_line
            assert lines[loc.line - 1][loc.col - 1:loc.end_col - 1] == format_expr(node)


# ---- precedence -------------------------------------------------------------------------------

PRECEDENCE = [
    ("a | b & c", Binary("|", n("a"), Binary("&", n("b"), n("c")))),
    ("a & b | c", Binary("|", Binary("&", n("a"), n("b")), n("c"))),
    ("a or b and c", Binary("|", n("a"), Binary("&", n("b"), n("c")))),
    ("!q < k", Unary("!", Compare(("<",), (n("q"), n("k"))))),
    ("not a & b", Binary("&", Unary("!", n("a")), n("b"))),
    ("c ? a : b ? d : e", Ternary(n("c"), n("a"), Ternary(n("b"), n("d"), n("e")))),
    ("c ? x ? y : z : e", Ternary(n("c"), Ternary(n("x"), n("y"), n("z")), n("e"))),
    ("a | b ? 1 : 2", Ternary(Binary("|", n("a"), n("b")), Num(1), Num(2))),
    ("-2 * 3", Binary("*", Unary("-", Num(2)), Num(3))),
    ("-3", Unary("-", Num(3))),
    ("- -x", Unary("-", Unary("-", n("x")))),
    ("0 <= q - k < w", Compare(("<=", "<"), (Num(0), Binary("-", n("q"), n("k")), n("w")))),
    ("a - b - c", Binary("-", Binary("-", n("a"), n("b")), n("c"))),
    ("a - (b - c)", Binary("-", n("a"), Binary("-", n("b"), n("c")))),
    ("a // b % c * d", Binary("*", Binary("%", Binary("//", n("a"), n("b")), n("c")), n("d"))),
    ("a + b * c", Binary("+", n("a"), Binary("*", n("b"), n("c")))),
    ("a / 2.", Binary("/", n("a"), Num(2.0))),
    ("-q.y", Unary("-", Attr(n("q"), "y"))),
    ("(q < k) == true", Compare(("==",), (Compare(("<",), (n("q"), n("k"))), Bool(True)))),
    ("f(a, k = b)", Call("f", (n("a"),), (Keyword("k", n("b")),))),
    ("doc[b, q] == doc[b, k]", Compare(("==",), (Index("doc", (n("b"), n("q"))),
                                                 Index("doc", (n("b"), n("k")))))),
    ("(8, 8,)", Tuple((Num(8), Num(8)))),
    ("((x))", n("x")),
    ("1e-3 + 0.1", Binary("+", Num(0.001), Num(0.1))),
    ("f()", Call("f", ())),
]


@pytest.mark.parametrize("text,expected", PRECEDENCE, ids=[t for t, _ in PRECEDENCE])
def test_precedence(text, expected):
    got = parse_expr(text)
    assert strict(got) == strict(expected)
    assert strict(parse_expr(format_expr(got))) == strict(expected)


@pytest.mark.parametrize("expr,text", [
    (Binary("*", Binary("+", n("a"), n("b")), n("c")), "(a + b) * c"),
    (Unary("!", Binary("&", n("a"), n("b"))), "!(a & b)"),
    (Unary("-", Binary("-", n("a"), n("b"))), "-(a - b)"),
    (Ternary(Ternary(n("a"), n("b"), n("c")), n("d"), n("e")), "(a ? b : c) ? d : e"),
    (Compare(("<",), (Unary("!", n("a")), n("b"))), "(!a) < b"),
    (Compare(("<", "<"), (n("a"), Compare(("<",), (n("b"), n("c"))), n("d"))), "a < (b < c) < d"),
    (Attr(Num(3), "y"), "(3).y"),
    (Attr(Binary("+", n("a"), n("b")), "x"), "(a + b).x"),
    (Call("f", (Tuple((n("a"), n("b"))),), (Keyword("r", Ternary(n("c"), Num(1), Num(2))),)),
     "f((a, b), r = c ? 1 : 2)"),
    (Num(1e-05), "1e-05"),
    (Num(2.0), "2.0"),
    (Num(1e16), "1e+16"),
])
def test_format_minimal_parentheses(expr, text):
    assert format_expr(expr) == text
    assert strict(parse_expr(text)) == strict(expr)


def test_numbers_keep_their_type():
    assert type(parse_expr("2").value) is int
    assert type(parse_expr("2.").value) is float
    assert type(parse_expr("1e3").value) is float
    assert parse_expr("9223372036854775807").value == 2 ** 63 - 1
    assert parse_expr("007").value == 7


# ---- source layout ----------------------------------------------------------------------------

def test_comments_blank_lines_crlf_and_multiline():
    text = ("# leading comment\r\n\r\n"
            "pattern p(a = 3,   # the first\r\n"
            "          b)\r\n"
            "  \t\r\n"
            "# between\r\n"
            "def f(x,\r\n"
            "      y = 2) = min(x,   # inside brackets\r\n"
            "                   y)\r\n"
            "mask causal & q - k < a   # trailing\r\n"
            "# final comment without newline")
    spec = parse_spec(text)
    assert spec.header == ast.Header("p", (Param("a", Num(3)), Param("b")))
    assert spec.decls == (
        Def("f", (Param("x"), Param("y", Num(2))), Call("min", (n("x"), n("y")))),
        MaskClause(Binary("&", n("causal"),
                          Compare(("<",), (Binary("-", n("q"), n("k")), n("a"))))),
    )
    assert parse_spec(text.replace("\r\n", "\n")) == spec


def test_empty_and_prelude_files():
    assert parse_spec("") == ast.Spec(None, ())
    assert parse_spec("\n# only a comment\n\n") == ast.Spec(None, ())
    prelude = parse_spec("def causal = k <= q + KV_LEN - Q_LEN\ndef prefix(p) = k < p\n")
    assert prelude.header is None
    assert [d.name for d in prelude.decls] == ["causal", "prefix"]
    assert parse_spec("def g() = 1").decls == (Def("g", (), Num(1)),)
    assert parse_spec("pattern x()").header == ast.Header("x", ())


def test_all_declaration_kinds():
    spec = parse_spec("pattern t(height = 4, width)\n"
                      "layout grid(y = height, x = width)\n"
                      "input gate: float[b, h, q_blocks, 8]\n"
                      "output scale gate[b, q, h]\n"
                      "score s / 2\n")
    assert spec.decls == (
        LayoutDecl("grid", (Keyword("y", n("height")), Keyword("x", n("width")))),
        InputDecl("gate", "float", (n("b"), n("h"), n("q_blocks"), Num(8))),
        OutputClause("scale", Index("gate", (n("b"), n("q"), n("h")))),
        ScoreClause(Binary("/", n("s"), Num(2))),
    )
    assert format_spec(spec) == ("pattern t(height = 4, width)\n"
                                 "layout grid(y = height, x = width)\n"
                                 "input gate: float[b, h, q_blocks, 8]\n"
                                 "output scale gate[b, q, h]\n"
                                 "score s / 2\n")


# ---- DESIGN §3 examples -----------------------------------------------------------------------

DESIGN_EXAMPLES = {
    "sliding_window": """\
# specs/sliding_window.attn
pattern sliding_window(window = 4096)
mask causal & q - k < window
""",
    "natten2d": """\
# specs/natten2d.attn — NATTEN-style neighborhood attention on a 2-D feature map
pattern natten2d(height = 64, width = 64, kernel = 7, dilation = 1, stride = 1)
layout grid(y = height, x = width)
mask   neighborhood(kernel, dilation = dilation, stride = stride)
""",
    "moa": """\
# specs/moa.attn — heterogeneous per-head spans (MoA)
pattern moa(heads = 8)
mask causal & (k < 4 | q - k < (h < 4 ? 256 : 2048))
""",
    "biformer": """\
# specs/biformer.attn — bi-level routing: top-k regions by pooled q·k affinity
pattern biformer(height = 56, width = 56, region = 8, topk = 4)
layout grid(y = height, x = width)
mask   route(region = (region, region), topk = topk)
""",
    "seer_gate": """\
# specs/seer_gate.attn — learned block gates (SeerAttention-like)
pattern seer_gate(block = 64, keep = 0.1)
input  gate: float[b, h, q_blocks, k_blocks]      # scores from a gate network, supplied at call time
mask   causal & blocks(gate, block = block, top = keep)
""",
    "moh": """\
# specs/moh.attn — mixture-of-heads: per-token head weights (zero = head skipped)
pattern moh
input  weight: float[b, q, h]
mask   causal
output scale weight[b, q, h]
""",
    "document": """\
# specs/document.attn — packed documents, causal inside each document
pattern document
input  doc: int[b, k]            # document id of each token
mask   causal & doc[b, q] == doc[b, k]
score  softcap(s, 50)
""",
}

DESIGN_CANONICAL = {
    "sliding_window": "pattern sliding_window(window = 4096)\nmask causal & q - k < window\n",
    "moa": "pattern moa(heads = 8)\nmask causal & (k < 4 | q - k < (h < 4 ? 256 : 2048))\n",
    "biformer": ("pattern biformer(height = 56, width = 56, region = 8, topk = 4)\n"
                 "layout grid(y = height, x = width)\n"
                 "mask route(region = (region, region), topk = topk)\n"),
    "document": ("pattern document\ninput doc: int[b, k]\n"
                 "mask causal & doc[b, q] == doc[b, k]\nscore softcap(s, 50)\n"),
}


@pytest.mark.parametrize("name", sorted(DESIGN_EXAMPLES))
def test_design_examples(name):
    spec = parse_spec(DESIGN_EXAMPLES[name], f"{name}.attn")
    assert spec.header.name == name
    text = format_spec(spec)
    if name in DESIGN_CANONICAL:
        assert text == DESIGN_CANONICAL[name]
    assert parse_spec(text) == spec


def test_moa_structure():
    mask = parse_spec(DESIGN_EXAMPLES["moa"]).decls[0].expr
    span = Ternary(Compare(("<",), (n("h"), Num(4))), Num(256), Num(2048))
    assert mask == Binary("&", n("causal"), Binary(
        "|", Compare(("<",), (n("k"), Num(4))),
        Compare(("<",), (Binary("-", n("q"), n("k")), span))))


def test_seer_gate_structure():
    spec = parse_spec(DESIGN_EXAMPLES["seer_gate"])
    assert spec.header.params == (Param("block", Num(64)), Param("keep", Num(0.1)))
    assert spec.decls[0] == InputDecl("gate", "float", (n("b"), n("h"), n("q_blocks"), n("k_blocks")))
    assert spec.decls[1].expr.right == Call("blocks", (n("gate"),),
                                            (Keyword("block", n("block")), Keyword("top", n("keep"))))


SPEC_FILES = sorted((ROOT / "specs").glob("*.attn")) + sorted((ROOT / "grammar").glob("*.attn"))


@pytest.mark.parametrize("path", SPEC_FILES, ids=[p.name for p in SPEC_FILES])
def test_shipped_spec_files_parse(path):
    """Every spec in the library (and the prelude) parses and round-trips through the formatter."""
    spec = parse_spec(path.read_text(encoding="utf-8"), path.name)
    assert parse_spec(format_spec(spec)) == spec


# ---- locations --------------------------------------------------------------------------------

def _loc(node):
    return (node.loc.line, node.loc.col, node.loc.end_line, node.loc.end_col)


def test_locations():
    text = ("pattern doc(w = 4)\n"
            "input  d: int[b, k]\n"
            "\n"
            "mask   causal & d[b, q] == d[b, k] & f(w, z = (1, 2))\n")
    spec = parse_spec(text, "doc.attn")
    assert spec.header.loc == ast.Loc("doc.attn", 1, 1, 1, 19)
    assert _loc(spec.header.params[0]) == (1, 13, 1, 18)
    assert _loc(spec.header.params[0].default) == (1, 17, 1, 18)
    inp, mask = spec.decls
    assert _loc(inp) == (2, 1, 2, 20)
    assert _loc(inp.dims[1]) == (2, 18, 2, 19)
    assert _loc(mask) == (4, 1, 4, 54)
    top = mask.expr                                  # (causal & cmp) & f(...)
    assert _loc(top) == (4, 8, 4, 54)
    assert _loc(top.left.left) == (4, 8, 4, 14)      # causal
    cmp_ = top.left.right
    assert _loc(cmp_) == (4, 17, 4, 35)
    assert _loc(cmp_.operands[1]) == (4, 28, 4, 35)  # d[b, k]
    assert _loc(cmp_.operands[1].indices[1]) == (4, 33, 4, 34)
    call = top.right
    assert _loc(call) == (4, 38, 4, 54)
    assert _loc(call.kwargs[0]) == (4, 43, 4, 53)
    assert _loc(call.kwargs[0].value) == (4, 47, 4, 53)  # the tuple includes its parentheses


def test_locations_multiline_and_parenthesized():
    e = parse_expr("min(a,\n    (b + c))", "e.attn")
    assert _loc(e) == (1, 1, 2, 13)
    assert _loc(e.args[1]) == (2, 6, 2, 11)  # parentheses make no node
    assert e.args[1].loc.file == "e.attn"
