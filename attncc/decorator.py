"""Decorator frontend: trace a Python function over symbolic indices into the mask IR.

(It sits above the runtime: the object it returns runs attention when called.)

    @attncc.pattern(layout=attncc.grid(y=64, x=64))
    def local(q, k):
        return (abs(q.y - k.y) <= 3) & (abs(q.x - k.x) <= 3)

The function is called once with symbolic values (`Sym`) whose operators build IR nodes
through the same typed builders as the spec elaborator, so the result is the *same* IR
node as the equivalent `.attn` text. Parameter names pick the variables: any of
b, h, q, k, Q_LEN, KV_LEN, HEADS and the names of declared inputs, in any order.

Python control flow cannot branch on a symbolic value: `if`, `and`, `or`, `not` and
`bool()` raise `attncc.SpecError` at the user's line; use `&`, `|`, `~` and `where`.
"""
from __future__ import annotations

import builtins
import inspect
import linecache
import os
import re
import sys
from dataclasses import dataclass

from .ir.nodes import BOOL, FLOAT, INT, Coord, Expr, Load, Var
from .ir.pattern import Axis, InputDecl, Layout, Pattern
from .ir.segmented import Segmented, SideLayout
from .frontend.ast import Loc
from .frontend.errors import Diagnostic, SpecError, suggest

_THIS_FILE = __file__
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_VARS = ("b", "h", "q", "k", "Q_LEN", "KV_LEN", "HEADS")
_CONTROL_FLOW = ("a symbolic condition cannot be used in Python control flow (`if`, `and`, "
                 "`or`, `not`); use `&`, `|`, `~` or attncc.where(cond, a, b)")
# Layout, inputs and clause ("mask" or "score") of the function being traced (helpers such as
# `neighborhood` need the layout; float arithmetic is allowed only in a score).
_ACTIVE: list = []


def _floats() -> bool:
    return bool(_ACTIVE) and _ACTIVE[-1][2] == "score"



def _user_error(message: str, hint=None) -> SpecError:
    """A SpecError located at the innermost frame outside this module (the user's code)."""
    f = sys._getframe(1)
    while f is not None and (f.f_code.co_filename == _THIS_FILE
                             or f.f_code.co_filename.startswith(_PACKAGE_DIR)):
        f = f.f_back
    if f is None:
        return SpecError([Diagnostic(None, message, hint)])
    fname = f.f_code.co_filename
    summary = inspect.getframeinfo(f, context=0)
    pos = getattr(summary, "positions", None)
    col = (pos.col_offset + 1) if pos is not None and pos.col_offset is not None else 1
    end = (pos.end_col_offset + 1) if pos is not None and pos.end_col_offset is not None else None
    end_line = pos.end_lineno if pos is not None else None
    loc = Loc(fname, f.f_lineno, col, end_line, end)
    source = "".join(linecache.getlines(fname)) or None
    return SpecError([Diagnostic(loc, message, hint)], source)


def _node(x) -> Expr:
    from .passes.primitives import BuildError, const
    if isinstance(x, Sym):
        return x.node
    if isinstance(x, (bool, int, float)):
        try:
            return const(x)
        except BuildError as e:
            raise _user_error(str(e)) from None
    raise _user_error(f"cannot use a value of type {type(x).__name__} in a pattern")


def _build(fn, *args, **kw):
    from .passes.primitives import BuildError
    try:
        return Sym(fn(*args, floats=_floats(), **kw))
    except BuildError as e:
        raise _user_error(str(e)) from None


def _bin(op):
    def fwd(self, other):
        from .passes.primitives import binary
        return _build(binary, op, self.node, _node(other))

    def rev(self, other):
        from .passes.primitives import binary
        return _build(binary, op, _node(other), self.node)
    return fwd, rev


