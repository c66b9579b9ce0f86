"""Dense evaluation of the mask IR with vectorized torch ops: the reference semantics.

Index variables are broadcastable int64 tensors b [B,1,1,1], h [1,H,1,1], q [1,1,Lq,1] and
k [1,1,1,Lkv]; lengths are 0-d tensors. Every IR node is evaluated once (memoized by node
identity), so an expression that does not use `h` or `b` stays [1,1,Lq,Lkv] until the final
broadcast into the output. Query rows are evaluated in chunks to bound intermediates, and
nodes that do not depend on `q` are shared between chunks.

For grid patterns the index space mirrors the layout: q and k each get one tensor dimension
per layout axis (b, h, q.y, q.x, k.y, k.x for a 2-D grid), coordinates are plain aranges and
`q`/`k` are their row-major flattening. A per-axis condition such as `abs(q.y - k.y) <= 3`
then costs [Y, 1, Y, 1] elements, and only the final `&` of the axes is full size; the
result is a view of the [B, H, Lq, Lkv] output, which is written chunk by chunk.

Semantics (DESIGN §4): `//` and `%` floor as in Python (`-3 // 4 == -1`, `-3 % 4 == 1`);
coordinates are `(index // stride) % size` on the row-major layout.

Undefined values. Integer division or modulo by zero, and an input index outside the input's
extent, make the value at that position *undefined*. Undefined positions are tracked as a
boolean "poison" mask that propagates through every operator, except that a defined `false`
in `&` (or a defined `true` in `|`) and the untaken branch of `?:` discard it, so a guarded
expression such as `k != q ? q // (k - q) : 0` is fine. If an undefined value reaches the
result, `MaskEvalError` names the first offending expression and a position — the evaluator
never returns silently wrong values and never wraps indices. Float operations (`/`, `log`,
`sqrt`, ...) follow IEEE arithmetic in float64 (`1.0 / 0.0 == inf`) and are not poisoned.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional

import torch

from .inputs import ROUTE_INPUTS, check_inputs
from .nodes import (BOOL, FLOAT, INT, Binary, Blocks, Const, Coord, Expr, FCall, Load, Route,
                    Select, Unary, Var, free_vars, walk)
from .printer import format_expr
from .pattern import Layout
from .segmented import coord_terms, lengths as layout_lengths, route_groups_expr
from .selection import (MaskEvalError, _broadcast_region, blocks_keep,  # noqa: F401
                        region_grid, region_index, route_by_groups, route_selection,
                        select_blocks)

_TORCH_DTYPE = {INT: torch.int64, FLOAT: torch.float64, BOOL: torch.bool}
_FUNCS = {"tanh": torch.tanh, "exp": torch.exp, "exp2": torch.exp2, "log": torch.log,
          "sqrt": torch.sqrt}
_CMP = {"lt": torch.lt, "le": torch.le, "gt": torch.gt, "ge": torch.ge, "eq": torch.eq,
        "ne": torch.ne}
_AXES = ("b", "h", "q", "k")
# Elements of one [rows, kv_len] slab per chunk of query rows (times batch·heads if used).
_CHUNK_ELEMS = 1 << 22


# ---- data-dependent selectors -------------------------------------------------------------

def route_groups(layout, side: str, region, n: int, device=None) -> tuple[torch.Tensor, int]:
    """(region of each of the `n` tokens of `side`, int64 [n]; number of regions) of a
    `route(region, ...)` under `layout` (`attncc.ir.segmented.route_groups_expr`: a plain
    grid, separate query and key grids, or none)."""
    if layout is not None and not isinstance(layout, Layout):
        region = _broadcast_region(region, len(layout.k.axes))
        expr, count = route_groups_expr(layout, side, region)
        t = torch.arange(n, device=device, dtype=torch.int64)
        gid = Evaluator({side: t}, layout=layout, device=device).evaluate(expr)
        return gid.reshape(-1).expand(n).contiguous(), count
    shape = layout.shape if layout is not None else (n,)
    region = _broadcast_region(region, len(shape))
    return region_index(shape, region, device), math.prod(region_grid(shape, region))


# ---- the evaluator --------------------------------------------------------------------------

class Evaluator:
    """Evaluates IR nodes on broadcastable tensors.

    `env` maps variable names (b h q k s Q_LEN KV_LEN HEADS) to tensors or Python numbers;
    index tensors must be 4-D and broadcastable in the order (b, h, q, k). `inputs` are the
    runtime input tensors (and `query`/`key` for `route`). `shared` is a memo that outlives
    this evaluator for nodes that do not depend on `q` (and for selector results).

    Grid index space: `space` = ((dims, shape) for b, h, q, k) lets q and k span several
    tensor dimensions (one per layout axis, row-major); `env` then also holds the
    coordinate tensors under "q.0", "k.1", ... and `q`/`k` are the flat indices. Used for
    error positions; `q_offset` is the flat offset of the first query (chunked evaluation).
    """

    def __init__(self, env: Mapping[str, object], *, layout=None, inputs=None, device=None,
                 shared: Optional[dict] = None, q_varying: Optional[set] = None,
                 q_offset: int = 0, space=None, canonical: bool = False):
        self.space = space or tuple(((d,), (1,)) for d in range(4))
        # canonical: b and h are full aranges and q / k vary exactly over their `space`
        # dimensions (as built by dense_mask), so selectors expand by two 1-D gathers.
        self.canonical = canonical
        self.device = torch.device(device) if device is not None else None
        self.env = {n: self._tensor(v, n) for n, v in env.items()}
        self.layout = layout
        self.inputs = dict(inputs or {})
        self.memo: dict[int, tuple[torch.Tensor, Optional[torch.Tensor]]] = {}
        self.shared = shared if shared is not None else {}
        self.q_varying = q_varying
        self.q_offset = q_offset
        # (message, undefined-positions mask) of every division by zero / bad index seen;
        # sources found in q-independent nodes are kept in `shared` for later chunks.
        self.sources: list[tuple[str, torch.Tensor]] = []
        self._persist = False

    def _tensor(self, v, name):
        if isinstance(v, torch.Tensor):
            return v if self.device is None else v.to(self.device)
        dtype = torch.float64 if name == "s" or isinstance(v, float) else torch.int64
        return torch.tensor(v, dtype=dtype, device=self.device)

    # -- public ---------------------------------------------------------------------------
    def evaluate(self, root: Expr, where: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Value of `root`; raises MaskEvalError if it depends on an undefined value (an
        out-of-range input read, a division by zero) — only at the positions where the bool
        tensor `where` is true, when given (e.g. a score read at pairs the mask drops)."""
        for node in walk(root):
            if id(node) not in self.memo:
                if self.q_varying is not None and id(node) not in self.q_varying \
                        and id(node) in self.shared:
                    self.memo[id(node)] = self.shared[id(node)]
                    continue
                self._persist = self.q_varying is not None and id(node) not in self.q_varying
                self.memo[id(node)] = self._eval(node)
                if self._persist:
                    self.shared[id(node)] = self.memo[id(node)]
        value, poison = self.memo[id(root)]
        if poison is not None and where is not None:
            poison = poison & where
        if poison is not None and bool(poison.any()):
            self._raise(poison)
        return value

    # -- poison bookkeeping ---------------------------------------------------------------
    def _raise(self, poison: torch.Tensor):
        rank = 1 + max(d for dims, _ in self.space for d in dims)
        pad = lambda t: t.reshape((1,) * (rank - t.dim()) + tuple(t.shape))  # noqa: E731
        pp = pad(poison)
        pos = [int(i) for i in pp.nonzero()[0]]
        sources = self.shared.get("sources", []) + self.sources
        message = sources[0][0] if sources else "undefined value"
        for msg, src in sources:
            ps = pad(src)
            if bool(ps[tuple(p if n > 1 else 0 for p, n in zip(pos, ps.shape))]):
                message = msg
                break
        where = []
        for name, (dims, shape) in zip(_AXES, self.space):
            if all(pp.shape[d] == 1 for d in dims):
                continue  # the undefined value does not vary along this index
            flat = 0
            for d, size in zip(dims, shape):
                flat = flat * size + pos[d]
            where.append(f"{name}={flat + (self.q_offset if name == 'q' else 0)}")
        raise MaskEvalError(message + (" at " + ", ".join(where) if where else ""))

    def _poison(self, msg: str, bad: torch.Tensor) -> Optional[torch.Tensor]:
        if not bool(bad.any()):
            return None
        if self._persist:
            self.shared.setdefault("sources", []).append((msg, bad))
        else:
            self.sources.append((msg, bad))
        return bad

    @staticmethod
    def _union(*ps):
        out = None
        for p in ps:
            if p is not None:
                out = p if out is None else out | p
        return out

    # -- nodes ----------------------------------------------------------------------------
    def _var(self, name: str) -> torch.Tensor:
        if name not in self.env:
            raise MaskEvalError(f"variable '{name}' is not available here")
        return self.env[name]

    def _eval(self, node: Expr):
        if isinstance(node, Const):
            return torch.tensor(node.value, dtype=_TORCH_DTYPE[node.dtype], device=self.device), None
        if isinstance(node, Var):
            return self._var(node.name), None
        if isinstance(node, Coord):
            return self._coord(node), None
        kids = [self.memo[id(c)] for c in node.children()]
        vals = [v for v, _ in kids]
        polls = [p for _, p in kids]
        if isinstance(node, Unary):
            x = vals[0]
            out = {"neg": torch.neg, "abs": torch.abs, "not": torch.logical_not,
                   "float": lambda t: t.to(torch.float64)}[node.op](x)
            return out, polls[0]
        if isinstance(node, Binary):
            return self._binary(node, vals, polls)
        if isinstance(node, Select):
            c, a, b = vals
            out = torch.where(c, a, b)
            pc, pa, pb = polls
            branch = None
            if pa is not None or pb is not None:
                f = torch.zeros((), dtype=torch.bool, device=c.device)
                branch = torch.where(c, pa if pa is not None else f, pb if pb is not None else f)
            return out, self._union(pc, branch)
        if isinstance(node, FCall):
            return _FUNCS[node.fn](*vals), self._union(*polls)
        if isinstance(node, Load):
            return self._load(node, vals, polls)
        if isinstance(node, Route):
            return self._route(node), None
        if isinstance(node, Blocks):
            return self._blocks(node), None
        raise MaskEvalError(f"cannot evaluate IR node {type(node).__name__}")

    def _coord(self, node: Coord) -> torch.Tensor:
        direct = self.env.get(f"{node.side}.{node.axis}")
        if direct is not None:
            return direct
        if self.layout is None:
            raise MaskEvalError(f"coordinate {node.side}.{node.name} used, but the pattern has "
                                "no layout")
        terms = coord_terms(self.layout, node.side, node.axis)
        if terms is None:
            raise MaskEvalError(f"coordinate {node.side}.{node.name}: axis {node.axis} is not in "
                                f"layout {self.layout}")
        start, stride, size = terms
        i = self._var(node.side)
        if start:
            i = i - start
        return torch.remainder(torch.div(i, stride, rounding_mode="floor"), size)

    def _binary(self, node: Binary, vals, polls):
        a, b = vals
        op = node.op
        poison = self._union(*polls)
        if op in ("and", "or"):
            pa, pb = polls
            if poison is None:
                return (a & b if op == "and" else a | b), None
            # A defined false (and) / defined true (or) operand decides the result.
            ok_a = (~a if op == "and" else a) if pa is None else (~a if op == "and" else a) & ~pa
            ok_b = (~b if op == "and" else b) if pb is None else (~b if op == "and" else b) & ~pb
            return (a & b if op == "and" else a | b), poison & ~(ok_a | ok_b)
        if op in _CMP:
            return _CMP[op](a, b), poison
        if op in ("floordiv", "mod"):
            zero = b == 0
            bad = self._poison(f"division by zero in `{format_expr(node)}`", zero) \
                if bool(zero.any()) else None
            safe = torch.where(zero, torch.ones_like(b), b) if bad is not None else b
            out = (torch.div(a, safe, rounding_mode="floor") if op == "floordiv"
                   else torch.remainder(a, safe))
            return out, self._union(poison, bad)
        fn = {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div,
              "min": torch.minimum, "max": torch.maximum}[op]
        return fn(a, b), poison

    def _input(self, name: str) -> torch.Tensor:
        if name not in self.inputs:
            raise MaskEvalError(f"input '{name}' was not supplied")
        t = self.inputs[name]
        return t if self.device is None else t.to(self.device)

    def _load(self, node: Load, vals, polls):
        t = self._input(node.input)
        if len(vals) != t.dim():
            raise MaskEvalError(f"input '{node.input}' has {t.dim()} dimensions but "
                                f"`{format_expr(node)}` uses {len(vals)} indices")
        idx, bads = [], []
        for dim, (i, size) in enumerate(zip(vals, t.shape)):
            bad = (i < 0) | (i >= size)
            if bool(bad.any()):
                worst = int(i[bad].flatten()[0])
                src = self._poison(f"index {worst} out of range [0, {size}) in dimension {dim} "
                                   f"of input '{node.input}' in `{format_expr(node)}`", bad)
                bads.append(src)
                i = torch.where(bad, torch.zeros_like(i), i)
            idx.append(i)
        value = t[tuple(idx)] if idx else t
        value = value.to(_TORCH_DTYPE[node.elem])
        return value, self._union(*polls, *bads)

    def _route(self, node: Route) -> torch.Tensor:
        key = ("route", node)
        if key not in self.shared:
            q, k = self._input("query"), self._input("key")
            if self.layout is not None and not isinstance(self.layout, Layout):
                if node.q_region is not None or node.causal:
                    raise MaskEvalError("route: query_region and causal need a 1-D sequence "
                                        "or one grid shared by queries and keys")
                (rq, nq), (rk, nk) = (route_groups(self.layout, s, node.region, t.shape[2],
                                                   q.device) for s, t in (("q", q), ("k", k)))
                sel = route_by_groups(q, k, rq, nq, rk, nk, node.topk)
                self.shared[key] = (sel, rq, rk)
                sel, rq, rk = self.shared[key]
                return self._expand(sel, rq[self._var("q")], rk[self._var("k")])
            shape = self.layout.shape if self.layout is not None else None
            sel = route_selection(q, k, node.region, node.topk, shape,
                                  q_region=node.q_region, causal=node.causal)
            if sel.shape[1] != self.env["HEADS"].item():
                raise MaskEvalError(f"route: query has {sel.shape[1]} heads but the mask is "
                                    f"evaluated for heads={self.env['HEADS'].item()}")
            region = _broadcast_region(node.region, len(shape) if shape else 1)
            q_region = _broadcast_region(node.query_region, len(shape) if shape else 1)
            rq = region_index(shape or (q.shape[2],), q_region, sel.device)
            rk = region_index(shape or (k.shape[2],), region, sel.device)
            self.shared[key] = (sel, rq, rk)
        sel, rq, rk = self.shared[key]
        return self._expand(sel, rq[self._var("q")], rk[self._var("k")])

    def _blocks(self, node: Blocks) -> torch.Tensor:
        key = ("blocks", node)
        if key not in self.shared:
            self.shared[key] = select_blocks(self._input(node.input), node.top, node.threshold)
        sel = self.shared[key]
        beta = node.block
        return self._expand(sel, torch.div(self._var("q"), beta, rounding_mode="floor"),
                            torch.div(self._var("k"), beta, rounding_mode="floor"))

    def _expand(self, sel: torch.Tensor, qi: torch.Tensor, ki: torch.Tensor) -> torch.Tensor:
        """sel [B, H, nq, nk] at (b, h, qi, ki): the selection of each token pair."""
        if not self.canonical:
            return sel[self._var("b"), self._var("h"), qi, ki]
        (_, _), (_, _), (_, q_shape), (_, k_shape) = self.space
        # Columns first on the small tensor, then whole rows (contiguous copies).
        key = ("columns", id(sel))  # the same for every chunk of query rows
        if key not in self.shared:
            self.shared[key] = sel.index_select(3, ki.reshape(-1))  # [B, H, nq, Lkv]
        cols = self.shared[key]
        rows = cols.index_select(2, qi.reshape(-1))  # [B, H, chunk tokens, Lkv]
        return rows.view(sel.shape[0], sel.shape[1], *q_shape, *k_shape)


