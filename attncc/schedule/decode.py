"""Decode schedules: which cached keys the new query rows of each sequence can keep.

Decode (`Kernel.decode`) returns the last Lq rows of the *square* pattern over the first
L = cache_seqlens[b] cached tokens: rows q = L − Lq … L − 1, keys k = 0 … L − 1, with
Q_LEN = KV_LEN = L. L varies per sequence and per call, so it stays a runtime value here:
the schedule is a set of symbolic key intervals over `q` and `Q_LEN` (KV_LEN is rewritten to
Q_LEN), evaluated per call on the rows of every sequence.

Derivation (closed form, from the IR). The mask is read as a tree of `&` and `|` over atoms;
an atom that bounds the key index `k` affinely with coefficient ±1 (`k <= q`, `q - k < w`,
`k < 4`, `q // c == k // c`, as in `attncc.schedule.closed_form`) becomes one inclusive
interval [lo(q, L), hi(q, L)], `&` intersects interval sets, `|` unites them. Any other atom
(input loads, selectors) is taken as "every key" — a superset, refined at run time below.
So a sliding window gives [q − w + 1, q], sinks + window two intervals, chunked the current
chunk, prefix-LM [0, p − 1] ∪ [0, q], and MoA one pair per head class (`h` is specialized).

Runtime refinement of top-level conjuncts:
  documents  `doc[b, q] == doc[b, k]`: the interval between the first and the last cached key
             whose id equals the id of one of the new rows (exact for packed ids);
  blocks     `blocks(gate, …)`: the key blocks the gate keeps for the new rows' query blocks.

Soundness does not depend on monotonicity: each interval is evaluated at every new row and
the union over rows is bounded by the minimum lo and the maximum hi. Kernels still evaluate
the full mask on every key they visit; the intervals only decide which keys are read.
Work is Σ interval lengths: independent of the cache length for bounded patterns.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..ir.coords import flat_layout
from ..ir.dense import eval_expr, select_blocks
from ..ir.intervals import linear_form
from ..ir.terms import conjuncts, document_input
from ..ir.nodes import Binary, Blocks, Const, Coord, Expr, Load, Route, Select, Unary, Var, walk
from ..passes.simplify import build_linear, simplify, substitute

__all__ = ["DecodeError", "DecodeSchedule", "HeadTerms", "decode_schedule", "square_mask",
           "decode_pattern", "row_positions", "key_ranges", "merge_ranges", "tile_counts",
           "block_selection", "MAX_TERMS"]

# More intervals than this per head class: fall back to "every key" (still sound).
MAX_TERMS = 8
_SWAP = {"lt": "gt", "le": "ge", "gt": "lt", "ge": "le", "eq": "eq"}
_BOUND_VARS = {"q", "Q_LEN", "HEADS"}


class DecodeError(ValueError):
    """The pattern cannot be decoded (e.g. it routes on pooled queries of the whole sequence)."""


@dataclass(frozen=True, eq=False)
class HeadTerms:
    """Key intervals of one head class: inclusive [lo, hi] IR over q and Q_LEN (possibly
    empty when hi < lo), or `terms=None`: no closed form, every cached key."""
    heads: tuple[int, ...]
    terms: Optional[tuple[tuple[Expr, Expr], ...]]


@dataclass(frozen=True, eq=False)
class DecodeSchedule:
    """Symbolic decode schedule of a pattern for `heads` query heads.

    classes    head classes with their key intervals
    head_class class index of every query head
    documents  inputs `doc` of top-level `doc[b, q] == doc[b, k]` conjuncts
    blocks     top-level `blocks(...)` selector nodes
    """
    heads: int
    classes: tuple[HeadTerms, ...]
    head_class: tuple[int, ...]
    documents: tuple[str, ...]
    blocks: tuple[Blocks, ...]

    @property
    def closed_form(self) -> bool:
        return all(c.terms is not None for c in self.classes)

    def __str__(self) -> str:
        from ..ir.printer import format_expr
        lines = [f"decode schedule ({self.heads} heads)"]
        for c in self.classes:
            heads = ",".join(map(str, c.heads))
            if c.terms is None:
                lines.append(f"  heads {heads}: every cached key (no closed form)")
                continue
            for lo, hi in c.terms:
                lines.append(f"  heads {heads}: k in [{format_expr(lo)}, {format_expr(hi)}]")
        lines += [f"  refine: documents {d}" for d in self.documents]
        lines += [f"  refine: blocks({b.input}, block = {b.block})" for b in self.blocks]
        return "\n".join(lines)


def square_mask(mask: Expr) -> Expr:
    """`mask` of the square problem: KV_LEN replaced by Q_LEN (both are L), simplified."""
    return simplify(substitute(mask, {"KV_LEN": Var("Q_LEN")}))


def _flat(pattern):
    """A segmented layout over one token sequence decodes as its flat mask (coordinates
    lowered to index arithmetic); separate query and key layouts have no decode form."""
    layout = pattern.layout
    if getattr(layout, "shared", True) is False:
        raise DecodeError(f"pattern '{pattern.name}' has separate query and key layouts "
                          f"({layout}): decode serves one token sequence")
    return flat_layout(pattern)


def decode_pattern(pattern, lq: int):
    """`pattern` rewritten for decode rows: KV_LEN becomes Q_LEN (= L), loads of inputs on a
    dimension declared `q` are re-indexed to the Lq given rows (index − (L − lq)), and every
    `blocks(...)` selector becomes a load of its per-call selection
    `attncc_selN[b, h, q // β − (L − lq) // β, k // β]` (see `block_selection`).

    Returns (pattern, {Blocks node: selection input name}); the new pattern declares the
    selections as bool inputs. Its mask, score and output scale evaluated at absolute
    positions with Q_LEN = KV_LEN = L give the square problem's values."""
    import dataclasses

    from ..ir.nodes import BOOL, transform
    from ..ir.pattern import InputDecl
    pattern = _flat(pattern)
    qdims = {d.name: tuple(i for i, x in enumerate(d.dims) if x == "q") for d in pattern.inputs}
    shift = Binary("sub", Var("Q_LEN"), Const(int(lq)))
    names: dict = {}
    taken = {d.name for d in pattern.inputs}
    for node in walk(pattern.mask):
        if isinstance(node, Blocks) and node not in names:
            i = len(names)
            while f"attncc_sel{i}" in taken:
                i += 1
            names[node] = f"attncc_sel{i}"
            taken.add(names[node])

    def rewrite(n):
        if isinstance(n, Load) and qdims.get(n.input):
            idx = tuple(Binary("sub", e, shift) if i in qdims[n.input] else e
                        for i, e in enumerate(n.index))
            return Load(n.input, idx, n.elem)
        if isinstance(n, Var) and n.name == "KV_LEN":
            return Var("Q_LEN")
        return None

    def rewrite_blocks(n):
        if n in names:
            beta = Const(int(n.block))
            qb = Binary("sub", Binary("floordiv", Var("q"), beta),
                        Binary("floordiv", shift, beta))
            return Load(names[n], (Var("b"), Var("h"), qb, Binary("floordiv", Var("k"), beta)),
                        BOOL)
        return None

    def go(e):
        if e is None:
            return None
        return simplify(transform(transform(e, rewrite_blocks), rewrite))

    mask = go(pattern.mask)
    decls = tuple(pattern.inputs) + tuple(InputDecl(nm, "bool", ("b", "h", 1, 1))
                                          for nm in names.values())
    return dataclasses.replace(pattern, inputs=decls, mask=mask, score=go(pattern.score),
                               output_scale=go(pattern.output_scale)), names


