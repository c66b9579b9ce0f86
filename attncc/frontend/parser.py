"""Parser: `.attn` text → AST (`attncc.frontend.ast`), with source locations and plain-word
syntax errors.

Precondition: any text. Postcondition: either an `ast.Spec` whose every node carries a
1-based `Loc`, or a `SpecError` whose message reads

    spec.attn:2:12: error: expected an expression, found ')'
      mask causal & (q - )
                         ^

No lark exception ever escapes; lark's token names (`RPAR`, `__ANON_3`, `$END`) never appear
in a message. The grammar lives in `grammar/attn.lark` (package `attncc.grammar`); the Lark
object is built once per process.

Beyond the grammar, this pass checks what a reader would call syntax: number spellings
(integers must fit in int64), the `pattern` header comes first (a file without one may only
hold `def`s), layout kind `grid`, input dtypes `int | float | bool`, output modifier `scale`,
no positional argument after a keyword argument, no duplicate names in one parameter,
argument or axis list. Such errors are collected and raised once.
"""
from __future__ import annotations

import re
import threading
from importlib import resources
from typing import Optional

from . import ast
from .errors import Diagnostic, Diagnostics, SpecError, suggest

__all__ = ["parse_spec", "parse_expr"]

_INT64_MAX = 2 ** 63 - 1
_INT_RE = re.compile(r"[0-9]+")
_FLOAT_RE = re.compile(r"[0-9]+\.[0-9]*(?:[eE][+-]?[0-9]+)?|[0-9]+[eE][+-]?[0-9]+")

DTYPES = ("int", "float", "bool")
LAYOUT_KINDS = ("grid", "tokens", "q_grid", "k_grid", "q_tokens", "k_tokens")
OUTPUT_KINDS = ("scale",)
NORMALIZE_KINDS = ("softmax", "none")
KEYWORDS = ("pattern", "layout", "input", "def", "mask", "score", "normalize", "output",
            "and", "or", "not", "true", "false")
_DECL_WORDS = ("pattern", "layout", "input", "def", "mask", "score", "normalize", "output")

_OPEN = {"LPAR": "RPAR", "LSQB": "RSQB"}
_CLOSE = {"RPAR": "LPAR", "RSQB": "LSQB"}
_KEYWORD_TYPES = frozenset(k.upper() for k in KEYWORDS)
_DECL_TYPES = frozenset(k.upper() for k in _DECL_WORDS)
_EXPR_START = frozenset({"NAME", "NUMBER", "LPAR", "MINUS", "BANG", "NOT", "TRUE", "FALSE"})
_END = frozenset({"_NL", "$END"})


# ---- lark setup -------------------------------------------------------------------------------

class _Brackets:
    """Post-lexer: drops newlines inside ( ) and [ ], and remembers, per thread, the open
    brackets and the tokens of the current line so that errors can be explained."""

    always_accept = ("_NL",)

    def __init__(self) -> None:
        self.local = threading.local()

    def process(self, stream):
        state = self.local
        state.stack = []     # open bracket tokens
        state.line = []      # tokens of the current declaration so far
        for tok in stream:
            if tok.type == "_NL":
                if state.stack:
                    continue
                yield tok
                state.line = []
                continue
            yield tok
            # Updated after the parser accepted the token: at an error, the state describes
            # what came before the offending token.
            state.line.append(tok)
            if tok.type in _OPEN:
                state.stack.append(tok)
            elif tok.type in _CLOSE and state.stack and state.stack[-1].type == _CLOSE[tok.type]:
                state.stack.pop()


_LOCK = threading.Lock()
_LARK = None
_POSTLEX: Optional[_Brackets] = None


def _parser():
    """The module-wide Lark LALR parser (built on first use)."""
    global _LARK, _POSTLEX
    if _LARK is None:
        with _LOCK:
            if _LARK is None:
                import lark
                text = (resources.files("attncc.grammar") / "attn.lark").read_text(encoding="utf-8")
                postlex = _Brackets()
                _LARK = lark.Lark(text, parser="lalr", lexer="basic", propagate_positions=True,
                                  maybe_placeholders=True, postlex=postlex,
                                  start=["start", "expr"])
                _POSTLEX = postlex
    return _LARK


# ---- public entry points ----------------------------------------------------------------------

