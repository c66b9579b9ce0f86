"""Mask IR: a frozen, hash-consed expression DAG.

Every node is a frozen dataclass. Construction goes through an interning table, so two
structurally equal expressions are *the same object*: equality and hashing are by
identity, which makes equality of whole DAGs O(1) and lets every pass memoize by node.

Leaves
    Const(value)            int, float or bool literal
    Var(name)               b, h, q, k (token indices), Q_LEN, KV_LEN, HEADS (lengths), s (score)
    Coord(side, axis, name) coordinate `axis` of the query ('q') or key ('k') on the pattern's
                            grid layout (row-major flattening, last axis fastest)
    Load(input, index)      element of a runtime input tensor
    Route(region, topk)     data-dependent region routing (DESIGN §4), bool
    Blocks(input, ...)      data-dependent block selection from a score tensor (DESIGN §4), bool

Interior
    Unary(op, x)            neg, not, abs, float (int → float)
    Binary(op, a, b)        add sub mul floordiv mod div min max | lt le gt ge eq ne | and or
    Select(cond, a, b)      cond ? a : b
    FCall(fn, args)         float functions: tanh exp exp2 log sqrt

Coordinates are kept as leaves (rather than expanded to `q // W % H` arithmetic) because the
tile analysis reasons about multi-dimensional tiles box-wise; `attncc.ir.coords.lower_coords`
turns them into flat-index arithmetic for backends that only see flat indices.

`//` and `%` are floor division and modulo (Python semantics) everywhere.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Iterator, Union

INT, FLOAT, BOOL = "int", "float", "bool"

INDEX_VARS = ("b", "h", "q", "k")
LENGTH_VARS = ("Q_LEN", "KV_LEN", "HEADS")
SCORE_VAR = "s"
# Query-tile index (1-D / per axis) of schedule bounds; "kt": the first token of the forward
# kernel's current 1-D key tile (selections lowered for tile-aligned key regions).
TILE_VARS = ("qt", "qt0", "qt1", "qt2", "qt3", "kt")
VAR_TYPES = {**{n: INT for n in INDEX_VARS + LENGTH_VARS + TILE_VARS}, SCORE_VAR: FLOAT}

ARITH_OPS = ("add", "sub", "mul", "floordiv", "mod", "div", "min", "max")
COMPARE_OPS = ("lt", "le", "gt", "ge", "eq", "ne")
LOGIC_OPS = ("and", "or")
BINARY_OPS = ARITH_OPS + COMPARE_OPS + LOGIC_OPS
UNARY_OPS = ("neg", "not", "abs", "float")
FUNCTIONS = {"tanh": 1, "exp": 1, "exp2": 1, "log": 1, "sqrt": 1}

# Infix spelling used by the printer and error messages.
OP_SYMBOL = {
    "add": "+", "sub": "-", "mul": "*", "floordiv": "//", "mod": "%", "div": "/",
    "lt": "<", "le": "<=", "gt": ">", "ge": ">=", "eq": "==", "ne": "!=",
    "and": "&", "or": "|",
}

_TABLE: dict = {}


class _Interned(type):
    """Metaclass that returns the existing node when an equal one was built before."""

    def __call__(cls, *args, **kwargs):
        node = super().__call__(*args, **kwargs)
        key = node._key()
        hit = _TABLE.get(key)
        if hit is not None:
            return hit
        _TABLE[key] = node
        return node


def _keyed(value):
    # Distinguish 1, 1.0 and True (equal and equally hashed in Python).
    if isinstance(value, tuple):
        return tuple(_keyed(v) for v in value)
    if isinstance(value, (bool, int, float)):
        return (type(value), value)
    return value


class IRTypeError(TypeError):
    """An IR node was built from operands of the wrong type (an internal error: the
    elaborator reports user type errors with source locations before building nodes)."""


@dataclass(frozen=True, eq=False, repr=False)
class Expr(metaclass=_Interned):
    """Base class of IR nodes. Equality is identity (nodes are interned)."""

    def _key(self):
        return (type(self),) + tuple(_keyed(getattr(self, f.name)) for f in fields(self))

    @property
    def dtype(self) -> str:  # pragma: no cover - every subclass overrides
        raise AssertionError(type(self).__name__)

    def children(self) -> tuple["Expr", ...]:
        return ()

    def __repr__(self) -> str:
        from .printer import format_expr
        return f"<ir {format_expr(self)}>"


@dataclass(frozen=True, eq=False, repr=False)
class Const(Expr):
    value: Union[int, float, bool]

    def __post_init__(self):
        if not isinstance(self.value, (bool, int, float)):
            raise IRTypeError(f"constant must be int, float or bool, got {self.value!r}")
        if isinstance(self.value, float) and math.isnan(self.value):
            raise IRTypeError("NaN constants are not allowed")

    @property
    def dtype(self):
        if isinstance(self.value, bool):
            return BOOL
        return INT if isinstance(self.value, int) else FLOAT


@dataclass(frozen=True, eq=False, repr=False)
class Var(Expr):
    name: str

    def __post_init__(self):
        if self.name not in VAR_TYPES:
            raise IRTypeError(f"unknown variable {self.name!r}")

    @property
    def dtype(self):
        return VAR_TYPES[self.name]


@dataclass(frozen=True, eq=False, repr=False)
class Coord(Expr):
    side: str  # "q" or "k"
    axis: int  # index into the layout's axes
    name: str  # axis name, for printing

    def __post_init__(self):
        if self.side not in ("q", "k") or self.axis < 0:
            raise IRTypeError(f"bad coordinate {self.side}.{self.name}")

    @property
    def dtype(self):
        return INT


@dataclass(frozen=True, eq=False, repr=False)
class Unary(Expr):
    op: str
    x: Expr

    def __post_init__(self):
        t = self.x.dtype
        ok = {"neg": (INT, FLOAT), "abs": (INT, FLOAT), "not": (BOOL,), "float": (INT, FLOAT)}
        if self.op not in ok:
            raise IRTypeError(f"unknown unary op {self.op!r}")
        if t not in ok[self.op]:
            raise IRTypeError(f"{self.op} of {t}")

    @property
    def dtype(self):
        return FLOAT if self.op == "float" else self.x.dtype

    def children(self):
        return (self.x,)


@dataclass(frozen=True, eq=False, repr=False)
class Binary(Expr):
    op: str
    a: Expr
    b: Expr

    def __post_init__(self):
        ta, tb = self.a.dtype, self.b.dtype
        op = self.op
        if op not in BINARY_OPS:
            raise IRTypeError(f"unknown binary op {op!r}")
        if op in LOGIC_OPS:
            if ta != BOOL or tb != BOOL:
                raise IRTypeError(f"{op} of {ta} and {tb}")
        elif op in ("eq", "ne"):
            if ta != tb:
                raise IRTypeError(f"{op} of {ta} and {tb}")
        elif op in COMPARE_OPS:
            if ta == BOOL or ta != tb:
                raise IRTypeError(f"{op} of {ta} and {tb}")
        else:
            if ta == BOOL or ta != tb:
                raise IRTypeError(f"{op} of {ta} and {tb}")
            if op in ("floordiv", "mod") and ta != INT:
                raise IRTypeError(f"{op} of {ta}")
            if op == "div" and ta != FLOAT:
                raise IRTypeError("true division of int (use //)")

    @property
    def dtype(self):
        if self.op in COMPARE_OPS or self.op in LOGIC_OPS:
            return BOOL
        return self.a.dtype

    def children(self):
        return (self.a, self.b)


@dataclass(frozen=True, eq=False, repr=False)
class Select(Expr):
    cond: Expr
    a: Expr
    b: Expr

    def __post_init__(self):
        if self.cond.dtype != BOOL:
            raise IRTypeError(f"select condition of type {self.cond.dtype}")
        if self.a.dtype != self.b.dtype:
            raise IRTypeError(f"select branches {self.a.dtype} and {self.b.dtype}")

    @property
    def dtype(self):
        return self.a.dtype

    def children(self):
        return (self.cond, self.a, self.b)


@dataclass(frozen=True, eq=False, repr=False)
class FCall(Expr):
    fn: str
    args: tuple[Expr, ...]

    def __post_init__(self):
        if FUNCTIONS.get(self.fn) != len(self.args):
            raise IRTypeError(f"bad call {self.fn}/{len(self.args)}")
        if any(a.dtype != FLOAT for a in self.args):
            raise IRTypeError(f"{self.fn} takes float arguments")

    @property
    def dtype(self):
        return FLOAT

    def children(self):
        return self.args


@dataclass(frozen=True, eq=False, repr=False)
class Load(Expr):
    """`input[index...]`: one element of a runtime tensor; `elem` is its element type."""
    input: str
    index: tuple[Expr, ...]
    elem: str

    def __post_init__(self):
        if self.elem not in (INT, FLOAT, BOOL):
            raise IRTypeError(f"bad element type {self.elem!r}")
        if any(i.dtype != INT for i in self.index):
            raise IRTypeError("tensor indices must be int")

    @property
    def dtype(self):
        return self.elem

    def children(self):
        return self.index


@dataclass(frozen=True, eq=False, repr=False)
class Route(Expr):
    """Region routing (DESIGN §4): key region size per layout axis (1 entry on 1-D), keep
    `topk` key regions per query region. `q_region`: query region size per axis (None: the
    key region; (1,) gives token-level queries, MoBA); `causal` (1-D): key regions after a
    query region's own are excluded and its own is always kept."""
    region: tuple[int, ...]
    topk: int
    q_region: tuple[int, ...] | None = None
    causal: bool = False

    def __post_init__(self):
        if not self.region or any(r < 1 for r in self.region) or self.topk < 1 \
                or (self.q_region is not None and (len(self.q_region) != len(self.region)
                                                   or any(r < 1 for r in self.q_region))):
            raise IRTypeError(f"bad route({self.region}, {self.topk}, {self.q_region})")

    @property
    def query_region(self) -> tuple[int, ...]:
        """The query region size per axis."""
        return self.region if self.q_region is None else self.q_region

    @property
    def dtype(self):
        return BOOL


