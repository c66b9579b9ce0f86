"""Lower the mask IR to FlexAttention callables: `mask_mod` and `score_mod`.

Pre: a `Pattern` whose mask has no runtime selector (`route`, `blocks`); score and output-scale
modifiers are float IR over `s`, indices and inputs.
Post: Python callables built from the IR, node by node, out of torch ops:
    mask_mod(b, h, q_idx, kv_idx)          -> bool tensor
    score_mod(score, b, h, q_idx, kv_idx)  -> float tensor (`score` is q·kᵀ·scale, attncc's `s`)
FlexAttention calls them on 0-d tensors (vmapped by `create_mask` / the eager path, traced
by `torch.compile`); they work equally on broadcastable tensors of any shape, which is how
`output_scale` is evaluated over [B, Lq, H].

No Python source is generated: the IR is turned into a flat list of instructions (one per
node, shared subexpressions evaluated once) that each call runs in order.

Semantics follow DESIGN §4: `//` and `%` floor (`torch.div(rounding_mode='floor')`,
`torch.remainder`); coordinates are `(index // stride) % size` (`attncc.ir.coords`); lengths
are Python ints fixed when the callable is built. Values the dense evaluator reports as
undefined (division by zero, an input index out of range) are given an arbitrary value here,
because a guarded branch of `?:` is evaluated too; the reference evaluator is the place
where such specs are rejected.
"""
from __future__ import annotations

import math
import operator
from typing import Callable, Mapping, Optional

import torch

from .coords import lower_coords
from .nodes import (BOOL, FLOAT, Binary, Blocks, Const, Coord, Expr, FCall, Load, Route,
                    Select, Unary, Var, walk)

RUNTIME_SELECTOR_ERROR = ("a pattern with runtime selectors (route/blocks) has no static mask_mod "
                          "or BlockMask: its blocks are chosen per call by the runtime pre-pass "
                          "(attncc.compile(p, backend='flex') runs it)")

_TORCH_FUNCS = {"tanh": torch.tanh, "exp": torch.exp, "exp2": torch.exp2, "log": torch.log,
                "sqrt": torch.sqrt}
_MATH_FUNCS = {"tanh": math.tanh, "exp": math.exp, "exp2": lambda x: 2.0 ** x,
               "log": math.log, "sqrt": math.sqrt}
_CMP = {"lt": operator.lt, "le": operator.le, "gt": operator.gt, "ge": operator.ge,
        "eq": operator.eq, "ne": operator.ne}


def check_flex_supported(pattern) -> None:
    """Raise ValueError if the mask uses a runtime selector (not lowerable to a mask_mod
    without its per-call selection; `attncc.runtime.prepass_kernel.lower_selectors` first)."""
    if any(isinstance(n, (Route, Blocks)) for n in walk(pattern.mask)):
        raise ValueError(RUNTIME_SELECTOR_ERROR)


# ---- scalar-or-tensor operators --------------------------------------------------------
# Constants and lengths stay Python numbers; anything touching an index is a tensor.

def _is_t(x) -> bool:
    return isinstance(x, torch.Tensor)


def _floordiv(a, b):
    if not _is_t(a) and not _is_t(b):
        return a // b if b != 0 else 0
    if not _is_t(a):
        a = torch.full_like(b, a)
    if _is_t(b):
        b = torch.where(b == 0, torch.ones_like(b), b)
    elif b == 0:
        return torch.zeros_like(a)
    return torch.div(a, b, rounding_mode="floor")


def _mod(a, b):
    if not _is_t(a) and not _is_t(b):
        return a % b if b != 0 else 0
    if _is_t(b):
        b = torch.where(b == 0, torch.ones_like(b), b)
    elif b == 0:
        return torch.zeros_like(a)
    return torch.remainder(a, b)


def _min(a, b):
    if _is_t(a) and _is_t(b):
        return torch.minimum(a, b)
    if _is_t(a):
        return torch.clamp(a, max=b)
    if _is_t(b):
        return torch.clamp(b, max=a)
    return min(a, b)


def _max(a, b):
    if _is_t(a) and _is_t(b):
        return torch.maximum(a, b)
    if _is_t(a):
        return torch.clamp(a, min=b)
    if _is_t(b):
        return torch.clamp(b, min=a)
    return max(a, b)


def _and(a, b):
    if not _is_t(a) and not _is_t(b):
        return a and b
    if not _is_t(a):
        return b if a else torch.zeros_like(b)
    if not _is_t(b):
        return a if b else torch.zeros_like(a)
    return a & b