class Sym:
    """A symbolic value wrapping an IR node (`.node`). Supports + - * // % < <= > >= == !=
    & | ~ unary - and abs(); `q.y`/`k.x` give layout coordinates."""

    __slots__ = ("node",)
    __hash__ = None

    def __init__(self, node: Expr):
        object.__setattr__(self, "node", node)

    __add__, __radd__ = _bin("add")
    __sub__, __rsub__ = _bin("sub")
    __mul__, __rmul__ = _bin("mul")
    __floordiv__, __rfloordiv__ = _bin("floordiv")
    __mod__, __rmod__ = _bin("mod")
    __truediv__, __rtruediv__ = _bin("div")
    __and__, __rand__ = _bin("and")
    __or__, __ror__ = _bin("or")
    __lt__ = _bin("lt")[0]
    __le__ = _bin("le")[0]
    __gt__ = _bin("gt")[0]
    __ge__ = _bin("ge")[0]
    __eq__ = _bin("eq")[0]
    __ne__ = _bin("ne")[0]

    def __neg__(self):
        from .passes.primitives import unary
        return _build(unary, "neg", self.node)

    def __abs__(self):
        from .passes.primitives import unary
        return _build(unary, "abs", self.node)

    def __invert__(self):
        from .passes.primitives import unary
        if self.node.dtype != BOOL:
            raise _user_error(f"'~' needs a boolean operand, got {self.node.dtype}")
        return _build(unary, "not", self.node)

    def __bool__(self):
        raise _user_error(_CONTROL_FLOW)

    def __index__(self):
        raise _user_error("a symbolic value cannot be converted to a Python int")

    __int__ = __index__

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        node = object.__getattribute__(self, "node")
        if not (isinstance(node, Var) and node.name in ("q", "k")):
            raise _user_error(f"coordinates are written q.<axis> or k.<axis>, not .{name}")
        layout = _ACTIVE[-1][0] if _ACTIVE else None
        if layout is None:
            raise _user_error(f"coordinate '{node.name}.{name}' needs a layout "
                              "(pass layout=attncc.grid(...) to @attncc.pattern)")
        if isinstance(layout, Segmented):  # segment membership or the side's grid axis
            from .passes.segments import resolve
            hit = resolve(layout, node.name, name)
            if isinstance(hit, str):
                raise _user_error(hit)
            return Sym(hit)
        names = [a.name for a in layout.axes]
        if name not in names:
            raise _user_error(f"unknown axis '{name}'",
                              suggest(name, names) or f"the layout has axes {', '.join(names)}")
        return Sym(Coord(node.name, names.index(name), name))

    def __repr__(self):
        from .ir.printer import format_expr
        return f"Sym({format_expr(self.node)})"


class _InputSym:
    """A declared runtime input; index it like the spec: `doc[b, k]`."""

    def __init__(self, decl: InputDecl):
        self.decl = decl

    def __getitem__(self, idx):
        idx = idx if isinstance(idx, tuple) else (idx,)
        d = self.decl
        if len(idx) != len(d.dims):
            raise _user_error(f"input '{d.name}' has {len(d.dims)} dimensions "
                              f"[{', '.join(map(str, d.dims))}], got {len(idx)} indices")
        nodes = tuple(_node(i) for i in idx)
        for n in nodes:
            if n.dtype != INT:
                raise _user_error(f"index of '{d.name}' must be int, got {n.dtype}")
        return Sym(Load(d.name, nodes, d.dtype))

    def __bool__(self):
        raise _user_error(f"input '{self.decl.name}' must be indexed")


# ---- public helpers --------------------------------------------------------------------------

def grid(**axes: int) -> Layout:
    """`grid(y=64, x=64)`: a row-major token layout (last axis fastest), as `layout grid(...)`."""
    out = []
    for name, size in axes.items():
        if name in _VARS or type(size) is not int or size < 1:
            raise _user_error(f"grid axis '{name}' needs a positive integer size, got {size!r}")
        out.append(Axis(name, size))
    if not out:
        raise _user_error("a grid layout needs at least one axis")
    return Layout(tuple(out))


