"""Syntax errors: exact text (location, message, source line, caret) and no lark internals."""
import re

import pytest
from hypothesis import given, strategies as st

from attncc.frontend.errors import SpecError
from attncc.frontend.format import format_spec
from attncc.frontend.parser import _parser, parse_expr, parse_spec

from strategies import specs

# (spec text, the complete error text)
CASES = [
    ("pattern p\nmask q - < 3\n",
     "spec.attn:2:10: error: expected an expression, found '<'\n"
     "  mask q - < 3\n"
     "           ^"),
    ("pattern p\nmask causal & (q - k < 4\nscore s\n",
     "spec.attn:2:15: error: unterminated '(': expected ')' before 'score' on line 3\n"
     "  mask causal & (q - k < 4\n"
     "                ^"),
    ("pattern p\nmask f(a, b",
     "spec.attn:2:7: error: unterminated '(': expected ')' before the end of the file\n"
     "  mask f(a, b\n"
     "        ^"),
    ("pattern p\nmask q - k) < 4\n",
     "spec.attn:2:11: error: unmatched ')'\n"
     "  mask q - k) < 4\n"
     "            ^"),
    ("pattern p\nmask doc[b, q)\n",
     "spec.attn:2:14: error: expected ']' to close the '[' at line 2, column 9, found ')'\n"
     "  mask doc[b, q)\n"
     "               ^"),
    ("pattern p\nmask q $ k\n",
     "spec.attn:2:8: error: unexpected character '$'\n"
     "  mask q $ k\n"
     "         ^"),
    ("pattern p\nmask \"causal\"\n",
     "spec.attn:2:6: error: unexpected character '\"' (the language has no strings)\n"
     "  mask \"causal\"\n"
     "       ^"),
    ("pattern (w = 3)\nmask causal\n",
     "spec.attn:1:9: error: expected a name after 'pattern', found '('\n"
     "  pattern (w = 3)\n"
     "          ^"),
    ("pattern mask\nmask causal\n",
     "spec.attn:1:9: error: expected a name after 'pattern', found keyword 'mask' "
     "('mask' is a reserved word)\n"
     "  pattern mask\n"
     "          ^~~~"),
    ("pattern p\ninput x: float\nmask causal\n",
     "spec.attn:2:15: error: expected '[' and the input's dimensions, found end of line "
     "(for example 'input gate: float[b, h, q, k]')\n"
     "  input x: float\n"
     "                ^"),
    ("pattern p\nmask   # nothing yet\n",
     "spec.attn:2:5: error: 'mask' clause needs an expression\n"
     "  mask   # nothing yet\n"
     "      ^"),
    ("pattern p\nmask causal k\n",
     "spec.attn:2:13: error: expected an operator or end of line, found name 'k'\n"
     "  mask causal k\n"
     "              ^"),
    ("pattern p\nmask f(a b)\n",
     "spec.attn:2:10: error: expected ',' or ')', found name 'b'\n"
     "  mask f(a b)\n"
     "           ^"),
    ("pattern p\nmask q - k < 4096x\n",
     "spec.attn:2:14: error: invalid number literal '4096x'\n"
     "  mask q - k < 4096x\n"
     "               ^~~~~"),
    ("pattern p\nmask k < 1.2.3\n",
     "spec.attn:2:10: error: invalid number literal '1.2.3'\n"
     "  mask k < 1.2.3\n"
     "           ^~~~~"),
    ("pattern p\nmask k < 9223372036854775808\n",
     "spec.attn:2:10: error: integer literal '9223372036854775808' does not fit in 64 bits\n"
     "  mask k < 9223372036854775808\n"
     "           ^~~~~~~~~~~~~~~~~~~"),
    ("pattern p\nmsk causal\n",
     "spec.attn:2:1: error: expected a declaration (pattern, layout, input, def, mask, score or "
     "output), found name 'msk' (did you mean 'mask'?)\n"
     "  msk causal\n"
     "  ^~~"),
    ("mask causal\n",
     "spec.attn:1:1: error: expected 'pattern NAME' before the first declaration "
     "(a file without a pattern header may only contain 'def's)\n"
     "  mask causal\n"
     "  ^~~~~~~~~~~"),
    ("pattern p\nmask a ? b\n",
     "spec.attn:2:11: error: unexpected end of line: expected ':'\n"
     "  mask a ? b\n"
     "            ^"),
    ("pattern p\ndef f(x)\n",
     "spec.attn:2:9: error: unexpected end of line: a 'def' needs '= expression'\n"
     "  def f(x)\n"
     "          ^"),
    ("pattern p\noutput w[b, q, h]\n",
     "spec.attn:2:8: error: unknown output modifier 'w' "
     "(the output modifier is 'scale', as in 'output scale w[b, q, h]')\n"
     "  output w[b, q, h]\n"
     "         ^"),
    ("pattern p\nmask a ? b",
     "spec.attn:2:11: error: unexpected end of file: expected ':'\n"
     "  mask a ? b\n"
     "            ^"),
    ("pattern p\nmask q = k\n",
     "spec.attn:2:8: error: expected an operator or end of line, found '=' "
     "(equality is written '==')\n"
     "  mask q = k\n"
     "         ^"),
    ("pattern p\nmask causal && q < k\n",
     "spec.attn:2:14: error: expected an expression, found '&' ('&&' is written '&')\n"
     "  mask causal && q < k\n"
     "               ^"),
    ("pattern p\nmask causal;\n",
     "spec.attn:2:12: error: unexpected character ';' (a declaration ends at the end of its line)\n"
     "  mask causal;\n"
     "             ^"),
    ("pattern p\n\tmask (q,)\n",
     "spec.attn:2:10: error: expected an expression, found ')'\n"
     "  \tmask (q,)\n"
     "  \t        ^"),
]