def eval_expr(expr: Expr, env: Mapping[str, object], *, layout=None, inputs=None,
              device=None) -> torch.Tensor:
    """Evaluate one IR expression (e.g. a score or output-scale modifier) on tensors.

    `env` maps the variables the expression uses to broadcastable tensors (index tensors
    4-D in (b, h, q, k) order; `s` a float64 score tensor) or Python numbers. Returns a
    tensor of the broadcast shape (int64, float64 or bool by the expression's type).
    Raises MaskEvalError for undefined values (see module docstring).
    """
    return Evaluator(env, layout=layout, inputs=inputs, device=device).evaluate(expr)


# ---- dense mask ----------------------------------------------------------------------------

def resolve_lengths(pattern, q_len: Optional[int], kv_len: Optional[int]) -> tuple[int, int]:
    """(q_len, kv_len): the layout's size for grid patterns (and checked against it),
    required arguments otherwise."""
    layout = pattern.layout
    for label, n in (("q_len", q_len), ("kv_len", kv_len)):
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            raise ValueError(f"{label} must be a non-negative int, got {n!r}")
    fixed = layout_lengths(layout)
    if fixed is not None:
        for label, n, want in (("q_len", q_len, fixed[0]), ("kv_len", kv_len, fixed[1])):
            if n is not None and n != want:
                raise ValueError(f"{label}={n} does not match the layout {layout} of pattern "
                                 f"'{pattern.name}' ({want} tokens)")
        return fixed
    if q_len is None or kv_len is None:
        raise ValueError(f"pattern '{pattern.name}' has no layout: pass q_len and kv_len")
    return q_len, kv_len