# ---- atoms → intervals --------------------------------------------------------------------

class _Unsupported(Exception):
    pass


def _free_of_k(e: Expr) -> bool:
    return not any((isinstance(n, Var) and n.name == "k") or isinstance(n, Coord)
                   for n in walk(e))


def _check_bound(e: Expr) -> None:
    for n in walk(e):
        if isinstance(n, Var):
            if n.name not in _BOUND_VARS:
                raise _Unsupported
        elif not isinstance(n, (Const, Binary, Unary, Select)):
            raise _Unsupported


def _atom_interval(atom: Expr) -> tuple[list[Expr], list[Expr]]:
    """(lower bounds, upper bounds) on k from one comparison atom (inclusive)."""
    if not (isinstance(atom, Binary) and atom.op in _SWAP and atom.a.dtype == "int"):
        raise _Unsupported
    k = Var("k")
    op, a, b = atom.op, atom.a, atom.b
    for x, y, o in ((a, b, op), (b, a, _SWAP[op])):
        if isinstance(x, Binary) and x.op == "floordiv" and x.a is k and \
                isinstance(x.b, Const) and x.b.value > 0 and _free_of_k(y):
            _check_bound(y)
            c = x.b.value
            start = Binary("mul", y, Const(c))
            last = Binary("add", start, Const(c - 1))
            return {"eq": ([start], [last]), "le": ([], [last]),
                    "lt": ([], [Binary("sub", start, Const(1))]), "ge": ([start], []),
                    "gt": ([Binary("add", start, Const(c))], [])}[o]
    fa, fb = linear_form(a), linear_form(b)
    coeffs = dict(fa[0])
    for t, v in fb[0].items():
        coeffs[t] = coeffs.get(t, 0) - v
        if coeffs[t] == 0:
            del coeffs[t]
    const = fa[1] - fb[1]
    ck = coeffs.pop(k, 0)
    if ck not in (1, -1) or any(not _free_of_k(t) for t in coeffs):
        raise _Unsupported
    if ck == 1:   # k + R op 0  →  k op -R
        e, o = build_linear({t: -v for t, v in coeffs.items()}, -const), op
    else:         # -k + R op 0  →  k op' R
        e, o = build_linear(coeffs, const), _SWAP[op]
    _check_bound(e)
    return {"eq": ([e], [e]), "le": ([], [e]), "lt": ([], [Binary("sub", e, Const(1))]),
            "ge": ([e], []), "gt": ([Binary("add", e, Const(1))], [])}[o]