def parse_spec(text: str, filename: str = "<spec>") -> ast.Spec:
    """Parse a whole `.attn` file into an `ast.Spec` (header None for a file of defs only).

    Raises `SpecError` (one diagnostic for a syntax error, all of them for the checks listed
    in the module docstring) with `file:line:col`, the source line and a caret."""
    text = _strip_bom(text)
    tree = _run(text, filename, "start")
    conv = _Converter(text, filename)
    spec = _convert(conv.spec, tree, text)
    conv.diags.raise_if_any()
    return spec


def parse_expr(text: str, filename: str = "<expr>") -> ast.Expr:
    """Parse one expression (newlines allowed inside brackets only). Raises `SpecError`."""
    text = _strip_bom(text)
    tree = _run(text.rstrip(), filename, "expr")
    conv = _Converter(text, filename)
    expr = _convert(conv.expr, tree, text)
    conv.diags.raise_if_any()
    return expr


def _strip_bom(text: str) -> str:
    if not isinstance(text, str):
        raise TypeError(f"spec text must be str, not {type(text).__name__}")
    return text[1:] if text.startswith("\ufeff") else text


def _convert(fn, tree, text: str):
    try:
        return fn(tree)
    except RecursionError:
        pass
    raise SpecError([Diagnostic(None, "expression nested too deeply")], text)


def _run(text: str, filename: str, start: str):
    import lark.exceptions as lex
    parser = _parser()
    try:
        return parser.parse(text, start=start)
    except lex.UnexpectedCharacters as e:
        diag = _char_error(e, text, filename)
    except lex.UnexpectedToken as e:
        diag = _token_error(e, text, filename)
    except lex.UnexpectedEOF:
        diag = Diagnostic(_eof_loc(text, filename), "unexpected end of file")
    except lex.LarkError as e:  # pragma: no cover - any other lark failure is still a spec error
        diag = Diagnostic(None, f"cannot parse the spec ({type(e).__name__})")
    except RecursionError:
        diag = Diagnostic(None, "expression nested too deeply")
    raise SpecError([diag], text) from None


# ---- syntax error messages --------------------------------------------------------------------

def _tok_loc(tok, filename: str) -> ast.Loc:
    return ast.Loc(filename, tok.line, tok.column, tok.end_line, tok.end_column)


def _eof_loc(text: str, filename: str) -> ast.Loc:
    body = text.rstrip()
    line = body.count("\n") + 1
    col = len(body) - (body.rfind("\n") + 1) + 1
    return ast.Loc(filename, line, col)


def _char_error(e, text: str, filename: str) -> Diagnostic:
    ch = e.char
    shown = ch if ch.isprintable() else ascii(ch)[1:-1]
    hint = {"\"": "the language has no strings", "'": "the language has no strings",
            ";": "a declaration ends at the end of its line"}.get(ch)
    loc = ast.Loc(filename, e.line, e.column, e.line, e.column + 1)
    return Diagnostic(loc, f"unexpected character '{shown}'", hint)


def _describe(tok) -> str:
    """A found token in words."""
    if tok.type == "_NL":
        return "end of line"
    if tok.type == "$END":
        return "end of file"
    if tok.type == "NAME":
        return f"name '{tok.value}'"
    if tok.type == "NUMBER":
        return f"number '{tok.value}'"
    if tok.type in _KEYWORD_TYPES:
        return f"keyword '{tok.value}'"
    return f"'{tok.value}'"


def _word(name: str) -> str:
    """An expected terminal in words."""
    if name == "NAME":
        return "a name"
    if name == "NUMBER":
        return "a number"
    if name == "_NL":
        return "end of line"
    if name == "$END":
        return "end of file"
    term = _parser().get_terminal(name)
    return f"'{term.pattern.value}'"


def _join(words: list[str]) -> str:
    words = list(dict.fromkeys(words))
    if len(words) <= 1:
        return "".join(words)
    return ", ".join(words[:-1]) + " or " + words[-1]


def _where(tok) -> str:
    return f"line {tok.line}, column {tok.column}"