def _q_dependent(root: Expr) -> set[int]:
    out: set[int] = set()
    for n in walk(root):
        if (isinstance(n, Var) and n.name == "q") or (isinstance(n, Coord) and n.side == "q") \
                or isinstance(n, (Route, Blocks)) or any(id(c) in out for c in n.children()):
            out.add(id(n))
    return out


def _check_route_inputs(pattern, inputs, names, batch, heads, q_len, kv_len) -> None:
    """`query` [batch, heads, q_len, D] and `key` [batch, Hkv, kv_len, D] for `route`."""
    for name in names:
        if name not in inputs:
            raise ValueError(f"pattern '{pattern.name}' uses route(...): pass inputs['{name}'] "
                             f"[batch, heads, {'q_len' if name == 'query' else 'kv_len'}, D]")
        t = inputs[name]
        want_len = q_len if name == "query" else kv_len
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[0] != batch \
                or t.shape[2] != want_len:
            got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"inputs['{name}'] must be [batch={batch}, heads, {want_len}, D], "
                             f"got {got}")
        if name == "query" and t.shape[1] != heads:
            raise ValueError(f"inputs['query'] has {t.shape[1]} heads but heads={heads}")


def dense_mask(pattern, q_len: Optional[int] = None, kv_len: Optional[int] = None,
               heads: int = 1, batch: int = 1, inputs: Optional[Mapping] = None,
               device=None) -> torch.Tensor:
    """The exact mask of `pattern` as torch.bool [batch, heads, q_len, kv_len].

    mask[b, h, i, j] is true iff query i of head h in batch b may see key j. Lengths default
    to the layout's size for grid patterns (and must equal it); without a layout both are
    required. `inputs` maps each declared input to its tensor (checked by `check_inputs`);
    a mask using `route` also needs `query` [batch, heads, q_len, D] and `key`
    [batch, Hkv, kv_len, D]. `device` defaults to the device of the inputs (else CPU).
    """
    q_len, kv_len = resolve_lengths(pattern, q_len, kv_len)
    if getattr(pattern, "checks", ()):
        # NOTE: length constraints recorded by elaboration (e.g. 1-D neighborhood K·d <= L).
        pattern.check_lengths(q_len, kv_len)
    for label, n in (("heads", heads), ("batch", batch)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{label} must be a positive int, got {n!r}")
    inputs = dict(inputs or {})
    mask = pattern.mask
    uses_route = any(isinstance(n, Route) for n in walk(mask))
    declared = {d.name for d in pattern.inputs}
    extra = tuple(n for n in ROUTE_INPUTS if uses_route and n not in declared)
    if device is None:
        tensors = [t for t in inputs.values() if isinstance(t, torch.Tensor)]
        device = tensors[0].device if tensors else torch.device("cpu")
    device = torch.device(device)
    check_inputs(pattern, inputs, batch=batch, heads=heads, q_len=q_len, kv_len=kv_len,
                 device=device, allow=extra)
    _check_route_inputs(pattern, inputs, extra, batch, heads, q_len, kv_len)

    fv = free_vars(mask)
    wide = "b" in fv or "h" in fv or any(isinstance(n, (Route, Blocks, Load)) for n in walk(mask))
    # Index space: b, h, then one dimension per layout axis for q and for k (or one each).
    layout = pattern.layout
    grid = isinstance(layout, Layout)   # one grid: q and k span one dimension per axis
    q_shape = layout.shape if grid else (q_len,)
    k_shape = layout.shape if grid else (kv_len,)
    nd = len(q_shape)
    rank = 2 + 2 * nd

    def at(t: torch.Tensor, dim: int) -> torch.Tensor:
        return t.view([-1 if d == dim else 1 for d in range(rank)])

    def flat(coords: list, shape: tuple) -> torch.Tensor:
        out = coords[0]
        for c, size in zip(coords[1:], shape[1:]):
            out = out * size + c
        return out

    ar = lambda n, start=0: torch.arange(start, start + n, device=device, dtype=torch.int64)  # noqa: E731
    k_coords = [at(ar(n), 2 + nd + a) for a, n in enumerate(k_shape)]
    base = {"b": at(ar(batch), 0), "h": at(ar(heads), 1), "k": flat(k_coords, k_shape),
            "Q_LEN": q_len, "KV_LEN": kv_len, "HEADS": heads}
    if grid:
        base.update({f"k.{a}": c for a, c in enumerate(k_coords)})
    row = math.prod(q_shape[1:])  # tokens per step of the first q axis
    step = max(1, _CHUNK_ELEMS // max(1, row * kv_len * (batch * heads if wide else 1)))
    out = torch.empty(batch, heads, q_len, kv_len, dtype=torch.bool, device=device)
    shared: dict = {}
    q_varying = _q_dependent(mask)
    for r0 in range(0, q_shape[0], step):
        r1 = min(q_shape[0], r0 + step)
        q_coords = [at(ar(r1 - r0, r0), 2)] + [at(ar(n), 2 + a) for a, n in enumerate(q_shape)][1:]
        env = dict(base, q=flat(q_coords, q_shape))
        if grid:
            env.update({f"q.{a}": c for a, c in enumerate(q_coords)})
        space = (((0,), (batch,)), ((1,), (heads,)),
                 (tuple(range(2, 2 + nd)), (r1 - r0,) + tuple(q_shape[1:])),
                 (tuple(range(2 + nd, rank)), tuple(k_shape)))
        ev = Evaluator(env, layout=layout, inputs=inputs, device=device, shared=shared,
                       q_varying=q_varying, q_offset=r0 * row, space=space,
                       canonical=True)
        value = ev.evaluate(mask)
        value = value.reshape((1,) * (rank - value.dim()) + tuple(value.shape))
        out[:, :, r0 * row:r1 * row].view(batch, heads, r1 - r0, *q_shape[1:], *k_shape) \
            .copy_(value)
    return out
