"""IR expression → Triton expression text, one renderer per node kind.

The renderer turns mask, score and output-scale IR into lines of Triton code for the
forward kernel. Leaves are bound by a `Scope` (which kernel variable holds `q`, `k`, `s`,
each coordinate, each input tensor). A node becomes a named local when it is shared
(used more than once in the rendered DAG) or when it is loop-invariant but feeds a
loop-varying node; loop-invariant locals are *hoisted* (computed once per program before
the key loops), the others are computed inside the loop that needs them.

Python semantics of `//` and `%` (floor) are kept: when both operands are provably
non-negative the plain Triton operators are emitted (truncation equals floor there),
otherwise small `@triton.jit` helpers with a sign correction are used (the helpers work
whether the target truncates or floors).

Safety: no spec text reaches the generated source except identifiers that pass
`safe_identifier` and numbers rendered with `repr` of Python int/float values.
"""
from __future__ import annotations

import keyword
import math
import re
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

from attncc.ir.nodes import (BOOL, FLOAT, INT, Binary, Blocks, Const, Coord, Expr, FCall, Load,
                             Route, Select, Unary, Var, walk)
from attncc.ir.printer import format_expr, strip_parens


class CodegenError(ValueError):
    """The pattern cannot be turned into a kernel (unsupported construct or unsafe name)."""


_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_MAX_IDENT = 64
_INT_LIMIT = 2 ** 63


def safe_identifier(name: object, what: str) -> str:
    """`name` if it is a plain ASCII identifier (not a keyword, at most 64 characters);
    raises CodegenError otherwise. Used for every name that reaches generated source."""
    if not isinstance(name, str) or not _IDENT.match(name) or not name.isidentifier() \
            or keyword.iskeyword(name) or len(name) > _MAX_IDENT:
        raise CodegenError(f"{what} {name!r} is not a valid identifier; it cannot be used in "
                           "generated code")
    return name


def render_number(value: object) -> str:
    """A Python int/float as source text (negative values parenthesized, infinities as
    `float('inf')`). Anything else raises CodegenError."""
    if isinstance(value, bool):
        raise CodegenError("booleans are not numbers here")
    if isinstance(value, int):
        if not -_INT_LIMIT <= value < _INT_LIMIT:
            raise CodegenError(f"integer constant {value} does not fit in 64 bits")
        text = repr(int(value))
    elif isinstance(value, float):
        if math.isnan(value):
            raise CodegenError("NaN constant")
        if math.isinf(value):
            return 'float("inf")' if value > 0 else 'float("-inf")'
        text = repr(float(value))
    else:
        raise CodegenError(f"constant of type {type(value).__name__} cannot be rendered")
    return f"({text})" if text.startswith("-") else text


# ---- helpers emitted into generated modules (only those used) ----------------------------

HELPERS = {
    "_floordiv": (
        "@triton.jit",
        "def _floordiv(a, b):",
        "    # Floor division (Python semantics) from the target's integer division.",
        "    q = a // b",
        "    r = a - q * b",
        "    return q - ((r != 0) & ((r < 0) != (b < 0))).to(q.dtype)",
    ),
    "_floormod": (
        "@triton.jit",
        "def _floormod(a, b):",
        "    # Modulo with the sign of the divisor (Python semantics).",
        "    r = a % b",
        "    return r + tl.where((r != 0) & ((r < 0) != (b < 0)), b, 0)",
    ),
    "_tanh": (
        "@triton.jit",
        "def _tanh(x):",
        "    # tanh from exp, stable for large |x| (tl.math has no tanh on every Triton version).",
        "    e = tl.exp(-2.0 * tl.abs(x))",
        "    t = (1.0 - e) / (1.0 + e)",
        "    return tl.where(x >= 0, t, -t)",
    ),
}

_FUNCS = {"exp": "tl.exp", "exp2": "tl.exp2", "log": "tl.log", "sqrt": "tl.sqrt", "tanh": "_tanh"}
_INFIX = {"add": "+", "sub": "-", "mul": "*", "div": "/", "lt": "<", "le": "<=", "gt": ">",
          "ge": ">=", "eq": "==", "ne": "!=", "and": "&", "or": "|"}
