"""Closed-form tile bounds for band-like masks: kernel loop bounds instead of index arrays.

Representation (consumed by the kernel generator)
-------------------------------------------------
`Bounds(vars, axes, q_counts, kv_counts)`:

* `vars[a]` is the name of the IR variable holding the query tile's coordinate on axis `a`
  of the tile grid: `("qt",)` for 1-D tiles (qt = the query tile index), `("qt0", "qt1", ...)`
  for multi-dimensional tiles of a grid layout (tiles numbered row-major over the tile grid,
  so qt = (qt0 · counts[1] + qt1) · counts[2] + ... ).
* `axes[a]` is a tuple of `Range(lo, hi, cls)`: half-open ranges `[lo, hi)` of *key-tile
  coordinates on axis a*, where `lo`, `hi` are int IR expressions over `vars[a]` only (and
  constants) and `cls` a `TileClass` (FULL or PARTIAL). The ranges of one axis are sorted
  and disjoint for every query tile (`hi` of one range ≤ `lo` of the next); a range with
  `hi ≤ lo` is empty. Key-tile coordinates covered by no range are EMPTY on that axis.
* The class of key tile (kt0, kt1, ...) for query tile (qt0, qt1, ...) is the *minimum*
  (EMPTY < PARTIAL < FULL) over axes of the class of kt_a on axis a: a tile is FULL iff every
  axis coordinate lies in a FULL range, visited iff every axis coordinate lies in some range.
  For 1-D tiles this is simply the class of the range containing the key tile.

So a 1-D kernel runs `for r in ranges: for kt in range(max(lo,0), hi): ...` with or without
mask code by `r.cls`; a multi-D kernel runs the product of its per-axis ranges.

Derivation
----------
A band is a conjunction of atoms that bound the key index `j` by functions of the query
index `i` (on one axis: `i = q.a`, `j = k.a`; on 1-D tiles `i = q`, `j = k`):
`j op E(i)` for any affine arrangement with coefficient ±1 on `j` (`k <= q + off`,
`q - k < w`, NATTEN `start <= k.x < start + K`), and `j // c op G(i)` (`q // c == k // c`).
They give `lo(i) ≤ j ≤ hi(i)`. Assuming `lo`, `hi` non-decreasing in `i` and rows of a tile
overlapping, a key tile [k0, k1] is visited iff it meets [lo(q0), hi(q1)] and FULL iff
`lo(q1) ≤ k0` and `k1 ≤ hi(q0)` (q0, q1, k1 clipped to the sequence, so tail tiles count
in-range pairs only). On 1-D tiles a union with a constant prefix `k < p` (prefix-LM, sinks,
StreamingLLM `causal & (sinks | window)`) is supported: tiles left of `p` follow the common
band, tiles right of it the band of the other branch, and the one tile containing `p`
gets its class from both.

The assumptions are *not* trusted: `attncc.schedule.build` evaluates the bounds for every
query tile (`bounds_matrix`, O(tiles)) and drops them if they disagree with the exact tile
classification.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..ir.dense import Evaluator, eval_expr
from ..ir.intervals import linear_form
from ..ir.terms import conjuncts
from ..ir.nodes import Binary, Const, Coord, Expr, Select, Unary, Var, transform, walk
from ..passes.simplify import build_linear, simplify
from ..passes.tiles import combine_axes
from .schedule import TileClass, TileGrid

_SWAP = {"lt": "gt", "le": "ge", "gt": "lt", "ge": "le", "eq": "eq"}


@dataclass(frozen=True, eq=False)
class Range:
    """Key-tile coordinates [lo, hi) on one axis, all of class `cls`."""
    lo: Expr
    hi: Expr
    cls: TileClass


@dataclass(frozen=True, eq=False)
class Bounds:
    """Closed-form schedule of one head class (see module docstring). `lengths` binds the
    length variables (`Q_LEN`, `KV_LEN`) that length-generic bounds use, for evaluation at
    the schedule's shape; the expressions themselves do not depend on it."""
    vars: tuple[str, ...]
    axes: tuple[tuple[Range, ...], ...]
    q_counts: tuple[int, ...]
    kv_counts: tuple[int, ...]
    lengths: tuple = ()

    def env(self, var: str, values) -> dict:
        return {var: values, **dict(self.lengths)}

    def __str__(self) -> str:
        from ..ir.printer import format_expr
        lines = []
        for v, ranges in zip(self.vars, self.axes):
            for r in ranges:
                lines.append(f"{v}: [{format_expr(r.lo)}, {format_expr(r.hi)}) {r.cls.name}")
        return "\n".join(lines)