@dataclass(frozen=True)
class Tokens:
    """`tokens(text=77)`: plain-token segments of a segmented layout, as `layout tokens(...)`."""
    entries: tuple

    def __str__(self) -> str:
        return "tokens(" + ", ".join(f"{n} = {v}" for n, v in self.entries) + ")"


def tokens(**sizes: int) -> Tokens:
    """`tokens(cls=1, reg=4)`: plain-token segments (in keyword order) for a segmented layout,
    `layout=[attncc.tokens(text=77), attncc.grid(t=16, y=32, x=32)]`."""
    if not sizes:
        raise _user_error("tokens(...) needs at least one segment, e.g. tokens(text=77)")
    for name, size in sizes.items():
        if type(size) is not int or size < 1:
            raise _user_error(f"size of segment '{name}' must be a positive integer, got {size!r}")
    return Tokens(tuple(sizes.items()))


def _side_items(value, what: str) -> list:
    items = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for it in items:
        if isinstance(it, Layout):
            out.append(("grid", it))
        elif isinstance(it, Tokens):
            out.append(("tokens", list(it.entries)))
        else:
            raise _user_error(f"{what} must be attncc.grid(...), attncc.tokens(...) or a list of "
                              f"them, got {type(it).__name__}")
    if not out:
        raise _user_error(f"{what} is an empty list")
    return out


def _layout_of(layout, q_layout, k_layout):
    """The pattern layout of the decorator's `layout=` / `q_layout=` / `k_layout=` arguments:
    a `Layout`, a segmented `attncc.ir.segmented.Segmented`, or None."""
    from .passes.segments_bind import side_segments
    if (q_layout is None) != (k_layout is None):
        raise _user_error("separate layouts need both q_layout= and k_layout=")
    if q_layout is not None and layout is not None:
        raise _user_error("give either layout= or q_layout= and k_layout=, not both")
    if layout is None and q_layout is None:
        return None
    if isinstance(layout, Layout):
        return layout
    sides = {}
    for side, value, what in (("q", q_layout, "q_layout"), ("k", k_layout, "k_layout")) \
            if layout is None else (("q", layout, "layout"),):
        parts, errors = side_segments(_side_items(value, what))
        if errors:
            _, _, msg = errors[0]
            raise _user_error(f"{what}: {msg}")
        sides[side] = SideLayout(tuple(parts))
    if layout is not None:
        return Segmented(sides["q"], sides["q"], shared=True)
    return Segmented(sides["q"], sides["k"], shared=False)


def where(cond, a, b):
    """`cond ? a : b` on symbolic values (a plain Python bool picks a branch)."""
    from .passes.primitives import select
    if isinstance(cond, bool):
        return a if cond else b
    return _build(select, _node(cond), _node(a), _node(b))


def min(a, b):  # noqa: A001 - mirrors the language builtin
    """Symbolic `min(a, b)` (plain numbers use Python's min)."""
    from .passes.primitives import binary
    if not isinstance(a, Sym) and not isinstance(b, Sym):
        return builtins.min(a, b)
    return _build(binary, "min", _node(a), _node(b))


def max(a, b):  # noqa: A001
    """Symbolic `max(a, b)` (plain numbers use Python's max)."""
    from .passes.primitives import binary
    if not isinstance(a, Sym) and not isinstance(b, Sym):
        return builtins.max(a, b)
    return _build(binary, "max", _node(a), _node(b))


def abs(x):  # noqa: A001
    """Symbolic `abs(x)` (same as the builtin `abs` on a `Sym`)."""
    return builtins.abs(x)