def _or(a, b):
    if not _is_t(a) and not _is_t(b):
        return a or b
    if not _is_t(a):
        return torch.ones_like(b) if a else b
    if not _is_t(b):
        return torch.ones_like(a) if b else a
    return a | b


def _not(a):
    return torch.logical_not(a) if _is_t(a) else not a


def _select(c, a, b):
    if not _is_t(c):
        return a if c else b
    return torch.where(c, a, b)


_BINARY = {"add": operator.add, "sub": operator.sub, "mul": operator.mul,
           "floordiv": _floordiv, "mod": _mod, "div": operator.truediv,
           "min": _min, "max": _max, "and": _and, "or": _or, **_CMP}


def _make_float(fdtype):
    def conv(x):
        return x.to(fdtype) if _is_t(x) else float(x)
    return conv


def _make_fcall(fn: str):
    tfn, mfn = _TORCH_FUNCS[fn], _MATH_FUNCS[fn]

    def call(x):
        return tfn(x) if _is_t(x) else mfn(x)
    return call


def _make_load(t: torch.Tensor, elem: str, fdtype):
    """Index the captured tensor `t`; indices are clamped into range (see module docstring)."""
    sizes = tuple(t.shape)
    if elem == FLOAT:
        t = t.to(fdtype)
    elif elem == BOOL:
        t = t.to(torch.bool)

    def load(*idx):
        fixed = []
        for i, n in zip(idx, sizes):
            if _is_t(i):
                fixed.append(torch.clamp(i, 0, n - 1))
            else:
                fixed.append(min(max(int(i), 0), n - 1))
        return t[tuple(fixed)]
    return load


# ---- program --------------------------------------------------------------------------

class _Program:
    """A flat instruction list for one IR root. Every node owns a slot; slots 0..4 hold the
    call arguments b, h, q, k, score, constant slots are pre-filled, and each instruction
    fills its slot from earlier ones."""

    ARGS = {"b": 0, "h": 1, "q": 2, "k": 3, "s": 4}

    def __init__(self, root: Expr, *, layout, inputs: Mapping[str, torch.Tensor],
                 lengths: Mapping[str, int], fdtype=torch.float32, allow_score: bool = False):
        if any(isinstance(n, Coord) for n in walk(root)):
            root = lower_coords(root, layout)
        template: list = [None] * 5
        code: list[tuple[int, Callable, tuple[int, ...]]] = []
        slot: dict[int, int] = {}
        for node in walk(root):
            if isinstance(node, (Route, Blocks)):
                raise ValueError(RUNTIME_SELECTOR_ERROR)
            if isinstance(node, Var) and node.name not in lengths:
                if node.name == "s" and not allow_score:
                    raise ValueError("the score `s` can only be used in a score modifier")
                slot[id(node)] = self.ARGS[node.name]
                continue
            slot[id(node)] = len(template)
            if isinstance(node, (Var, Const)):
                template.append(lengths[node.name] if isinstance(node, Var) else node.value)
                continue
            template.append(None)
            args = tuple(slot[id(c)] for c in node.children())
            if isinstance(node, Unary):
                fn = {"neg": operator.neg, "abs": abs, "not": _not,
                      "float": _make_float(fdtype)}[node.op]
            elif isinstance(node, Binary):
                fn = _BINARY[node.op]
            elif isinstance(node, Select):
                fn = _select
            elif isinstance(node, FCall):
                fn = _make_fcall(node.fn)
            elif isinstance(node, Load):
                if node.input not in inputs:
                    raise ValueError(f"input '{node.input}' was not supplied")
                fn = _make_load(inputs[node.input], node.elem, fdtype)
            else:  # pragma: no cover - every IR node kind is handled above
                raise TypeError(f"cannot lower IR node {type(node).__name__}")
            code.append((slot[id(node)], fn, args))
        self.template = tuple(template)
        self.code = tuple(code)
        self.out = slot[id(root)]

    def __call__(self, b, h, q, k, s=None):
        vals = list(self.template)
        vals[0], vals[1], vals[2], vals[3], vals[4] = b, h, q, k, s
        for dst, fn, args in self.code:
            vals[dst] = fn(*[vals[a] for a in args])
        return vals[self.out]


# ---- public API -----------------------------------------------------------------------