_NONNEG_VARS = frozenset({"b", "h", "q", "k", "Q_LEN", "KV_LEN", "HEADS",
                          "qt", "qt0", "qt1", "qt2", "qt3", "kt"})


def nonneg(node: Expr, memo: Optional[dict] = None) -> bool:
    """True when the integer expression is provably >= 0 (a small sign analysis: indices,
    lengths, coordinates and non-negative constants are >= 0; + * // min max abs and
    floor-mod by a non-negative divisor preserve it)."""
    memo = {} if memo is None else memo
    key = id(node)
    if key in memo:
        return memo[key]
    if isinstance(node, Const):
        out = node.dtype == INT and node.value >= 0
    elif isinstance(node, Var):
        out = node.name in _NONNEG_VARS
    elif isinstance(node, Coord):
        out = True
    elif isinstance(node, Unary):
        out = node.op == "abs"
    elif isinstance(node, Binary) and node.dtype == INT:
        a, b = (nonneg(node.a, memo), nonneg(node.b, memo))
        if node.op in ("add", "mul", "floordiv", "min"):
            out = a and b
        elif node.op == "max":
            out = a or b
        elif node.op == "mod":
            out = b
        else:
            out = False
    elif isinstance(node, Select):
        out = nonneg(node.a, memo) and nonneg(node.b, memo)
    else:
        out = False
    memo[key] = out
    return out


@dataclass(frozen=True)
class InputRef:
    """How an input tensor is passed to the kernel: pointer, per-dimension stride and size
    argument names (all validated identifiers)."""
    ptr: str
    strides: tuple[str, ...]
    sizes: tuple[str, ...]


@dataclass(frozen=True)
class Scope:
    """Bindings of IR leaves to kernel variables.

    vars     Var name -> kernel expression text (e.g. 'q' -> 'q', 'Q_LEN' -> 'Q_LEN')
    coords   (side, axis) -> kernel variable of that coordinate
    inputs   input name -> InputRef
    varying  leaf names that change inside the key loop: Var names and 'k.' for key coords
    """
    vars: Mapping[str, str]
    coords: Mapping[tuple[str, int], str] = field(default_factory=dict)
    inputs: Mapping[str, InputRef] = field(default_factory=dict)
    varying: frozenset = frozenset()


@dataclass
class Rendered:
    """Result of rendering a set of roots.

    hoisted      lines computing loop-invariant locals (emit once, before the loops)
    texts        root → expression text (a local name or an inline expression)
    helpers      names of HELPERS the text uses
    """
    hoisted: list[str]
    texts: dict[int, str]
    helpers: set[str]
    _loop: list[tuple[Expr, str]]  # (node, line) of loop-varying locals, in dependency order

    def text(self, root: Expr) -> str:
        return self.texts[id(root)]

    def loop_lines(self, roots: Sequence[Expr]) -> list[str]:
        """Lines computing the loop-varying locals that `roots` need, in dependency order."""
        need: set[int] = set()
        for r in roots:
            need.update(id(n) for n in walk(r))
        return [line for node, line in self._loop if id(node) in need]