# ---- helpers to build IR ----------------------------------------------------------------

def _c(v: int) -> Expr:
    return Const(int(v))


def _e(v) -> Expr:
    """An int or an IR expression as IR."""
    return v if isinstance(v, Expr) else _c(v)


def _b(op, a, b) -> Expr:
    return Binary(op, a, b)


def _sub(e: Expr, var: Expr, value: Expr) -> Expr:
    return transform(e, lambda n: value if n is var else None)


def _bool_to_int(cond: Expr) -> Expr:
    return Select(cond, _c(1), _c(0))


# ---- atoms → band ------------------------------------------------------------------------

class _Unsupported(Exception):
    pass


def _free_of(e: Expr, node: Expr) -> bool:
    return all(n is not node for n in walk(e))


LENGTHS = ("Q_LEN", "KV_LEN")


def _check_rest(e: Expr, i: Expr) -> None:
    """The bound expression may only use the query index `i`, the sequence lengths,
    constants and integer arithmetic."""
    for n in walk(e):
        if isinstance(n, (Var, Coord)):
            if n is not i and not (isinstance(n, Var) and n.name in LENGTHS):
                raise _Unsupported
        elif not isinstance(n, (Const, Binary, Unary, Select)):
            raise _Unsupported


def _atom_bounds(atom: Expr, i: Expr, j: Expr) -> tuple[list[Expr], list[Expr]]:
    """(lower bounds, upper bounds) on j from one comparison atom."""
    if atom is Const(True):
        return [], []
    if not (isinstance(atom, Binary) and atom.op in _SWAP and atom.a.dtype == "int"):
        raise _Unsupported
    op, a, b = atom.op, atom.a, atom.b
    # j // c on one side, j-free on the other.
    for x, y, o in ((a, b, op), (b, a, _SWAP[op])):
        if isinstance(x, Binary) and x.op == "floordiv" and x.a is j and \
                isinstance(x.b, Const) and x.b.value > 0 and _free_of(y, j):
            _check_rest(y, i)
            c = x.b.value
            start = _b("mul", y, _c(c))
            last = _b("add", start, _c(c - 1))
            return {"eq": ([start], [last]), "le": ([], [last]), "lt": ([], [_b("sub", start, _c(1))]),
                    "ge": ([start], []), "gt": ([_b("add", start, _c(c))], [])}[o]
    fa, fb = linear_form(a), linear_form(b)
    coeffs = dict(fa[0])
    for t, v in fb[0].items():
        coeffs[t] = coeffs.get(t, 0) - v
        if coeffs[t] == 0:
            del coeffs[t]
    const = fa[1] - fb[1]
    cj = coeffs.pop(j, 0)
    if cj not in (1, -1):
        raise _Unsupported
    if any(not _free_of(t, j) for t in coeffs):
        raise _Unsupported
    # cj·j + R op 0
    if cj == 1:
        e, o = build_linear({t: -v for t, v in coeffs.items()}, -const), op     # j op -R
    else:
        e, o = build_linear(coeffs, const), _SWAP[op]                           # j op' R
    _check_rest(e, i)
    return {"eq": ([e], [e]), "le": ([], [e]), "lt": ([], [_b("sub", e, _c(1))]),
            "ge": ([e], []), "gt": ([_b("add", e, _c(1))], [])}[o]


def _band(atoms: list[Expr], i: Expr, j: Expr, kv_len) -> tuple[Expr, Expr]:
    """Clamped (lo(i), hi(i)) of the conjunction of `atoms` on j ∈ [0, kv_len) (kv_len an
    int or an IR length); kv_len None: no upper clamp (hi None when no atom bounds j)."""
    los, his = [_c(0)], ([] if kv_len is None else [_b("sub", _e(kv_len), _c(1))])
    for a in atoms:
        lo, hi = _atom_bounds(a, i, j)
        los += lo
        his += hi
    if not his:
        his = [None]
    lo, hi = los[0], his[0]
    for x in los[1:]:
        lo = _b("max", lo, x)
    for x in his[1:]:
        hi = _b("min", hi, x)
    return simplify(lo), (None if hi is None else simplify(hi))