_EVERY = (Const(0), Binary("sub", Var("Q_LEN"), Const(1)))


def _intervals(e: Expr) -> list[tuple[Expr, Expr]]:
    """Inclusive key intervals whose union contains every key `e` keeps (for any row)."""
    if isinstance(e, Const):
        return [_EVERY] if e.value else []
    if isinstance(e, Binary) and e.op == "and":
        out = []
        for lo1, hi1 in _intervals(e.a):
            for lo2, hi2 in _intervals(e.b):
                out.append((simplify(Binary("max", lo1, lo2)), simplify(Binary("min", hi1, hi2))))
        if len(out) > MAX_TERMS:
            raise _Unsupported
        return out
    if isinstance(e, Binary) and e.op == "or":
        out = _intervals(e.a) + _intervals(e.b)
        if len(out) > MAX_TERMS:
            raise _Unsupported
        return out
    if _free_of_k(e):  # a row guard: keeps every key or none
        return [_EVERY]
    try:
        los, his = _atom_interval(e)
    except _Unsupported:
        return [_EVERY]   # e.g. an input load: refined at run time where possible
    lo, hi = _EVERY
    for x in los:
        lo = Binary("max", lo, x)
    for x in his:
        hi = Binary("min", hi, x)
    return [(simplify(lo), simplify(hi))]


