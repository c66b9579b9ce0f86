"""AST of the `.attn` spec language.

Every node is a frozen dataclass carrying a source location `loc` that takes no part in
equality or hashing, so `parse(print(ast)) == ast` compares structure only.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union


@dataclass(frozen=True)
class Loc:
    """A source span: 1-based line and column of the first character, and of the end
    (exclusive end column) when known."""
    file: str
    line: int
    col: int
    end_line: Optional[int] = None
    end_col: Optional[int] = None

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


def _loc():
    return field(default=None, compare=False, hash=False, repr=False, kw_only=True)


@dataclass(frozen=True)
class Node:
    loc: Optional[Loc] = _loc()


# ---- expressions ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Num(Node):
    """Integer or float literal."""
    value: Union[int, float]


@dataclass(frozen=True)
class Bool(Node):
    value: bool


@dataclass(frozen=True)
class Name(Node):
    """A bare identifier: parameter, index variable (b h q k s), length (Q_LEN KV_LEN HEADS),
    input, local function parameter, or a zero-argument primitive such as `causal`."""
    id: str


@dataclass(frozen=True)
class Attr(Node):
    """`q.y`: a layout coordinate of the query or key."""
    value: "Expr"
    attr: str


@dataclass(frozen=True)
class Unary(Node):
    """op is '-' or '!' ('not' is parsed as '!')."""
    op: str
    operand: "Expr"


@dataclass(frozen=True)
class Binary(Node):
    """op is one of + - * / // % & | ('and'/'or' are parsed as '&'/'|')."""
    op: str
    left: "Expr"
    right: "Expr"


@dataclass(frozen=True)
class Compare(Node):
    """Chained comparison `a < b <= c`: ops[i] relates operands[i] and operands[i+1]."""
    ops: tuple[str, ...]
    operands: tuple["Expr", ...]


@dataclass(frozen=True)
class Ternary(Node):
    cond: "Expr"
    then: "Expr"
    orelse: "Expr"


@dataclass(frozen=True)
class Keyword(Node):
    name: str
    value: "Expr"


@dataclass(frozen=True)
class Call(Node):
    """`f(a, b, key = c)`: primitives (abs min max clamp causal window neighborhood route
    blocks softcap ...) and functions defined with `def`."""
    func: str
    args: tuple["Expr", ...]
    kwargs: tuple[Keyword, ...] = ()


@dataclass(frozen=True)
class Tuple(Node):
    """`(a, b)` with two or more items: per-axis arguments."""
    items: tuple["Expr", ...]


@dataclass(frozen=True)
class Index(Node):
    """`x[i, j]`: an element of a runtime input tensor."""
    name: str
    indices: tuple["Expr", ...]


Expr = Union[Num, Bool, Name, Attr, Unary, Binary, Compare, Ternary, Call, Tuple, Index]


# ---- declarations ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Param(Node):
    """`name = default` in a pattern header or def; default may be absent."""
    name: str
    default: Optional[Expr] = None


@dataclass(frozen=True)
class Header(Node):
    """`pattern name(params)`; `params` is empty for `pattern name`."""
    name: str
    params: tuple[Param, ...] = ()


@dataclass(frozen=True)
class LayoutDecl(Node):
    """`layout grid(y = H, x = W)`; `kind` is 'grid'."""
    kind: str
    axes: tuple[Keyword, ...]


@dataclass(frozen=True)
class InputDecl(Node):
    """`input name: dtype[dim, ...]`; each dim is a Name (b h q k q_blocks k_blocks) or Num."""
    name: str
    dtype: str
    dims: tuple[Expr, ...]


@dataclass(frozen=True)
class Def(Node):
    """`def name(params) = expr`: a pure expression macro (the prelude is written in these)."""
    name: str
    params: tuple[Param, ...]
    body: Expr


@dataclass(frozen=True)
class MaskClause(Node):
    expr: Expr


@dataclass(frozen=True)
class ScoreClause(Node):
    """`score expr`, an expression over `s`."""
    expr: Expr


@dataclass(frozen=True)
class NormalizeClause(Node):
    """`normalize none | softmax`: `none` turns softmax off (linear attention,
    out[q] = Σ_k keep(q, k) · score(q, k) · v[k]); `softmax` is the default."""
    kind: str


@dataclass(frozen=True)
class OutputClause(Node):
    """`output scale expr`; `kind` is 'scale'."""
    kind: str
    expr: Expr


Decl = Union[LayoutDecl, InputDecl, Def, MaskClause, ScoreClause, NormalizeClause, OutputClause]


@dataclass(frozen=True)
class Spec(Node):
    """A whole `.attn` file. `header` is None for a file of defs only (the prelude)."""
    header: Optional[Header]
    decls: tuple[Decl, ...]