def _primitive(name: str, *args, **kwargs) -> Sym:
    """Expand a library primitive (prelude `def` or Python primitive) inside a trace."""
    from .frontend import ast as A
    from .api import prelude_defs
    from .passes.elaborate import Elaborator, _Ctx, _Failed
    layout, inputs, clause = _ACTIVE[-1] if _ACTIVE else (None, {}, "mask")
    el = Elaborator(A.Spec(None, ()), {}, None, "<trace>", list(prelude_defs()))
    el.inputs = dict(inputs)
    if isinstance(layout, Segmented):
        from .passes.segments_bind import attach
        attach(el, layout)
    else:
        el.layout = layout
    env = {}

    def arg(v):
        if isinstance(v, tuple):
            return A.Tuple(tuple(arg(x) for x in v))
        key = f"_a{len(env)}"
        env[key] = _node(v)
        return A.Name(key)
    ast_args = tuple(arg(v) for v in args)
    ast_kw = tuple(A.Keyword(k, arg(v)) for k, v in kwargs.items())
    try:
        out = el.call(name, ast_args, ast_kw, None, _Ctx(clause, env))
    except _Failed:
        out = None
    if el.diags.items:
        d = el.diags.items[0]
        raise _user_error(d.message, d.hint)
    return Sym(out)


def causal():
    """`k <= q + (KV_LEN - Q_LEN)` (bottom-right aligned)."""
    return _primitive("causal")


def window(w):
    """Causal sliding window of `w` keys including the query."""
    return _primitive("window", w)


def chunked(c):
    return _primitive("chunked", c)


def prefix(p):
    return _primitive("prefix", p)


def sinks(n):
    return _primitive("sinks", n)


def dilated(w, d):
    return _primitive("dilated", w, d)


def blocked(size):
    """Same block of `size` (per axis tuple or scalar) along every layout axis."""
    return _primitive("blocked", size)


def neighborhood(kernel, dilation=1, stride=1, causal=False):
    """NATTEN neighborhood attention over the layout axes (DESIGN §4)."""
    return _primitive("neighborhood", kernel, dilation=dilation, stride=stride, causal=causal)


def softcap(x, c):
    """`c * tanh(x / c)` (in a score modifier: `score=lambda s: attncc.softcap(s, 50.0)`)."""
    return _primitive("softcap", x, c)


def alibi(s):
    """ALiBi: `s + exp2(-8.0 * (h + 1) / HEADS) * (k - q)` (a score modifier)."""
    if not _same_score(s):
        raise _user_error("alibi(s) takes the score `s` the modifier receives")
    return _primitive("alibi")


def _same_score(s) -> bool:
    return isinstance(s, Sym) and isinstance(s.node, Var) and s.node.name == "s"


def _float_fn(name):
    def fn(x):
        from .passes.primitives import builtin
        return _build(builtin, name, [_node(x)])
    fn.__name__ = name
    fn.__doc__ = f"Symbolic `{name}(x)` (float: score modifiers only)."
    return fn


tanh, exp, exp2, log, sqrt = (_float_fn(n) for n in ("tanh", "exp", "exp2", "log", "sqrt"))


def clamp(x, lo, hi):
    """Symbolic `clamp(x, lo, hi)` = `min(max(x, lo), hi)`."""
    from .passes.primitives import builtin
    return _build(builtin, "clamp", [_node(x), _node(lo), _node(hi)])


# ---- the decorator --------------------------------------------------------------------------

_DECL = re.compile(r"^\s*(int|float|bool)\s*\[([^\]]*)\]\s*$")


def _input_decl(name, spec) -> InputDecl:
    if isinstance(spec, InputDecl):
        return spec
    if isinstance(spec, str):
        m = _DECL.match(spec)
        if not m:
            raise _user_error(f"input '{name}': expected a declaration like 'int[b, k]', got {spec!r}")
        dtype, dims = m.group(1), [d.strip() for d in m.group(2).split(",")]
    else:
        dtype, dims = spec
    out = []
    for d in dims:
        if isinstance(d, str) and d.isdigit():
            d = int(d)
        if not (d in ("b", "h", "q", "k", "q_blocks", "k_blocks")
                or (type(d) is int and d > 0)):
            raise _user_error(f"input '{name}': bad dimension {d!r}")
        out.append(d)
    return InputDecl(name, dtype, tuple(out))