def _token_error(e, text: str, filename: str) -> Diagnostic:
    tok = e.token
    try:  # the exact set of acceptable terminals (lark's `expected` merges LALR lookaheads)
        expected = set(e.interactive_parser.accepts())
    except Exception:  # pragma: no cover - older lark without an interactive parser
        expected = set(e.expected)
    if "$END" in expected:
        expected.add("_NL")
    state = _POSTLEX.local
    stack = list(getattr(state, "stack", []))
    line = list(getattr(state, "line", []))
    found = _describe(tok)
    if tok.type in _END and line:  # just after the last token (not after a trailing comment)
        last = line[-1]
        loc = ast.Loc(filename, last.end_line, last.end_column)
    elif tok.type == "$END":
        loc = _eof_loc(text, filename)
    else:
        loc = _tok_loc(tok, filename)

    # Brackets left open at the end of the file or at the next declaration.
    if stack and (tok.type == "$END" or (tok.type in _DECL_TYPES and tok.line > stack[-1].line)):
        opener = stack[-1]
        closer = _word(_OPEN[opener.type])
        before = "the end of the file" if tok.type == "$END" else f"'{tok.value}' on line {tok.line}"
        return Diagnostic(_tok_loc(opener, filename),
                          f"unterminated '{opener.value}': expected {closer} before {before}")
    # A closing bracket that closes nothing, or the wrong kind of bracket.
    if tok.type in _CLOSE:
        if not stack:
            return Diagnostic(loc, f"unmatched '{tok.value}'")
        if stack[-1].type != _CLOSE[tok.type]:
            opener = stack[-1]
            return Diagnostic(loc, f"expected {_word(_OPEN[opener.type])} to close the "
                                   f"'{opener.value}' at {_where(opener)}, found {found}")

    head = line[0].type if line else None
    # At the start of a line: a declaration keyword is due.
    if not line and expected & _DECL_TYPES:
        hint = suggest(tok.value, _DECL_WORDS) if tok.type == "NAME" else None
        return Diagnostic(loc, "expected a declaration (pattern, layout, input, def, mask, "
                               f"score or output), found {found}", hint)
    # A clause keyword with nothing after it.
    if tok.type in _END and expected >= {"NAME", "NUMBER", "LPAR"}:
        clause = None
        if len(line) == 1 and head in ("MASK", "SCORE"):
            clause = line[0].value
        elif len(line) == 2 and head == "OUTPUT" and line[1].value in OUTPUT_KINDS:
            clause = "output " + line[1].value
        if clause is not None:
            return Diagnostic(loc, f"'{clause}' clause needs an expression")
    # `output w[...]`: the modifier is missing.
    if head == "OUTPUT" and len(line) == 2 and line[1].value not in OUTPUT_KINDS:
        return Diagnostic(_tok_loc(line[1], filename), f"unknown output modifier '{line[1].value}'",
                          "the output modifier is 'scale', as in 'output scale w[b, q, h]'")
    # An expression is due.
    if expected >= {"NAME", "NUMBER", "LPAR"}:
        what = "an expression"
        if "RPAR" in expected:
            what += " or ')'"
        elif "RSQB" in expected:
            what += " or ']'"
        hint = None
        if tok.type in ("AMPERSAND", "VBAR") and line and line[-1].type == tok.type:
            hint = f"'{tok.value * 2}' is written '{tok.value}'"
        return Diagnostic(loc, f"expected {what}, found {found}", hint)
    # A name is due (after `pattern`, `def`, `input`, `.`, `output`, in parameter lists).
    if "NAME" in expected and expected <= {"NAME", "RPAR"}:
        after = f" after '{line[-1].value}'" if line and line[-1].type in _KEYWORD_TYPES | {"DOT"} else ""
        hint = f"'{tok.value}' is a reserved word" if tok.type in _KEYWORD_TYPES else None
        what = "a name or ')'" if "RPAR" in expected else "a name"
        if tok.type in _END:
            return Diagnostic(loc, f"unexpected {found}: expected {what}{after}", hint)
        return Diagnostic(loc, f"expected {what}{after}, found {found}", hint)
    # Context-specific shapes.
    if head == "INPUT" and expected == {"LSQB"}:
        return Diagnostic(loc, f"expected '[' and the input's dimensions, found {found}",
                          "for example 'input gate: float[b, h, q, k]'")
    if head == "INPUT" and "COLON" in expected:
        return Diagnostic(loc, f"expected ':' and a dtype after the input's name, found {found}",
                          "for example 'input gate: float[b, h, q, k]'")
    if head == "DEF" and "EQUAL" in expected and tok.type in _END:
        return Diagnostic(loc, "unexpected end of line: a 'def' needs '= expression'")
    # Generic: list what could come, with the operators collapsed into one word.
    ops = {n for n in expected if n in _operator_terminals()}
    closers = [n for n in ("RPAR", "RSQB") if n in expected]
    if len(ops) > 2 and closers:
        words = [_word(n) for n in ("COMMA",) if n in expected] + [_word(n) for n in closers]
    elif len(ops) > 2 and expected & _END:
        words = ["an operator", "end of line"]
    else:
        rest = expected - ops if len(ops) > 2 else expected
        words = ["an operator"] if len(ops) > 2 else []
        order = sorted(rest - _END, key=lambda n: (n not in ("COMMA", "RPAR", "RSQB"), n))
        words += [_word(n) for n in order]
        if rest & _END:
            words.append("end of line")
    if tok.type in _END:
        return Diagnostic(loc, f"unexpected {found}: expected {_join(words)}")
    hint = "equality is written '=='" if tok.value == "=" and "'=='" in map(_word, ops) else None
    return Diagnostic(loc, f"expected {_join(words)}, found {found}", hint)