def _lengths(q_len: int, kv_len: int, heads: int) -> dict[str, int]:
    for label, n in (("q_len", q_len), ("kv_len", kv_len), ("heads", heads)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"{label} must be a non-negative int, got {n!r}")
    return {"Q_LEN": q_len, "KV_LEN": kv_len, "HEADS": heads}


def to_index_fn(expr: Expr, pattern, inputs: Optional[Mapping[str, torch.Tensor]] = None, *,
                q_len: int, kv_len: int, heads: int) -> Callable:
    """An integer IR expression of `pattern` (e.g. one index of a table read) as a callable
    (b, h, q_idx, kv_idx) -> int tensor over broadcastable index tensors."""
    return _Program(expr, layout=pattern.layout, inputs=dict(inputs or {}),
                    lengths=_lengths(q_len, kv_len, heads))


def to_mask_mod(pattern, inputs: Optional[Mapping[str, torch.Tensor]] = None, *, q_len: int,
                kv_len: int, heads: int = 1, float_dtype=torch.float32):
    """FlexAttention `mask_mod(b, h, q_idx, kv_idx) -> bool tensor` for `pattern.mask`.

    `inputs` maps each runtime input the mask reads to its tensor (captured by the closure,
    indexed on its own device). Lengths are fixed to `q_len`, `kv_len`, `heads`. The result
    has the broadcast shape of the index arguments (0-d under FlexAttention's vmap).
    Raises ValueError for patterns with runtime selectors (`route`, `blocks`).
    """
    check_flex_supported(pattern)
    prog = _Program(pattern.mask, layout=pattern.layout, inputs=dict(inputs or {}),
                    lengths=_lengths(q_len, kv_len, heads), fdtype=float_dtype)

    def mask_mod(b, h, q_idx, kv_idx):
        out = prog(b, h, q_idx, kv_idx)
        if not _is_t(out):
            return torch.full_like(q_idx + kv_idx, bool(out), dtype=torch.bool)
        return out
    return mask_mod


def to_score_mod(pattern, inputs: Optional[Mapping[str, torch.Tensor]] = None, *, q_len: int,
                 kv_len: int, heads: int = 1, float_dtype=torch.float32):
    """FlexAttention `score_mod(score, b, h, q_idx, kv_idx) -> score` for `pattern.score`,
    or None when the pattern has no score modifier (or it is just `s`).

    FlexAttention passes `score = q·kᵀ·scale`, which is attncc's `s`; the modifier's value
    replaces it before masking and softmax. Float arithmetic runs in `float_dtype`
    (FlexAttention's working precision: float32, or float64 for float64 inputs).
    """
    if pattern.score is None or (isinstance(pattern.score, Var) and pattern.score.name == "s"):
        return None
    prog = _Program(pattern.score, layout=pattern.layout, inputs=dict(inputs or {}),
                    lengths=_lengths(q_len, kv_len, heads), fdtype=float_dtype,
                    allow_score=True)

    def score_mod(score, b, h, q_idx, kv_idx):
        out = prog(b, h, q_idx, kv_idx, score)
        if not _is_t(out):
            return torch.full_like(score, float(out))
        return out.to(score.dtype)
    return score_mod


def output_scale(pattern, inputs: Optional[Mapping[str, torch.Tensor]] = None, *, batch: int,
                 heads: int, q_len: int, kv_len: int, device=None,
                 float_dtype=torch.float32) -> Optional[torch.Tensor]:
    """The `output scale` factor w[b, q, h] as a float tensor [batch, heads, q_len] (head-major,
    like the attention output), or None when the pattern has none. Raises ValueError if the
    expression depends on the key index or the score."""
    expr = pattern.output_scale
    if expr is None:
        return None
    for n in walk(expr):
        if (isinstance(n, Var) and n.name in ("k", "s")) or (isinstance(n, Coord) and n.side == "k"):
            raise ValueError("the output scale may depend on b, q and h only")
    prog = _Program(expr, layout=pattern.layout, inputs=dict(inputs or {}),
                    lengths=_lengths(q_len, kv_len, heads), fdtype=float_dtype)
    idx = dict(dtype=torch.int64, device=device)
    b = torch.arange(batch, **idx).view(batch, 1, 1)
    h = torch.arange(heads, **idx).view(1, heads, 1)
    q = torch.arange(q_len, **idx).view(1, 1, q_len)
    out = prog(b, h, q, torch.zeros((), **idx))
    if not _is_t(out):
        out = torch.tensor(float(out), device=device)
    return out.to(float_dtype).expand(batch, heads, q_len)
