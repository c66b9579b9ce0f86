"""Simplification of the mask IR: a table of named rewrite rules run to a fixed point.

Pre: any IR expression (bool, int or float). Post: an equivalent expression — the same value
at every point where the input is defined (DESIGN §4: floor `//` and `%`) — usually smaller.
Rules never *introduce* undefined values; a few discard subexpressions whose value cannot
matter (`x & false`), exactly like the dense reference does.

Each rule is a function `node -> replacement | None`, applied bottom-up to every node (whose
children are already simplified); the engine repeats until no rule fires. Affine integer
subexpressions are normalized through linear forms (`attncc.ir.intervals.linear_form`):
`(q + 3) - 1` becomes `q + 2`, `(q - k) - (q - k)` becomes `0`, and a comparison whose two
sides differ by a constant folds (`q + 1 > q` is `true`).

`substitute(expr, {"Q_LEN": 4096, ...})` replaces variables by constants (lengths, a head
index) before simplifying, which is how schedules specialize a pattern to one shape.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, Mapping, Optional

from ..ir.intervals import linear_form
from ..ir.nodes import (BOOL, FALSE, INT, TRUE, Binary, Const, Expr, Load, Select, Unary, Var,
                        transform, walk)
from ..ir.pattern import Pattern

Rule = Callable[[Expr], Optional[Expr]]

_FLIP = {"lt": "ge", "le": "gt", "gt": "le", "ge": "lt", "eq": "ne", "ne": "eq"}
_SWAP = {"lt": "gt", "le": "ge", "gt": "lt", "ge": "le", "eq": "eq", "ne": "ne"}


def _is_const(*xs) -> bool:
    return all(isinstance(x, Const) for x in xs)


def _total(e: Expr) -> bool:
    """True when `e` is defined everywhere (no division, modulo or input reads), so it may be
    dropped from an expression without hiding an error of the dense reference."""
    return not any((isinstance(n, Binary) and n.op in ("floordiv", "mod", "div"))
                   or isinstance(n, Load) for n in walk(e))


def _cmp(op, x, y) -> bool:
    return {"lt": x < y, "le": x <= y, "gt": x > y, "ge": x >= y, "eq": x == y,
            "ne": x != y}[op]


# ---- rules ----------------------------------------------------------------------------------

def fold_constants(n: Expr) -> Optional[Expr]:
    """Operators whose operands are all constants (floor `//`/`%`; never divides by zero)."""
    if isinstance(n, Unary) and isinstance(n.x, Const):
        v = n.x.value
        if n.op == "neg":
            return Const(-v)
        if n.op == "abs":
            return Const(abs(v))
        if n.op == "not":
            return Const(not v)
        return Const(float(v))
    if isinstance(n, Binary) and _is_const(n.a, n.b):
        x, y, op = n.a.value, n.b.value, n.op
        if op in ("floordiv", "mod", "div") and y == 0:
            return None
        if op in ("and", "or"):
            return Const(bool(x and y) if op == "and" else bool(x or y))
        if op in _FLIP:
            return Const(bool(_cmp(op, x, y)))
        value = {"add": lambda: x + y, "sub": lambda: x - y, "mul": lambda: x * y,
                 "floordiv": lambda: x // y, "mod": lambda: x % y, "div": lambda: x / y,
                 "min": lambda: min(x, y), "max": lambda: max(x, y)}[op]()
        return Const(value)
    return None


def select_constant_condition(n: Expr) -> Optional[Expr]:
    """`true ? a : b` → a, `false ? a : b` → b, `c ? a : a` → a."""
    if isinstance(n, Select):
        if isinstance(n.cond, Const):
            return n.a if n.cond.value else n.b
        if n.a is n.b:
            return n.a
        if n.a is TRUE and n.b is FALSE:
            return n.cond
    return None


def logic_identities(n: Expr) -> Optional[Expr]:
    """`x & true`, `x | false` → x; `x & false` → false; `x | true` → true; `x & x`, `x | x`
    → x; `x & !x` → false; `x | !x` → true."""
    if not (isinstance(n, Binary) and n.op in ("and", "or")):
        return None
    unit, zero = (TRUE, FALSE) if n.op == "and" else (FALSE, TRUE)
    for x, y in ((n.a, n.b), (n.b, n.a)):
        if x is unit:
            return y
        if x is zero:
            return zero
    if n.a is n.b:
        return n.a
    if _complement(n.a, n.b) and _total(n.a):
        return zero
    return None


def _complement(x: Expr, y: Expr) -> bool:
    """x is `!y`, or x and y are opposite comparisons of the same int operands."""
    if (isinstance(x, Unary) and x.op == "not" and x.x is y) or \
            (isinstance(y, Unary) and y.op == "not" and y.x is x):
        return True
    return (isinstance(x, Binary) and isinstance(y, Binary) and x.op in _FLIP
            and y.op == _FLIP[x.op] and x.a is y.a and x.b is y.b and x.a.dtype != "float")


def double_negation(n: Expr) -> Optional[Expr]:
    """`!!x` → x, `--x` → x."""
    if isinstance(n, Unary) and isinstance(n.x, Unary) and n.x.op == n.op and n.op in ("not", "neg"):
        return n.x.x
    return None


def negated_comparison(n: Expr) -> Optional[Expr]:
    """`!(a < b)` → `a >= b` (ints and bools; floats keep the `!` because of NaN)."""
    if isinstance(n, Unary) and n.op == "not" and isinstance(n.x, Binary) and n.x.op in _FLIP:
        if n.x.a.dtype != "float":
            return Binary(_FLIP[n.x.op], n.x.a, n.x.b)
    return None


def boolean_equality(n: Expr) -> Optional[Expr]:
    """`x == true` → x, `x == false` → !x, `x != true` → !x, `x != false` → x."""
    if isinstance(n, Binary) and n.op in ("eq", "ne") and n.a.dtype == BOOL:
        for x, c in ((n.a, n.b), (n.b, n.a)):
            if isinstance(c, Const):
                keep = c.value if n.op == "eq" else not c.value
                return x if keep else Unary("not", x)
    return None


def arithmetic_identities(n: Expr) -> Optional[Expr]:
    """`x * 1`, `x // 1` → x; `x % 1` → 0; `min(x, x)`, `max(x, x)` → x;
    `x * 0` → 0 for total x; min/max of comparable affine forms (`min(q, q + 3)` → q)."""
    if not isinstance(n, Binary) or n.dtype != INT:
        return None
    a, b, op = n.a, n.b, n.op
    if op == "mul":
        for x, y in ((a, b), (b, a)):
            if isinstance(y, Const) and y.value == 1:
                return x
            if isinstance(y, Const) and y.value == 0 and _total(x):
                return Const(0)
    if op == "floordiv" and isinstance(b, Const) and b.value == 1:
        return a
    if op == "mod" and isinstance(b, Const) and b.value in (1, -1) and _total(a):
        return Const(0)
    if op in ("min", "max"):
        if a is b:
            return a
        d = _difference(a, b)
        if d is not None:
            a_smaller = d <= 0
            return (a if a_smaller else b) if op == "min" else (b if a_smaller else a)
    return None


def _difference(a: Expr, b: Expr) -> Optional[int]:
    """a - b when it is a constant (same affine atoms), else None."""
    ca, ka = linear_form(a)
    cb, kb = linear_form(b)
    if ca == cb:
        return ka - kb
    return None


def affine_normalize(n: Expr) -> Optional[Expr]:
    """Rewrite an integer `+`/`-`/`neg`/`*const` tree as its canonical linear form when that
    is smaller (e.g. `(q + 3) - 1` → `q + 2`, `(x - y) + y` → `x`)."""
    if n.dtype != INT or not (
            (isinstance(n, Binary) and n.op in ("add", "sub", "mul")) or
            (isinstance(n, Unary) and n.op == "neg")):
        return None
    coeffs, const = linear_form(n)
    if len(coeffs) == 1 and coeffs.get(n) == 1:
        return None
    # Atoms that cancel out must be defined everywhere (else an error would be hidden).
    if any(a not in coeffs and not _total(a) for a in _affine_leaves(n)):
        return None
    out = build_linear(coeffs, const)
    return out if _size(out) < _size(n) else None


def _affine_leaves(n: Expr) -> list[Expr]:
    """The operands at the bottom of the `+ - neg *const` tree rooted at `n`."""
    out, stack = [], [n]
    while stack:
        x = stack.pop()
        if (isinstance(x, Binary) and x.op in ("add", "sub", "mul")) or \
                (isinstance(x, Unary) and x.op == "neg"):
            stack.extend(x.children())
        elif not isinstance(x, Const):
            out.append(x)
    return out


def build_linear(coeffs: Mapping[Expr, int], const: int) -> Expr:
    """IR for `const + Σ c·atom` in a canonical order (atoms sorted by printed form; positive
    terms first, so `q - k + 3` rather than `-k + q + 3`)."""
    from ..ir.printer import format_expr
    items = sorted(coeffs.items(), key=lambda t: (t[1] < 0, format_expr(t[0])))
    out: Optional[Expr] = None
    for atom, c in items:
        mag = abs(c)
        term = atom if mag == 1 else Binary("mul", atom, Const(mag))
        if out is None:
            out = term if c > 0 else Unary("neg", term)
        else:
            out = Binary("add" if c > 0 else "sub", out, term)
    if out is None:
        return Const(const)
    if const > 0:
        return Binary("add", out, Const(const))
    if const < 0:
        return Binary("sub", out, Const(-const))
    return out


def _size(e: Expr) -> int:
    return sum(1 for _ in walk(e))


def divide_affine(n: Expr) -> Optional[Expr]:
    """`(c·X + k) // c` → `X + k // c` and `(c·X + k) % c` → `k % c` for a constant c ≠ 0
    and an affine X (floor semantics make both exact)."""
    if not (isinstance(n, Binary) and n.op in ("floordiv", "mod") and isinstance(n.b, Const)
            and n.b.value != 0 and n.dtype == INT):
        return None
    c = n.b.value
    coeffs, const = linear_form(n.a)
    if not coeffs or any(v % c for v in coeffs.values()):
        return None
    if n.op == "mod":
        return Const(const % c) if _total(n.a) else None
    return build_linear({a: v // c for a, v in coeffs.items()}, const // c)


def compare_affine(n: Expr) -> Optional[Expr]:
    """A comparison of two int expressions whose difference is a constant folds:
    `q + 1 > q` → true, `k - k < 3` → true."""
    if isinstance(n, Binary) and n.op in _FLIP and n.a.dtype == INT:
        d = _difference(n.a, n.b)
        if d is not None and _total(n):
            return Const(bool(_cmp(n.op, d, 0)))
    return None


def constant_left(n: Expr) -> Optional[Expr]:
    """`3 < q` → `q > 3` (constants on the right of comparisons)."""
    if isinstance(n, Binary) and n.op in _FLIP and isinstance(n.a, Const) \
            and not isinstance(n.b, Const):
        return Binary(_SWAP[n.op], n.b, n.a)
    return None


RULES: tuple[tuple[str, Rule], ...] = (
    ("fold_constants", fold_constants),
    ("select_constant_condition", select_constant_condition),
    ("logic_identities", logic_identities),
    ("double_negation", double_negation),
    ("negated_comparison", negated_comparison),
    ("boolean_equality", boolean_equality),
    ("arithmetic_identities", arithmetic_identities),
    ("affine_normalize", affine_normalize),
    ("divide_affine", divide_affine),
    ("compare_affine", compare_affine),
    ("constant_left", constant_left),
)

_MAX_ROUNDS = 50


# IR nodes are interned and immutable, so rule results can be cached per node for the
# lifetime of the process (the interning table keeps every node alive anyway).
_RESULT: dict[Expr, Optional[Expr]] = {}


def _apply_rules(n: Expr) -> Optional[Expr]:
    if n in _RESULT:
        return _RESULT[n]
    out = _rewrite_node(n)
    _RESULT[n] = out
    return out


def _rewrite_node(n: Expr) -> Optional[Expr]:
    changed = False
    for _ in range(_MAX_ROUNDS):
        for _name, rule in RULES:
            out = rule(n)
            if out is not None and out is not n:
                n, changed = out, True
                break
        else:
            break
    return n if changed else None


def simplify(expr: Expr) -> Expr:
    """`expr` rewritten by `RULES` to a fixed point (an equivalent, usually smaller IR)."""
    for _ in range(_MAX_ROUNDS):
        out = transform(expr, _apply_rules)
        if out is expr:
            return out
        expr = out
    return expr


def substitute(expr: Expr, values: Mapping[str, object]) -> Expr:
    """`expr` with each `Var(name)` in `values` replaced: an int/bool becomes a `Const`, an
    `Expr` is inserted as is. Not simplified (call `simplify`)."""
    repl = {name: (v if isinstance(v, Expr) else Const(v)) for name, v in values.items()}

    def fn(n: Expr):
        if isinstance(n, Var) and n.name in repl:
            return repl[n.name]
        return None
    return transform(expr, fn)


def simplify_pattern(p: Pattern, values: Optional[Mapping[str, object]] = None) -> Pattern:
    """`p` with mask, score and output scale simplified (after substituting `values`)."""
    def go(e):
        if e is None:
            return None
        return simplify(substitute(e, values) if values else e)
    return replace(p, mask=go(p.mask), score=go(p.score), output_scale=go(p.output_scale))


def opt_text(pattern: Pattern) -> str:
    """The simplified IR dump of `pattern` (the CLI's `--stage opt`)."""
    return simplify_pattern(pattern).ir_text()