_PARAM_TYPES = (bool, int, float)


def _params_of(fn, decls, overrides) -> dict:
    """Keyword parameters of `fn` with defaults (not index variables or inputs): the pattern's
    parameters, bound to their defaults or to `overrides`."""
    out = {}
    sig = inspect.signature(fn).parameters
    for p in sig.values():
        if p.name in _VARS or p.name in decls or p.default is inspect.Parameter.empty:
            continue
        value = overrides.get(p.name, p.default)
        if type(value) not in _PARAM_TYPES:
            raise _user_error(f"parameter '{p.name}' of {fn.__name__} must be an int, float or "
                              f"bool, got {value!r}")
        out[p.name] = value
    for name in overrides:
        if name not in out:
            raise _user_error(f"unknown parameter '{name}'",
                              suggest(name, list(out)) or (
                                  f"'{fn.__name__}' has parameters {', '.join(out)}" if out
                                  else f"'{fn.__name__}' has no parameters"))
    return out


def _call_traced(fn, layout, decls, params, clause, extra=None):
    args = []
    for p in inspect.signature(fn).parameters.values():
        if extra is not None and p.name in extra:
            args.append(extra[p.name])
        elif p.name in _VARS:
            args.append(Sym(Var(p.name)))
        elif p.name in decls:
            args.append(_InputSym(decls[p.name]))
        elif p.name in params:
            args.append(params[p.name])
        elif extra is not None and p.default is not inspect.Parameter.empty:
            args.append(p.default)  # a plain constant of the score function
        else:
            allowed = list(_VARS) + list(decls) + list(extra or ())
            raise _user_error(
                f"parameter '{p.name}' of {fn.__name__} is neither an index variable "
                f"({', '.join(_VARS)}){', the score s' if extra else ''}, a declared input "
                "nor a pattern parameter with a default", suggest(p.name, allowed))
    _ACTIVE.append((layout, decls, clause))
    try:
        return _node(fn(*args))
    finally:
        _ACTIVE.pop()


def _trace(fn, layout, name, inputs, score=None, overrides=None,
           normalize="softmax") -> Pattern:
    decls = {n: _input_decl(n, s) for n, s in (inputs or {}).items()}
    params = _params_of(fn, decls, dict(overrides or {}))
    mask = _call_traced(fn, layout, decls, params, "mask")
    if mask.dtype != BOOL:
        raise _user_error(f"mask must be a boolean expression, got {mask.dtype}")
    score_ir = None
    if score is not None:
        from .passes.primitives import to_float
        score_ir = _call_traced(score, layout, decls, params, "score",
                                extra={"s": Sym(Var("s"))})
        if score_ir.dtype == INT:
            score_ir = to_float(score_ir)
        if score_ir.dtype != FLOAT:
            raise _user_error(f"score must be a float expression, got {score_ir.dtype}")
    checks = ()
    if isinstance(layout, Segmented):  # as the elaborator: misuse errors, coordinate guards
        from .passes.segments import SegmentLengthCheck, guard, misuse
        for clause, e in (("mask", mask), ("score", score_ir)):
            why = misuse(layout, e, clause)
            if why is not None:
                raise _user_error(why)
        mask, score_ir = guard(mask, layout), guard(score_ir, layout)
        checks = (SegmentLengthCheck(None, layout.q.numel, layout.k.numel, str(layout),
                                     layout.shared),)
    return Pattern(name=name or fn.__name__, params=tuple(params.items()), layout=layout,
                   inputs=tuple(decls.values()), mask=mask, score=score_ir,
                   normalize=normalize, filename=inspect.getsourcefile(fn), checks=checks)