def decode_schedule(pattern, heads: int) -> DecodeSchedule:
    """The symbolic decode schedule of `pattern` for `heads` query heads (see module doc).
    Raises DecodeError for patterns whose rows depend on the whole query sequence
    (`route`) or that have a grid layout."""
    if getattr(pattern, "normalize", "softmax") != "softmax":
        raise DecodeError(f"pattern '{pattern.name}' has `normalize none` (linear attention): "
                          "decode it with its recurrent form, Kernel.step")
    pattern = _flat(pattern)
    if pattern.layout is not None:
        raise DecodeError(f"pattern '{pattern.name}' has layout {pattern.layout}: decode "
                          "serves 1-D token sequences")
    if any(isinstance(n, Route) for n in walk(pattern.mask)):
        raise DecodeError(f"pattern '{pattern.name}' uses route(...), whose selection pools "
                          "the queries of the whole sequence: it has no decode form")
    base = square_mask(substitute(pattern.mask, {"HEADS": heads}))
    tops = conjuncts(base)
    documents = tuple(dict.fromkeys(d for d in map(document_input, tops) if d is not None))
    blocks = tuple(t for t in tops if isinstance(t, Blocks))
    groups: dict[int, list[int]] = {}
    masks: dict[int, Expr] = {}
    uses_h = any(isinstance(n, Var) and n.name == "h" for n in walk(base))
    for h in range(heads if uses_h else 1):
        m = simplify(substitute(base, {"h": h})) if uses_h else base
        groups.setdefault(id(m), []).append(h)
        masks[id(m)] = m
    if not uses_h:
        groups = {id(base): list(range(heads))}
    classes, head_class = [], [0] * heads
    for key, hs in groups.items():
        try:
            terms = tuple(_intervals(masks[key]))
        except _Unsupported:
            terms = None
        if terms is not None and terms and all(t is _EVERY for t in terms):
            terms = None
        for h in hs:
            head_class[h] = len(classes)
        classes.append(HeadTerms(tuple(hs), terms))
    return DecodeSchedule(heads, tuple(classes), tuple(head_class), documents, blocks)


# ---- run time -------------------------------------------------------------------------------

def row_positions(seqlens: torch.Tensor, lq: int) -> torch.Tensor:
    """Absolute positions of the new rows: int64 [B, Lq], row r of sequence b at L_b − Lq + r."""
    ar = torch.arange(lq, device=seqlens.device, dtype=torch.int64)
    return seqlens.to(torch.int64)[:, None] - lq + ar


def _eval_bound(e: Expr, rows: torch.Tensor, L: torch.Tensor, heads: int) -> torch.Tensor:
    if isinstance(e, Const):
        return torch.full_like(rows, int(e.value))
    return eval_expr(e, {"q": rows, "Q_LEN": L, "HEADS": heads}).expand(rows.shape).to(torch.int64)


def _class_ranges(c: HeadTerms, rows, L, heads) -> torch.Tensor:
    """Half-open key ranges of one head class: int64 [B, T, 2] (empty: lo == hi)."""
    B = rows.shape[0]
    terms = c.terms if c.terms is not None else (_EVERY,)
    out = []
    for lo_e, hi_e in terms:
        lo = torch.maximum(_eval_bound(lo_e, rows, L, heads), torch.zeros_like(rows))
        hi = torch.minimum(_eval_bound(hi_e, rows, L, heads), L - 1)
        ok = hi >= lo
        big = torch.iinfo(torch.int64).max
        r_lo = torch.where(ok, lo, big).amin(1)
        r_hi = torch.where(ok, hi + 1, -1).amax(1)
        empty = r_hi <= r_lo
        out.append(torch.stack([torch.where(empty, 0, r_lo), torch.where(empty, 0, r_hi)], -1))
    return torch.stack(out, 1) if out else torch.zeros(B, 0, 2, dtype=torch.int64,
                                                        device=rows.device)