class Renderer:
    """Renders IR roots under a `Scope`; locals are named `<prefix><n>`."""

    def __init__(self, scope: Scope, prefix: str):
        self.scope = scope
        self.prefix = safe_identifier(prefix, "local prefix")
        self._sign: dict = {}

    # ---- analysis --------------------------------------------------------------------
    def _check(self, node: Expr) -> None:
        if isinstance(node, (Route, Blocks)):
            raise CodegenError(f"`{format_expr(node)}`: runtime selectors are handled by the "
                               "pre-pass; not supported in this kernel yet")
        if isinstance(node, Var) and node.name not in self.scope.vars:
            raise CodegenError(f"variable '{node.name}' is not available in this part of the "
                               "kernel")
        if isinstance(node, Coord) and (node.side, node.axis) not in self.scope.coords:
            raise CodegenError(f"coordinate {node.side}.{node.name} has no layout axis here")
        if isinstance(node, Load) and node.input not in self.scope.inputs:
            raise CodegenError(f"input '{node.input}' is not declared")

    def _varies(self, node: Expr, memo: dict) -> bool:
        if isinstance(node, Var):
            return node.name in self.scope.varying
        if isinstance(node, Coord):
            return node.side + "." in self.scope.varying
        return any(memo[id(c)] for c in node.children())

    # ---- main ------------------------------------------------------------------------
    def render(self, roots: Sequence[Expr]) -> Rendered:
        order: list[Expr] = []
        seen: set[int] = set()
        for r in roots:
            for n in walk(r):
                if id(n) not in seen:
                    seen.add(id(n))
                    self._check(n)
                    order.append(n)
        varies: dict[int, bool] = {}
        for n in order:
            varies[id(n)] = self._varies(n, varies)
        uses: dict[int, int] = {id(n): 0 for n in order}
        feeds_varying: set[int] = set()
        force: set[int] = set()
        for n in order:
            for c in n.children():
                uses[id(c)] += 1
                if varies[id(n)]:
                    feeds_varying.add(id(c))
                if isinstance(n, Load):
                    force.add(id(c))
        for r in roots:
            uses[id(r)] += 1

        texts: dict[int, str] = {}
        hoisted: list[str] = []
        loop: list[tuple[Expr, str]] = []
        helpers: set[str] = set()
        count = 0
        for n in order:
            text = self._node(n, texts, helpers)
            leaf = not n.children() and not isinstance(n, Load)
            invariant_root = not varies[id(n)] and any(id(n) == id(r) for r in roots) \
                and bool(self.scope.varying)
            local = not leaf and (uses[id(n)] > 1 or id(n) in force or invariant_root
                                  or (not varies[id(n)] and id(n) in feeds_varying))
            if local:
                name = f"{self.prefix}{count}"
                count += 1
                line = f"{name} = {strip_parens(text)}  # {_comment(n)}"
                if varies[id(n)]:
                    loop.append((n, line))
                else:
                    hoisted.append(line)
                text = name
            texts[id(n)] = text
        return Rendered(hoisted, {id(r): texts[id(r)] for r in roots}, helpers, loop)

    # ---- one renderer per node kind ----------------------------------------------------
    def _node(self, n: Expr, texts: dict, helpers: set) -> str:
        kid = [texts[id(c)] for c in n.children()]
        if isinstance(n, Const):
            return self._const(n)
        if isinstance(n, Var):
            return self.scope.vars[n.name]
        if isinstance(n, Coord):
            return self.scope.coords[(n.side, n.axis)]
        if isinstance(n, Unary):
            return self._unary(n, kid[0])
        if isinstance(n, Binary):
            return self._binary(n, kid[0], kid[1], helpers)
        if isinstance(n, Select):
            return f"tl.where({strip_parens(kid[0])}, {strip_parens(kid[1])}, {strip_parens(kid[2])})"
        if isinstance(n, FCall):
            fn = _FUNCS.get(n.fn)
            if fn is None:
                raise CodegenError(f"function '{n.fn}' has no kernel lowering")
            if fn.startswith("_"):
                helpers.add(fn)
            return f"{fn}({strip_parens(kid[0])})"
        if isinstance(n, Load):
            return self._load(n, kid)
        raise CodegenError(f"IR node {type(n).__name__} has no kernel lowering")

    @staticmethod
    def _const(n: Const) -> str:
        if n.dtype == BOOL:
            return f"tl.full([1, 1], {1 if n.value else 0}, tl.int1)"
        return render_number(n.value)

    @staticmethod
    def _unary(n: Unary, x: str) -> str:
        if n.op == "neg":
            return f"(-{x})"
        if n.op == "abs":
            return f"tl.abs({strip_parens(x)})"
        if n.op == "not":
            return f"({x} == 0)"
        if n.op == "float":
            if isinstance(n.x, Const):
                return render_number(float(n.x.value))
            return f"tl.cast({strip_parens(x)}, tl.float32)"
        raise CodegenError(f"unary op {n.op!r} has no kernel lowering")

    def _binary(self, n: Binary, a: str, b: str, helpers: set) -> str:
        op = n.op
        if op in ("floordiv", "mod"):
            if nonneg(n.a, self._sign) and nonneg(n.b, self._sign):
                return f"({a} {'//' if op == 'floordiv' else '%'} {b})"
            fn = "_floordiv" if op == "floordiv" else "_floormod"
            helpers.add(fn)
            return f"{fn}({strip_parens(a)}, {strip_parens(b)})"
        if op in ("min", "max"):
            return f"tl.{'minimum' if op == 'min' else 'maximum'}({strip_parens(a)}, {strip_parens(b)})"
        if op in _INFIX:
            return f"({a} {_INFIX[op]} {b})"
        raise CodegenError(f"binary op {op!r} has no kernel lowering")

    def _load(self, n: Load, idx: list[str]) -> str:
        ref = self.scope.inputs[n.input]
        if len(idx) != len(ref.strides):
            raise CodegenError(f"input '{n.input}' has {len(ref.strides)} dimensions but "
                               f"`{format_expr(n)}` uses {len(idx)} indices")
        offset = " + ".join(f"{i} * {s}" for i, s in zip(idx, ref.strides)) or "0"
        checks = []
        for node, i, size in zip(n.index, idx, ref.sizes):
            if not nonneg(node, self._sign):
                checks.append(f"({i} >= 0)")
            checks.append(f"({i} < {size})")
        # `!= 0` keeps the mask boolean when scalar and block checks mix (the CPU
        # interpreter otherwise rejects the mask's dtype); compiled code folds it away.
        mask = ("(" + " & ".join(checks) + ") != 0") if len(checks) > 1 else \
            (checks[0] if checks else "None")
        text = f"tl.load({ref.ptr} + {offset}, mask={mask}, other=0)"
        if n.elem == FLOAT:
            return f"{text}.to(tl.float32)"
        if n.elem == BOOL:
            return f"({text} != 0)"
        return text