class PatternFunction:
    """What `@attncc.pattern` returns: the traced `Pattern` (`.pattern`), usable as one.

    Calling it runs attention, `f(q, k, v, *, scale=None, return_lse=False, **inputs)` with
    q [B, Hq, Lq, D], k [B, Hkv, Lkv, D], v [B, Hkv, Lkv, Dv] → out [B, Hq, Lq, Dv] (and lse
    float32 [B, Hq, Lq]), through one kernel compiled per pattern with default options
    (`attncc.compile(f.pattern)`; the backend follows q's device). Every other attribute
    (`mask`, `dense_mask`, `ir_text`, `layout`, ...) is the pattern's, and it compares equal to
    the pattern (and to the same pattern written as spec text). This object lives above the
    runtime so that the IR's `Pattern` never imports it."""

    __slots__ = ("pattern", "__wrapped__", "_trace_args")

    def __init__(self, pattern: Pattern, fn=None, trace_args=None):
        object.__setattr__(self, "pattern", pattern)
        object.__setattr__(self, "__wrapped__", fn)
        object.__setattr__(self, "_trace_args", trace_args)

    def bind(self, **params) -> "PatternFunction":
        """The same function traced with other values of its keyword parameters (like
        `attncc.load(path, window=64)` for a spec)."""
        layout, name, inputs, score, normalize = self._trace_args
        fn = self.__wrapped__
        return PatternFunction(_trace(fn, layout, name, inputs, score, params, normalize), fn,
                               self._trace_args)

    def __call__(self, q, k, v, *, scale=None, return_lse: bool = False, **inputs):
        from .runtime.compile import kernel_for
        return kernel_for(self.pattern)(q, k, v, scale=scale, return_lse=return_lse, **inputs)

    def __getattr__(self, name):
        return getattr(object.__getattribute__(self, "pattern"), name)

    def __setattr__(self, name, value):
        raise AttributeError(f"cannot set '{name}': a pattern is immutable")

    def __eq__(self, other):
        return self.pattern == getattr(other, "pattern", other)

    def __hash__(self):
        return hash(self.pattern)

    def __str__(self) -> str:
        return str(self.pattern)

    def __repr__(self) -> str:
        return f"<attncc pattern function {self.pattern.name} ir_hash={self.pattern.ir_hash()}>"


def pattern(fn=None, *, layout=None, name=None, inputs=None, score=None, normalize="softmax",
            q_layout=None, k_layout=None):
    """Decorator: trace `fn(q, k)` (or any of b, h, q, k, Q_LEN, KV_LEN, HEADS and declared
    inputs) into a `PatternFunction` (the `Pattern` plus a call that runs attention).

    layout   a `grid(...)`, or a list of `tokens(...)` and at most one `grid(...)` in token
             order (a segmented layout: `q.<segment>` is membership, coordinates are within
             the grid; see docs/LANGUAGE.md)
    q_layout, k_layout   separate query and key layouts (each a grid, tokens or such a list),
             as `layout q_grid(...)` / `layout k_tokens(...)` lines
    inputs   maps names to declarations such as `"int[b, k]"`
    score    a score modifier: a function of `s` (the scaled score) and any of the names
             above and the pattern parameters, e.g. `lambda s: attncc.softcap(s, 50.0)`
    normalize  "softmax" (default) or "none": the spec clause `normalize none`, no softmax,
             out[q] = Σ_k keep · score · v[k] (linear attention; a causal mask with a score
             s · c_h · r_h^(q − k) runs the chunked linear-time algorithm, docs/LINEAR.md)

    Keyword parameters of `fn` with defaults (`def f(q, k, window=128)`) are the pattern's
    parameters (`f.bind(window=64)` re-traces with another value). The pattern's
    `dense_mask` is `bool [B, H, Lq, Lkv]`."""
    if normalize not in ("softmax", "none"):
        raise _user_error(f"normalize must be 'softmax' or 'none', got {normalize!r}")

    def wrap(f):
        args = (_layout_of(layout, q_layout, k_layout), name, inputs, score, normalize)
        return PatternFunction(_trace(f, *args[:4], None, normalize), f, args)
    if fn is None:
        return wrap
    return wrap(fn)