def _intersect(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """All pairwise intersections of range sets a [..., Ta, 2] and b [..., Tb, 2] →
    [..., Ta·Tb, 2] (empty ones as lo == hi)."""
    lo = torch.maximum(a[..., :, None, 0], b[..., None, :, 0])
    hi = torch.minimum(a[..., :, None, 1], b[..., None, :, 1])
    empty = hi <= lo
    lo, hi = torch.where(empty, 0, lo), torch.where(empty, 0, hi)
    return torch.stack([lo, hi], -1).flatten(-3, -2)


def merge_ranges(r: torch.Tensor) -> torch.Tensor:
    """Sort and merge half-open ranges [..., T, 2] so that no key is in two of them; the
    merged ranges come first in key order, then empty ones (lo == hi == 0)."""
    big = torch.iinfo(torch.int64).max
    lo, hi = r[..., 0], r[..., 1]
    empty = hi <= lo
    lo = torch.where(empty, big, lo)
    order = torch.argsort(lo, dim=-1, stable=True)
    lo, hi, empty = lo.gather(-1, order), hi.gather(-1, order), empty.gather(-1, order)
    hi = torch.where(empty, -1, hi)
    cm = torch.cummax(hi, dim=-1).values
    prev = torch.cat([torch.full_like(cm[..., :1], -1), cm[..., :-1]], -1)
    start = (~empty) & (lo > prev)
    grp = torch.cumsum(start.to(torch.int64), -1) - 1
    grp_c = grp.clamp(min=0)
    ghi = torch.full_like(hi, -1).scatter_reduce(-1, grp_c, torch.where(empty, -1, hi), "amax")
    glo = torch.full_like(lo, big).scatter_reduce(-1, grp_c, lo, "amin")
    n = start.sum(-1, keepdim=True)
    idx = torch.arange(lo.shape[-1], device=lo.device)
    real = idx < n
    out_lo = torch.where(real, glo, 0)
    out_hi = torch.where(real, ghi, 0)
    return torch.stack([out_lo, out_hi], -1)


def _document_range(doc: torch.Tensor, rows: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """[B, 1, 2]: first and one-past-last cached key whose id equals one of the rows' ids."""
    Lmax = doc.shape[1]
    ids = doc.to(torch.int64)
    row_ids = ids.gather(1, rows.clamp(0, Lmax - 1))                     # [B, Lq]
    pos = torch.arange(Lmax, device=doc.device)
    hit = (ids[:, None, :] == row_ids[:, :, None]).any(1) & (pos[None] < L)   # [B, Lmax]
    big = torch.iinfo(torch.int64).max
    lo = torch.where(hit, pos, big).amin(1)
    hi = torch.where(hit, pos + 1, -1).amax(1)
    empty = hi <= lo
    return torch.stack([torch.where(empty, 0, lo), torch.where(empty, 0, hi)], -1)[:, None]


def block_selection(node: Blocks, gate: torch.Tensor, seqlens: torch.Tensor, lq: int,
                    heads: int) -> torch.Tensor:
    """Kept key blocks of `blocks(gate, …)` for the query blocks of the new rows.

    gate [B, H, q_blocks, k_blocks] over cache positions (blocks of β tokens); sequence b's
    square problem has nb = ⌈L_b/β⌉ blocks on each side (its gate is gate[b, :, :nb, :nb]).
    Returns bool [B, H, NQB, k_blocks]: row j is query block (L_b − Lq)//β + j, with
    NQB = (Lq − 1)//β + 2 (the blocks the new rows can touch); keys of blocks ≥ nb are dropped.
    """
    beta = node.block
    B, H, nqb_all, nkb = gate.shape
    nqb = (lq - 1) // beta + 2
    L = seqlens.to(torch.int64)
    nb = (L + beta - 1) // beta                                           # [B]
    qb = ((L - lq) // beta)[:, None] + torch.arange(nqb, device=gate.device)   # [B, NQB]
    g = gate.gather(2, qb.clamp(0, nqb_all - 1)[:, None, :, None].expand(B, H, nqb, nkb))
    col_ok = torch.arange(nkb, device=gate.device)[None, :] < nb[:, None]          # [B, nkb]
    row_ok = qb <= ((L - 1) // beta)[:, None]                             # [B, NQB]
    if node.threshold is not None:
        return (g > node.threshold) & col_ok[:, None, None, :] & row_ok[:, None, :, None]
    g = torch.where(col_ok[:, None, None, :], g.to(torch.float64),
                    torch.tensor(float("-inf"), dtype=torch.float64, device=gate.device))
    out = torch.zeros(g.shape, dtype=torch.bool, device=gate.device)
    for n in torch.unique(nb).tolist():   # n_keep depends on the sequence's block count
        sel = nb == n
        if n > 0:
            picked = select_blocks(g[sel][..., :n], top=node.top)
            out[sel] = torch.nn.functional.pad(picked, (0, nkb - n))
    out &= row_ok[:, None, :, None]
    return out


def key_ranges(sched: DecodeSchedule, seqlens: torch.Tensor, lq: int, kv_heads: int, *,
               inputs: Optional[dict] = None,
               selections: Optional[dict] = None) -> torch.Tensor:
    """Half-open key ranges each (sequence, key/value head) must read for the new rows.

    seqlens int [B] (L per sequence, new rows included); lq new rows per sequence; query
    heads h = g·G + j (G = heads / kv_heads) share key head g, whose ranges are the merged
    union of its query heads'. `inputs` holds document id tensors [B, Lmax]; `selections`
    maps each `blocks` node of `sched.blocks` to `block_selection(...)`.

    Returns int64 [B, kv_heads, R, 2] sorted, disjoint, empty ranges (lo == hi == 0) last.
    """
    L = seqlens.to(torch.int64)
    rows = row_positions(L, lq)
    Lc = L[:, None]
    per_class = [_class_ranges(c, rows, Lc, sched.heads) for c in sched.classes]
    T = max(p.shape[1] for p in per_class)
    per_class = [torch.cat([p, p.new_zeros(p.shape[0], T - p.shape[1], 2)], 1) for p in per_class]
    stacked = torch.stack(per_class, 1)                                   # [B, C, T, 2]
    hc = torch.tensor(sched.head_class, device=L.device)
    ranges = stacked[:, hc]                                               # [B, H, T, 2]
    for name in sched.documents:
        ranges = _intersect(ranges, _document_range(inputs[name], rows, Lc)[:, None])
    for node in sched.blocks:
        sel = selections[node].any(2)                                     # [B, H, nkb]
        beta = node.block
        # kept blocks first, in key order; bound the count by the largest selection
        order = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True)
        n = int(sel.sum(-1).max()) if sel.numel() else 0
        kb = order[..., :max(n, 1)]
        kept = sel.gather(-1, kb)
        lo = torch.where(kept, kb * beta, 0)
        hi = torch.where(kept, torch.minimum((kb + 1) * beta, Lc[:, :, None].expand_as(kb)), 0)
        ranges = _intersect(ranges, torch.stack([lo, hi], -1))
    B, H = ranges.shape[:2]
    G = sched.heads // kv_heads
    grouped = ranges.reshape(B, kv_heads, G * ranges.shape[2], 2)
    merged = merge_ranges(grouped)
    n = int((merged[..., 1] > merged[..., 0]).sum(-1).max()) if merged.numel() else 0
    return merged[:, :, :max(n, 1)].contiguous()


def tile_counts(ranges: torch.Tensor, block_n: int) -> torch.Tensor:
    """Key tiles of `block_n` tokens (aligned to multiples of block_n) each range touches:
    int64 [..., R]. Their sum is the work of one (sequence, key head)."""
    lo, hi = ranges[..., 0], ranges[..., 1]
    n = (hi + block_n - 1) // block_n - lo // block_n
    return torch.where(hi > lo, n, 0)