def _comment(n: Expr) -> str:
    """A one-line IR excerpt for a comment: printer output with only safe characters."""
    text = format_expr(n)
    if len(text) > 60:
        text = text[:57] + "..."
    return "".join(ch if ch.isascii() and (ch.isalnum() or ch in " +-*/%<>=!&|?:()[],._")
                   else "?" for ch in text)


LOG2E = "1.4426950408889634"  # softmax runs in base 2: exp(x) = exp2(x * LOG2E)


def used_inputs(pattern, roots) -> list[tuple[int, object]]:
    """(declaration index, InputDecl) of every input read by the IR `roots`, in declaration
    order. Raises CodegenError for an unsafe or undeclared input name."""
    used = {n.input for r in roots if r is not None for n in walk(r) if isinstance(n, Load)}
    decls = {d.name: (j, d) for j, d in enumerate(pattern.inputs)}
    for name in sorted(used):
        safe_identifier(name, "input name")
        if name not in decls:
            raise CodegenError(f"input '{name}' is used but not declared")
    return [decls[name] for name in sorted(used, key=lambda nm: decls[nm][0])]


def input_params(inputs) -> tuple[dict, list[str]]:
    """({input name: InputRef}, kernel parameter lines) for `used_inputs(...)`: input j is
    passed as pointer `in{j}`, strides `in{j}_s{i}` and sizes `in{j}_n{i}`."""
    refs, params = {}, []
    for j, decl in inputs:
        nd = len(decl.dims)
        refs[decl.name] = InputRef(f"in{j}", tuple(f"in{j}_s{i}" for i in range(nd)),
                                   tuple(f"in{j}_n{i}" for i in range(nd)))
        params.append(", ".join([f"in{j}"] + list(refs[decl.name].strides)
                                + list(refs[decl.name].sizes)) + f",  # input {decl.name}")
    return refs, params