@pytest.mark.parametrize("text,message", CASES, ids=[c[1].split("error: ")[1][:40] for c in CASES])
def test_exact_error_text(text, message):
    with pytest.raises(SpecError) as info:
        parse_spec(text, "spec.attn")
    assert str(info.value) == message
    assert len(info.value.diagnostics) == 1
    # No lark exception is chained to the user's error.
    err = info.value
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__)


def test_crlf_error_location():
    with pytest.raises(SpecError) as info:
        parse_spec("pattern p\r\nmask q - \r\nscore s\r\n", "w.attn")
    assert str(info.value) == ("w.attn:2:9: error: expected an expression, found end of line\n"
                               "  mask q - \n"
                               "          ^")


def test_several_checks_are_reported_at_once():
    text = ("pattern p(a, a)\n"
            "layout grod(y = 4, y = 2)\n"
            "input g: flot[b, q]\n"
            "output sclae g[b, q, 0]\n"
            "mask f(top = 1, 2)\n"
            "pattern again\n")
    with pytest.raises(SpecError) as info:
        parse_spec(text, "many.attn")
    assert [str(d.loc) + " " + d.message + (f" ({d.hint})" if d.hint else "")
            for d in info.value.diagnostics] == [
        "many.attn:1:14 duplicate parameter 'a'",
        "many.attn:2:8 unknown layout 'grod' (the layout kinds are grid, tokens, q_grid, q_tokens, "
            "k_grid and k_tokens)",
        "many.attn:2:20 duplicate axis 'y'",
        "many.attn:3:10 unknown dtype 'flot' (did you mean 'float'?)",
        "many.attn:4:8 unknown output modifier 'sclae' "
        "(the output modifier is 'scale', as in 'output scale w[b, q, h]')",
        "many.attn:5:17 positional argument after a keyword argument",
        "many.attn:6:1 the 'pattern' header must be the first declaration",
    ]