@dataclass(frozen=True, eq=False, repr=False)
class Blocks(Expr):
    """Block selection from `input` [b, h, q_blocks, k_blocks]: top fraction or threshold."""
    input: str
    block: int
    top: float | None = None
    threshold: float | None = None

    def __post_init__(self):
        if self.block < 1 or (self.top is None) == (self.threshold is None):
            raise IRTypeError("blocks needs block >= 1 and exactly one of top / threshold")

    @property
    def dtype(self):
        return BOOL


# ---- helpers ------------------------------------------------------------------------------

TRUE, FALSE = Const(True), Const(False)


def walk(root: Expr) -> Iterator[Expr]:
    """Every node of the DAG reachable from `root`, each once, children before parents."""
    seen: set[int] = set()
    stack: list[tuple[Expr, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        if done:
            yield node
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        stack.append((node, True))
        for c in reversed(node.children()):
            if id(c) not in seen:
                stack.append((c, False))


def rebuild(node: Expr, children: tuple[Expr, ...]) -> Expr:
    """`node` with its children replaced (same kind and attributes)."""
    if isinstance(node, Unary):
        return Unary(node.op, children[0])
    if isinstance(node, Binary):
        return Binary(node.op, children[0], children[1])
    if isinstance(node, Select):
        return Select(*children)
    if isinstance(node, FCall):
        return FCall(node.fn, tuple(children))
    if isinstance(node, Load):
        return Load(node.input, tuple(children), node.elem)
    return node


def transform(root: Expr, fn) -> Expr:
    """Bottom-up rewrite: `fn(node_with_new_children)` returns a replacement or None (keep).
    Memoized per node, so shared subexpressions are rewritten once."""
    memo: dict[int, Expr] = {}
    for node in walk(root):
        kids = node.children()
        new = rebuild(node, tuple(memo[id(c)] for c in kids)) if kids else node
        out = fn(new)
        memo[id(node)] = new if out is None else out
    return memo[id(root)]


def uses(root: Expr, kind: type) -> bool:
    return any(isinstance(n, kind) for n in walk(root))


def free_vars(root: Expr) -> set[str]:
    """Names of Var leaves, plus 'q'/'k' for coordinates of that side."""
    out = set()
    for n in walk(root):
        if isinstance(n, Var):
            out.add(n.name)
        elif isinstance(n, Coord):
            out.add(n.side)
    return out