# ---- band → ranges -------------------------------------------------------------------------

@dataclass(frozen=True)
class _Axis:
    t: Expr        # the query-tile variable
    i: Expr        # query index node
    bm: int
    bn: int
    q_len: object  # int, or the IR variable Q_LEN (length-generic bounds)
    kv_len: object

    @property
    def nk(self) -> Expr:
        if isinstance(self.kv_len, int):
            return _c(-(-self.kv_len // self.bn))
        return _b("floordiv", _b("add", self.kv_len, _c(self.bn - 1)), _c(self.bn))

    def q0(self) -> Expr:
        return _b("mul", self.t, _c(self.bm))

    def q1(self) -> Expr:
        return _b("min", _b("add", self.q0(), _c(self.bm - 1)), _b("sub", _e(self.q_len), _c(1)))


def _ends(ax: _Axis, band) -> tuple[Expr, Expr, Expr, Expr]:
    lo, hi = band
    q0, q1 = ax.q0(), ax.q1()
    return _sub(lo, ax.i, q0), _sub(lo, ax.i, q1), _sub(hi, ax.i, q0), _sub(hi, ax.i, q1)


def _band_ranges(ax: _Axis, band) -> list[Range]:
    L0, L1, H0, H1 = _ends(ax, band)
    bn = ax.bn
    vlo = _b("floordiv", L0, _c(bn))
    vhi = Select(_b("or", _b("lt", H1, L0), _rows_empty(L0, L1, H0, H1)), vlo,
                 _b("add", _b("floordiv", H1, _c(bn)), _c(1)))
    flo = _b("sub", _c(0), _b("floordiv", _b("sub", _c(0), L1), _c(bn)))   # ceil(L1 / bn)
    fhi = Select(_b("ge", H0, _b("sub", _e(ax.kv_len), _c(1))), ax.nk,
                 _b("floordiv", _b("add", H0, _c(1)), _c(bn)))
    fe_lo = _b("min", _b("max", flo, vlo), vhi)
    fe_hi = _b("max", _b("min", fhi, vhi), fe_lo)
    return [Range(vlo, fe_lo, TileClass.PARTIAL), Range(fe_lo, fe_hi, TileClass.FULL),
            Range(fe_hi, vhi, TileClass.PARTIAL)]


def _rows_empty(L0, L1, H0, H1) -> Expr:
    """The first and the last row of the query tile keep nothing (e.g. a window that the
    causal offset pushes out entirely); the band is then taken as empty on the tile."""
    return _b("and", _b("gt", L0, H0), _b("gt", L1, H1))


def _full_on(ax: _Axis, band, ka, kb) -> Expr:
    """Every row of the query tile keeps every key of [ka, kb] (ints or IR)."""
    L0, L1, H0, H1 = _ends(ax, band)
    return _b("and", _b("le", L1, _e(ka)), _b("le", _e(kb), H0))


def _visited_on(ax: _Axis, band, ka, kb) -> Expr:
    """Some row of the query tile keeps some key of [ka, kb] (ints or IR)."""
    L0, L1, H0, H1 = _ends(ax, band)
    return _b("and", _b("le", _b("max", L0, _e(ka)), _b("min", H1, _e(kb))),
              Unary("not", _rows_empty(L0, L1, H0, H1)))


def _prefix_of(e: Expr, i, j) -> Optional[int]:
    """p when `e` is the constant key range [0, p) (e.g. `k < 4`), else None."""
    try:
        lo, hi = _band(conjuncts(e), i, j, None)
    except _Unsupported:
        return None
    if isinstance(lo, Const) and isinstance(hi, Const) and lo.value <= 0:
        return hi.value + 1
    return None


def _ranges_1d(mask: Expr, ax: _Axis) -> list[Range]:
    items = conjuncts(mask)
    ors = [x for x in items if isinstance(x, Binary) and x.op == "or"]
    if not ors:
        return _band_ranges(ax, _band(items, ax.i, Var("k"), ax.kv_len))
    if len(ors) != 1:
        raise _Unsupported
    common = [x for x in items if x is not ors[0]]
    j = Var("k")
    for pre, other in ((ors[0].a, ors[0].b), (ors[0].b, ors[0].a)):
        p = _prefix_of(pre, ax.i, j)
        if p is not None:
            break
    else:
        raise _Unsupported
    x_band = _band(common, ax.i, j, ax.kv_len)
    xy_band = _band(common + conjuncts(other), ax.i, j, ax.kv_len)
    generic = not isinstance(ax.kv_len, int)
    p = max(p, 0) if generic else min(max(p, 0), ax.kv_len)
    bn = ax.bn
    pf, pv = p // bn, -(-p // bn)
    out = [Range(_b("min", r.lo, _c(pf)), _b("min", r.hi, _c(pf)), r.cls)
           for r in _band_ranges(ax, x_band)]
    if p % bn:
        k0 = pf * bn
        if generic:  # the tile holding p: keys [k0, min(k0 + bn, KV_LEN) - 1]
            k1 = _b("min", _c(k0 + bn - 1), _b("sub", ax.kv_len, _c(1)))
            has_y = _b("le", _c(p), k1)
            full = _b("and", _full_on(ax, x_band, k0, p - 1),
                      _b("or", Unary("not", has_y), _full_on(ax, xy_band, p, k1)))
            vis = _b("or", _visited_on(ax, x_band, k0, p - 1),
                     _b("and", has_y, _visited_on(ax, xy_band, p, k1)))
        else:
            k1 = min(pf * bn + bn - 1, ax.kv_len - 1)
            full = _full_on(ax, x_band, k0, p - 1)
            vis = _visited_on(ax, x_band, k0, p - 1)
            if p <= k1:
                full = _b("and", full, _full_on(ax, xy_band, p, k1))
                vis = _b("or", vis, _visited_on(ax, xy_band, p, k1))
        mid = _b("add", _c(pf), _bool_to_int(full))
        out += [Range(_c(pf), mid, TileClass.FULL),
                Range(mid, _b("add", _c(pf), _bool_to_int(vis)), TileClass.PARTIAL)]
    out += [Range(_b("max", r.lo, _c(pv)), _b("max", r.hi, _c(pv)), r.cls)
            for r in _band_ranges(ax, xy_band)]
    return out


def derive_bounds(mask: Expr, q_grid: TileGrid, kv_grid: TileGrid,
                  layout=None, generic: bool = False) -> Optional[Bounds]:
    """Closed-form bounds of a mask on the given tilings, or None when the mask is not
    recognized as band-like. Unvalidated: check with `bounds_agree` / `bounds_matrix`
    against the exact classification.

    mask     `h` substituted; lengths substituted too (specialized), unless `generic`
    generic  1-D tiles only: the bounds keep `Q_LEN` / `KV_LEN` as variables, so they are the
             same expressions for every length (one kernel per pattern); `Bounds.lengths`
             records the grids' lengths for evaluation
    """
    try:
        if len(q_grid.shape) == 1:
            if layout is not None and not hasattr(layout, "q") and len(layout.axes) == 1:
                mask = transform(mask, lambda n: Var(n.side) if isinstance(n, Coord) else None)
            if any(isinstance(n, Coord) for n in walk(mask)):
                return None
            bm, bn = q_grid.tile[0], kv_grid.tile[0]
            if generic:
                ax = _Axis(Var("qt"), Var("q"), bm, bn, Var("Q_LEN"), Var("KV_LEN"))
                ranges = _ranges_1d(mask, ax)
                axes = (tuple(Range(tidy_generic(r.lo, bm, bn), tidy_generic(r.hi, bm, bn),
                                    r.cls) for r in ranges),)
                lengths = (("Q_LEN", q_grid.shape[0]), ("KV_LEN", kv_grid.shape[0]))
                return Bounds(("qt",), axes, q_grid.counts, kv_grid.counts, lengths)
            ax = _Axis(Var("qt"), Var("q"), bm, bn, q_grid.shape[0], kv_grid.shape[0])
            ranges = _ranges_1d(mask, ax)
            axes = (tuple(_simplify_range(r, "qt", q_grid.counts[0]) for r in ranges),)
            names = ("qt",)
        else:
            nd = len(q_grid.shape)
            if generic or nd > 4 or any(isinstance(n, Var) and n.name in ("q", "k") for n in walk(mask)):
                return None
            per_axis: list[list[Expr]] = [[] for _ in range(nd)]
            for atom in conjuncts(mask):
                axes_used = {n.axis for n in walk(atom) if isinstance(n, Coord)}
                if len(axes_used) != 1:
                    if atom is Const(True):
                        continue
                    return None
                per_axis[axes_used.pop()].append(atom)
            axes_l, names = [], tuple(f"qt{a}" for a in range(nd))
            for a in range(nd):
                name = layout.axes[a].name if layout is not None else str(a)
                i, j = Coord("q", a, name), Coord("k", a, name)
                ax = _Axis(Var(names[a]), i, q_grid.tile[a], kv_grid.tile[a],
                           q_grid.shape[a], kv_grid.shape[a])
                band = _band(per_axis[a], i, j, kv_grid.shape[a])
                axes_l.append(tuple(_simplify_range(r, names[a], q_grid.counts[a])
                                   for r in _band_ranges(ax, band)))
            axes = tuple(axes_l)
    except _Unsupported:
        return None
    return Bounds(names, axes, q_grid.counts, kv_grid.counts)


def _simplify_range(r: Range, var: str, n: int) -> Range:
    return Range(tidy(r.lo, var, n), tidy(r.hi, var, n), r.cls)


def tidy(expr: Expr, var: str, n: int) -> Expr:
    """Simplify a bound expression knowing that `var` only takes the values 0..n-1: every
    subexpression that is constant over that range becomes the constant, `min`/`max` whose
    operands are ordered over the range keep the smaller/larger operand, and `?:` with a
    constant condition keeps its branch. Exact (checked on every value of `var`), O(n) per
    node."""
    ev = Evaluator({var: torch.arange(max(n, 1), dtype=torch.int64)})
    return _tidy_with(expr, ev)


def _tidy_with(expr: Expr, ev: Evaluator) -> Expr:
    def fn(node: Expr):
        if isinstance(node, (Const, Var)):
            return None
        value = ev.evaluate(node)
        if value.numel() == 1 or bool((value == value.flatten()[0]).all()):
            v = value.flatten()[0].item()
            return Const(bool(v)) if node.dtype == "bool" else Const(int(v))
        if isinstance(node, Binary) and node.op in ("min", "max"):
            a, b = ev.evaluate(node.a), ev.evaluate(node.b)
            if bool((a <= b).all()):
                return node.a if node.op == "min" else node.b
            if bool((b <= a).all()):
                return node.b if node.op == "min" else node.a
        return None

    out = simplify(transform(simplify(expr), fn))
    return simplify(transform(out, fn))


def _samples(bm: int, bn: int) -> list[tuple[int, int]]:
    """Fixed (Q_LEN, KV_LEN) pairs on which `tidy_generic` tests its rewrites: tile
    multiples and not, short and long, more queries than keys and fewer."""
    ls = sorted({1, 2, 3, bm - 1, bm, bm + 1, bn - 1, bn + 1, 2 * bm + 3, 5 * bn, 7 * bm - 1, 100,
                 255, 1000, 1024, 2047, 4096 + 17, 8192})
    pairs = [(n, n) for n in ls]
    pairs += [(n, 2 * n + 5) for n in ls if n < 4096] + [(2 * n + 5, n) for n in ls if n < 4096]
    pairs += [(1, 4096), (4096, 1), (100, 1000), (1000, 100), (3 * bm, 5 * bn + 1)]
    return pairs


def tidy_generic(expr: Expr, bm: int, bn: int) -> Expr:
    """`tidy` for length-generic bounds: a subexpression is replaced by a constant, and a
    `min`/`max` by one operand, when that holds for every query tile at every length pair of
    a fixed sample set (`_samples`). Not a proof: the schedule validates the bounds at each
    shape it is built for and falls back to specialized bounds (or the lists) otherwise.
    The result depends only on the expression and the tile sizes, never on a length."""
    qt, ql, kl = [], [], []
    for lq, lk in _samples(bm, bn):
        n = -(-lq // bm)
        qt.append(torch.arange(n, dtype=torch.int64))
        ql.append(torch.full((n,), lq, dtype=torch.int64))
        kl.append(torch.full((n,), lk, dtype=torch.int64))
    ev = Evaluator({"qt": torch.cat(qt), "Q_LEN": torch.cat(ql), "KV_LEN": torch.cat(kl)})
    return _tidy_with(expr, ev)


# ---- evaluation / validation ------------------------------------------------------------

def _axis_matrix(var: str, ranges, nq: int, nk: int, lengths=()) -> Optional[torch.Tensor]:
    t = torch.arange(nq, dtype=torch.int64)
    kt = torch.arange(nk, dtype=torch.int64)[None, :]
    cover = torch.zeros(nq, nk, dtype=torch.int16)
    out = torch.zeros(nq, nk, dtype=torch.int8)
    prev = torch.full((nq,), -(1 << 62), dtype=torch.int64)
    for r in ranges:
        lo = eval_expr(r.lo, {var: t, **dict(lengths)}).expand(nq).to(torch.int64)
        hi = eval_expr(r.hi, {var: t, **dict(lengths)}).expand(nq).to(torch.int64)
        nonempty = hi > lo
        if bool((nonempty & (lo < prev)).any()):
            return None  # ranges out of order
        inside = (kt >= lo[:, None]) & (kt < hi[:, None])
        cover += inside
        out[inside] = int(r.cls)
        prev = torch.where(nonempty, hi, prev)
    if bool((cover > 1).any()):
        return None
    return out


def bounds_agree(bounds: Bounds, full, partial) -> bool:
    """Whether `bounds` describe exactly the tiles of the CSR lists `full` and `partial`
    (`attncc.schedule.schedule.CSR`, by query tile). O(n_q_tiles + nnz) for 1-D bounds;
    multi-D bounds are compared through `bounds_matrix`."""
    if len(bounds.vars) != 1:
        m = bounds_matrix(bounds)
        if m is None:
            return False
        n = m.shape[1]
        want = torch.zeros_like(m)
        want[partial.to_dense(n)] = int(TileClass.PARTIAL)
        want[full.to_dense(n)] = int(TileClass.FULL)
        return torch.equal(m, want)
    var, ranges, nq, nk = bounds.vars[0], bounds.axes[0], bounds.q_counts[0], bounds.kv_counts[0]
    t = torch.arange(nq, dtype=torch.int64)
    prev = torch.zeros(nq, dtype=torch.int64)
    spans = {TileClass.FULL: [], TileClass.PARTIAL: []}
    for r in ranges:
        lo = eval_expr(r.lo, bounds.env(var, t)).expand(nq).to(torch.int64)
        hi = eval_expr(r.hi, bounds.env(var, t)).expand(nq).to(torch.int64)
        nonempty = hi > lo
        if bool((nonempty & ((lo < prev) | (lo < 0) | (hi > nk))).any()):
            return False  # out of order, overlapping or outside the key tiles
        prev = torch.where(nonempty, hi, prev)
        spans[r.cls].append((torch.where(nonempty, lo, 0), torch.where(nonempty, hi, 0)))
    for cls, csr in ((TileClass.FULL, full), (TileClass.PARTIAL, partial)):
        count = sum((hi - lo for lo, hi in spans[cls]), torch.zeros(nq, dtype=torch.int64))
        if not torch.equal(count, csr.counts.to(torch.int64)):
            return False
        rows = torch.repeat_interleave(t, csr.counts.to(torch.int64))
        col = csr.indices.to(torch.int64)
        inside = torch.zeros(col.shape, dtype=torch.bool)
        for lo, hi in spans[cls]:
            inside |= (col >= lo[rows]) & (col < hi[rows])
        if not bool(inside.all()):
            return False
    return True


def bounds_matrix(bounds: Bounds) -> Optional[torch.Tensor]:
    """int8 [n_q_tiles, n_kv_tiles] of TileClass values described by `bounds` (row-major tile
    numbering on both sides), or None if its ranges overlap or are out of order."""
    mats = []
    for var, ranges, nq, nk in zip(bounds.vars, bounds.axes, bounds.q_counts, bounds.kv_counts):
        m = _axis_matrix(var, ranges, nq, nk, bounds.lengths)
        if m is None:
            return None
        mats.append(m)
    return combine_axes(mats)
