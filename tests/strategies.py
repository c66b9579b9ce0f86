"""Hypothesis strategies for `.attn` ASTs (`attncc.frontend.ast`).

Every generated tree is one the parser can produce: names are never keywords, numbers are
non-negative (a negative literal is `Unary('-', Num(n))`), floats are finite, tuples have two
or more items, calls and indexing apply to plain names, chains have 2–4 operands and a
headerless spec holds only `def`s. Sizes stay small so the `ci` profile runs in seconds.

    exprs(max_leaves=12)   any expression
    specs()                a whole spec (header, layout, inputs, defs, clauses)
"""
from __future__ import annotations

from hypothesis import strategies as st

from attncc.frontend import ast

KEYWORDS = frozenset({"pattern", "layout", "input", "def", "mask", "score", "output",
                      "and", "or", "not", "true", "false"})
INDEX_NAMES = ("q", "k", "b", "h", "s")
PARAM_NAMES = ("window", "w", "block", "region", "topk", "p_1", "_n")
FUNC_NAMES = ("causal", "window", "min", "max", "abs", "clamp", "softcap", "neighborhood", "f")
AXES = ("y", "x", "t")
COMPARE_OPS = ("<", "<=", ">", ">=", "==", "!=")
BINARY_OPS = ("+", "-", "*", "/", "//", "%", "&", "|")

identifiers = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,6}", fullmatch=True).filter(
    lambda s: s not in KEYWORDS)
names = st.one_of(st.sampled_from(INDEX_NAMES + PARAM_NAMES), identifiers)
ints = st.one_of(st.integers(0, 100), st.integers(0, 2 ** 63 - 1))
floats = st.floats(min_value=0.0, allow_nan=False, allow_infinity=False)


def _leaves():
    return st.one_of(
        st.builds(ast.Num, ints),
        st.builds(ast.Num, floats),
        st.builds(ast.Bool, st.booleans()),
        st.builds(ast.Name, names),
        st.builds(ast.Attr, st.builds(ast.Name, st.sampled_from(("q", "k"))), st.sampled_from(AXES)),
    )


def _keywords(children, max_size=2):
    return st.lists(st.tuples(st.sampled_from(PARAM_NAMES + ("top", "dilation", "stride")), children),
                    max_size=max_size, unique_by=lambda kv: kv[0]).map(
        lambda kvs: tuple(ast.Keyword(n, v) for n, v in kvs))


def _extend(children):
    small = st.lists(children, min_size=1, max_size=3).map(tuple)
    return st.one_of(
        st.builds(ast.Unary, st.sampled_from(("-", "!")), children),
        st.builds(ast.Binary, st.sampled_from(BINARY_OPS), children, children),
        st.integers(1, 3).flatmap(lambda n: st.builds(
            ast.Compare,
            st.lists(st.sampled_from(COMPARE_OPS), min_size=n, max_size=n).map(tuple),
            st.lists(children, min_size=n + 1, max_size=n + 1).map(tuple))),
        st.builds(ast.Ternary, children, children, children),
        st.builds(ast.Call, st.sampled_from(FUNC_NAMES),
                  st.lists(children, max_size=3).map(tuple), _keywords(children)),
        st.builds(ast.Tuple, st.lists(children, min_size=2, max_size=3).map(tuple)),
        st.builds(ast.Index, names, small),
        st.builds(ast.Attr, children, st.sampled_from(AXES)),
    )


def exprs(max_leaves: int = 12):
    """Random expressions of bounded size over index variables, parameters and all operators."""
    return st.recursive(_leaves(), _extend, max_leaves=max_leaves)


def _params(max_size=3):
    return st.lists(st.tuples(names, st.one_of(st.none(), exprs(4))), max_size=max_size,
                    unique_by=lambda p: p[0]).map(lambda ps: tuple(ast.Param(n, d) for n, d in ps))


headers = st.builds(ast.Header, names, _params())
layouts = st.builds(ast.LayoutDecl, st.just("grid"),
                    st.lists(st.tuples(st.sampled_from(AXES), exprs(3)), min_size=1, max_size=3,
                             unique_by=lambda a: a[0]).map(
                        lambda axes: tuple(ast.Keyword(n, v) for n, v in axes)))
dims = st.one_of(st.builds(ast.Name, st.sampled_from(("b", "h", "q", "k", "q_blocks", "k_blocks"))),
                 st.builds(ast.Num, st.integers(1, 64)))
inputs = st.builds(ast.InputDecl, names, st.sampled_from(("int", "float", "bool")),
                   st.lists(dims, min_size=1, max_size=4).map(tuple))
defs = st.builds(ast.Def, names, _params(), exprs(8))
clauses = st.one_of(st.builds(ast.MaskClause, exprs()), st.builds(ast.ScoreClause, exprs(6)),
                    st.builds(ast.OutputClause, st.just("scale"), exprs(4)))


@st.composite
def specs(draw):
    """A whole spec: a header with layout/inputs/defs/clauses, or (sometimes) a headerless
    file of defs only."""
    if draw(st.integers(0, 4)) == 0:
        return ast.Spec(None, tuple(draw(st.lists(defs, max_size=3))))
    decls = []
    decls += draw(st.lists(layouts, max_size=1))
    decls += draw(st.lists(inputs, max_size=2))
    decls += draw(st.lists(defs, max_size=2))
    decls += draw(st.lists(clauses, max_size=3))
    order = draw(st.permutations(decls)) if decls else []
    return ast.Spec(draw(headers), tuple(order))