def test_expression_errors():
    with pytest.raises(SpecError) as info:
        parse_expr("q <\nk", "e")
    assert str(info.value).splitlines()[0] == "e:1:4: error: expected an expression, found end of line"
    with pytest.raises(SpecError) as info:
        parse_expr("1e999", "e")
    assert str(info.value).splitlines()[0] == "e:1:1: error: float literal '1e999' is too large"


# ---- no lark internals in any message ---------------------------------------------------------

def _internal_names():
    names = {t.name for t in _parser().terminals} - {"NAME", "NUMBER"}
    return names | {"$END", "Token(", "Tree(", "lark", "Traceback", "UnexpectedToken"}


def _message_words(err: SpecError) -> str:
    """The message lines only (not the source excerpts), with quoted user text removed."""
    lines = [line for line in str(err).splitlines() if ": error: " in line]
    return re.sub(r"'[^']*'", "''", "\n".join(lines))


def _check_clean(text: str) -> None:
    try:
        parse_spec(text, "fuzz.attn")
    except SpecError as err:
        words = _message_words(err)
        assert words, str(err)
        leaked = [n for n in _internal_names() if re.search(r"(?<![A-Za-z_])" + re.escape(n), words)]
        assert not leaked, f"{leaked} in {words!r}"


@given(specs(), st.data())
def test_mutated_specs_fail_cleanly(spec, data):
    """Deleting, duplicating or inserting one character either still parses or gives a
    SpecError in words; never a lark exception or a raw token name."""
    text = format_spec(spec)
    if not text:
        return
    i = data.draw(st.integers(0, len(text) - 1))
    how = data.draw(st.sampled_from(("delete", "insert", "duplicate")))
    if how == "delete":
        text = text[:i] + text[i + 1:]
    elif how == "duplicate":
        text = text[:i] + text[i] + text[i:]
    else:
        ch = data.draw(st.sampled_from(list("()[],=:?!<>-+*/%&|.#$@\"'\n 0aZ_") + ["mask", "pattern"]))
        text = text[:i] + ch + text[i:]
    _check_clean(text)


@pytest.mark.parametrize("text", [
    "", "(", ")", "[", "]", ",", "pattern", "pattern p(", "pattern p(a =", "pattern p\ninput",
    "pattern p\ninput x", "pattern p\ninput x:", "pattern p\ninput x: int[", "pattern p\nlayout",
    "pattern p\nlayout grid(", "pattern p\nlayout grid()", "pattern p\ndef", "pattern p\ndef f(",
    "pattern p\ndef f =", "pattern p\noutput", "pattern p\noutput scale", "pattern p\nscore",
    "pattern p\nmask q.", "pattern p\nmask q[", "pattern p\nmask q[]", "pattern p\nmask f(,)",
    "pattern p\nmask ()", "pattern p\nmask a ? : b", "pattern p\nmask true false",
    "pattern p\nmask -", "pattern p\nmask !", "pattern p\nmask not", "pattern p\nmask 1.",
    "pattern p\nmask 1e", "pattern p\nmask q.3", "pattern p\nmask f(x)(y)", "pattern p\nmask (a)[1]",
])
def test_truncated_inputs_fail_cleanly(text):
    _check_clean(text)


def test_empty_expression_and_deep_nesting():
    with pytest.raises(SpecError) as info:
        parse_expr("", "e")
    assert str(info.value) == "e:1:1: error: expected an expression, found end of file"
    with pytest.raises(SpecError) as info:
        parse_expr("-" * 5000 + "x", "e")
    assert str(info.value) == "error: expression nested too deeply"


def test_byte_order_mark_is_ignored():
    spec = parse_spec("\ufeffpattern p\nmask q\n", "bom.attn")
    assert spec.header.loc.col == 1
    with pytest.raises(SpecError) as info:
        parse_spec("\ufeffpattern p $\n", "bom.attn")
    assert str(info.value) == ("bom.attn:1:11: error: unexpected character '$'\n"
                               "  pattern p $\n"
                               "            ^")