_OPERATOR_TEXT = frozenset({"?", "|", "or", "&", "and", "<", "<=", ">", ">=", "==", "!=",
                            "+", "-", "*", "/", "//", "%", ".", "(", "["})
_OPERATOR_NAMES: Optional[frozenset] = None


def _operator_terminals() -> frozenset:
    """Names of the terminals that continue an expression after an operand."""
    global _OPERATOR_NAMES
    if _OPERATOR_NAMES is None:
        _OPERATOR_NAMES = frozenset(t.name for t in _parser().terminals
                                    if getattr(t.pattern, "value", None) in _OPERATOR_TEXT
                                    and t.pattern.type == "str")
    return _OPERATOR_NAMES


# ---- tree → AST -------------------------------------------------------------------------------

_BINARY = {"add": "+", "sub": "-", "mul": "*", "div": "/", "floordiv": "//", "mod": "%",
           "and_": "&", "or_": "|"}


class _Converter:
    """Turns lark's parse tree into AST nodes, collecting the checks of this pass."""

    def __init__(self, text: str, filename: str):
        self.filename = filename
        self.diags = Diagnostics(text, filename)

    def loc(self, item) -> Optional[ast.Loc]:
        if isinstance(item, str):  # a lark Token (a str subclass); trees are not strings
            return ast.Loc(self.filename, item.line, item.column, item.end_line, item.end_column)
        meta = item.meta
        if getattr(meta, "empty", True):
            return None
        return ast.Loc(self.filename, meta.line, meta.column, meta.end_line, meta.end_column)

    # ---- declarations

    def spec(self, tree) -> ast.Spec:
        header = None
        decls = []
        for i, item in enumerate(tree.children):
            if item.data == "header":
                node = self.header(item)
                if i != 0:
                    self.diags.error(node.loc, "the 'pattern' header must be the first declaration")
                elif header is None:
                    header = node
                continue
            decls.append(getattr(self, "decl_" + item.data)(item))
        if header is None:
            for decl in decls:
                if not isinstance(decl, ast.Def):
                    self.diags.error(decl.loc, "expected 'pattern NAME' before the first declaration",
                                     "a file without a pattern header may only contain 'def's")
                    break
        return ast.Spec(header, tuple(decls), loc=self.loc(tree))

    def header(self, tree) -> ast.Header:
        name, *rest = tree.children
        params = self.params(rest[0]) if rest and rest[0] is not None else ()
        return ast.Header(str(name), params, loc=self.loc(tree))

    def params(self, tree) -> tuple[ast.Param, ...]:
        out = []
        seen = set()
        for p in tree.children:
            name, default = p.children[0], (p.children[1] if len(p.children) > 1 else None)
            if str(name) in seen:
                self.diags.error(self.loc(name), f"duplicate parameter '{name}'")
            seen.add(str(name))
            out.append(ast.Param(str(name), None if default is None else self.expr(default),
                                 loc=self.loc(p)))
        return tuple(out)

    def decl_layout(self, tree) -> ast.LayoutDecl:
        kind, *axes = tree.children
        if str(kind) not in LAYOUT_KINDS:
            self.diags.error(self.loc(kind), f"unknown layout '{kind}'",
                             "the layout kinds are grid, tokens, q_grid, q_tokens, k_grid and k_tokens")
        kws = self.keywords(axes, "axis")
        return ast.LayoutDecl(str(kind), kws, loc=self.loc(tree))

    def decl_input(self, tree) -> ast.InputDecl:
        name, dtype, *dims = tree.children
        if str(dtype) not in DTYPES:
            hint = suggest(str(dtype), DTYPES) or "the dtypes are int, float and bool"
            self.diags.error(self.loc(dtype), f"unknown dtype '{dtype}'", hint)
        return ast.InputDecl(str(name), str(dtype), tuple(self.expr(d) for d in dims),
                             loc=self.loc(tree))

    def decl_defn(self, tree) -> ast.Def:
        name, *params, body = tree.children  # `def f = e` has no parameter list at all
        ps = self.params(params[0]) if params and params[0] is not None else ()
        return ast.Def(str(name), ps, self.expr(body), loc=self.loc(tree))

    def decl_mask(self, tree) -> ast.MaskClause:
        return ast.MaskClause(self.expr(tree.children[0]), loc=self.loc(tree))

    def decl_score(self, tree) -> ast.ScoreClause:
        return ast.ScoreClause(self.expr(tree.children[0]), loc=self.loc(tree))

    def decl_normalize(self, tree) -> ast.NormalizeClause:
        kind, = tree.children
        if str(kind) not in NORMALIZE_KINDS:
            hint = suggest(str(kind), NORMALIZE_KINDS) or "write 'normalize none' (no softmax) " \
                "or 'normalize softmax' (the default)"
            self.diags.error(self.loc(kind), f"unknown normalization '{kind}'", hint)
        return ast.NormalizeClause(str(kind), loc=self.loc(tree))

    def decl_output(self, tree) -> ast.OutputClause:
        kind, expr = tree.children
        if str(kind) not in OUTPUT_KINDS:
            self.diags.error(self.loc(kind), f"unknown output modifier '{kind}'",
                             "the output modifier is 'scale', as in 'output scale w[b, q, h]'")
        return ast.OutputClause(str(kind), self.expr(expr), loc=self.loc(tree))

    def keywords(self, trees, what: str) -> tuple[ast.Keyword, ...]:
        out = []
        seen = set()
        for kw in trees:
            name, value = kw.children
            if str(name) in seen:
                self.diags.error(self.loc(name), f"duplicate {what} '{name}'")
            seen.add(str(name))
            out.append(ast.Keyword(str(name), self.expr(value), loc=self.loc(kw)))
        return tuple(out)

    # ---- expressions

    def expr(self, t) -> ast.Expr:
        kind = t.data
        loc = self.loc(t)
        c = t.children
        if kind == "number":
            return ast.Num(self.number(c[0]), loc=loc)
        if kind == "name":
            return ast.Name(str(c[0]), loc=loc)
        if kind in _BINARY:
            return ast.Binary(_BINARY[kind], self.expr(c[0]), self.expr(c[1]), loc=loc)
        if kind == "compare":
            operands = tuple(self.expr(x) for x in c[0::2])
            ops = tuple(str(x.children[0]) for x in c[1::2])
            return ast.Compare(ops, operands, loc=loc)
        if kind == "neg":
            return ast.Unary("-", self.expr(c[0]), loc=loc)
        if kind == "not_":
            return ast.Unary("!", self.expr(c[0]), loc=loc)
        if kind == "cond":
            return ast.Ternary(self.expr(c[0]), self.expr(c[1]), self.expr(c[2]), loc=loc)
        if kind == "true":
            return ast.Bool(True, loc=loc)
        if kind == "false":
            return ast.Bool(False, loc=loc)
        if kind == "attr":
            return ast.Attr(self.expr(c[0]), str(c[1]), loc=loc)
        if kind == "index":
            return ast.Index(str(c[0]), tuple(self.expr(x) for x in c[1:]), loc=loc)
        if kind == "tuple":
            return ast.Tuple(tuple(self.expr(x) for x in c), loc=loc)
        if kind == "call":
            return self.call(t)
        raise AssertionError(f"unknown rule {kind}")  # pragma: no cover

    def call(self, t) -> ast.Call:
        name, args = t.children
        pos, kws = [], []
        for a in (args.children if args is not None else ()):
            if getattr(a, "data", None) == "kwarg":
                kws.append(a)
            else:
                if kws:
                    self.diags.error(self.loc(a), "positional argument after a keyword argument")
                pos.append(self.expr(a))
        return ast.Call(str(name), tuple(pos), self.keywords(kws, "keyword argument"),
                        loc=self.loc(t))

    def number(self, tok) -> int | float:
        text = str(tok)
        if _INT_RE.fullmatch(text):
            value = int(text)
            if value > _INT64_MAX:
                self.diags.error(self.loc(tok), f"integer literal '{text}' does not fit in 64 bits")
                return 0
            return value
        if _FLOAT_RE.fullmatch(text):
            value = float(text)
            if value == float("inf"):
                self.diags.error(self.loc(tok), f"float literal '{text}' is too large")
                return 0.0
            return value
        self.diags.error(self.loc(tok), f"invalid number literal '{text}'")
        return 0
