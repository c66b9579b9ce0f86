"""Dense mask evaluator: random IR vs an independent scalar interpreter, selectors vs loops,
inputs, coordinate lowering, and error messages."""
import itertools
import math
import operator
from fractions import Fraction
from unittest import mock

import pytest
import torch
from hypothesis import given, strategies as st

from attncc.ir import dense
from attncc.ir.coords import LayoutError, lower_coords
from attncc.ir.dense import (MaskEvalError, dense_mask, eval_expr, region_index,
                             route_selection, select_blocks)
from attncc.ir.inputs import InputError
from attncc.ir.nodes import (FALSE, TRUE, Binary, Blocks, Const, Coord, FCall, Load, Route,
                             Select, Unary, Var, walk)
from attncc.ir.pattern import Axis, InputDecl, Layout, Pattern

GRID = Layout((Axis("y", 3), Axis("x", 4)))
TAB = torch.tensor([3, -1, 4, 1, -5])

# ---- an independent scalar interpreter (Python ints, UNDEF for undefined values) ----------

UNDEF = object()
PY_OPS = {"add": operator.add, "sub": operator.sub, "mul": operator.mul,
          "floordiv": operator.floordiv, "mod": operator.mod, "min": min, "max": max,
          "lt": operator.lt, "le": operator.le, "gt": operator.gt, "ge": operator.ge,
          "eq": operator.eq, "ne": operator.ne}


def interp(node, env, inputs):
    """Value of `node` at one point; `env` holds Python ints for b h q k and lengths."""
    if isinstance(node, Const):
        return node.value
    if isinstance(node, Var):
        return env[node.name]
    if isinstance(node, Coord):
        size = [a.size for a in GRID.axes]
        idx = env[node.side]
        stride = math.prod(size[node.axis + 1:])
        return (idx // stride) % size[node.axis]
    if isinstance(node, Select):
        c = interp(node.cond, env, inputs)
        if c is UNDEF:
            return UNDEF
        return interp(node.a if c else node.b, env, inputs)
    if isinstance(node, Binary) and node.op in ("and", "or"):
        a, b = interp(node.a, env, inputs), interp(node.b, env, inputs)
        decisive = node.op == "or"  # True decides `or`, False decides `and`
        if (a is not UNDEF and a == decisive) or (b is not UNDEF and b == decisive):
            return decisive
        if a is UNDEF or b is UNDEF:
            return UNDEF
        return a and b if node.op == "and" else a or b
    kids = [interp(c, env, inputs) for c in node.children()]
    if any(v is UNDEF for v in kids):
        return UNDEF
    if isinstance(node, Unary):
        x = kids[0]
        return {"neg": lambda: -x, "abs": lambda: abs(x), "not": lambda: not x,
                "float": lambda: float(x)}[node.op]()
    if isinstance(node, Load):
        t = inputs[node.input]
        for i, size in zip(kids, t.shape):
            if not 0 <= i < size:
                return UNDEF
        return int(t[tuple(kids)])
    a, b = kids
    if node.op in ("floordiv", "mod") and b == 0:
        return UNDEF
    return PY_OPS[node.op](a, b)


def interp_mask(expr, B, H, Lq, Lkv, inputs=None):
    out = {}
    for b, h, i, j in itertools.product(range(B), range(H), range(Lq), range(Lkv)):
        env = dict(b=b, h=h, q=i, k=j, Q_LEN=Lq, KV_LEN=Lkv, HEADS=H)
        out[b, h, i, j] = interp(expr, env, inputs or {})
    return out


# ---- random IR ---------------------------------------------------------------------------

INT_OPS = ["add", "sub", "mul", "floordiv", "mod", "min", "max"]
CMP_OPS = ["lt", "le", "gt", "ge", "eq", "ne"]


@st.composite
def int_expr(draw, grid: bool, depth: int):
    """Random int IR; interior nodes are drawn 4 times out of 5 while depth remains."""
    if depth == 0 or draw(st.integers(0, 4)) == 0:
        kind = draw(st.integers(0, 9))
        if kind < 3:
            return Const(draw(st.integers(-5, 5)))
        if grid and kind < 6:
            side, axis = draw(st.sampled_from("qk")), draw(st.integers(0, 1))
            return Coord(side, axis, "yx"[axis])
        return Var(draw(st.sampled_from(["q", "k", "q", "k", "b", "h", "Q_LEN", "KV_LEN", "HEADS"])))
    sub = lambda: draw(int_expr(grid, depth - 1))  # noqa: E731
    kind = draw(st.integers(0, 9))
    if kind < 6:
        return Binary(draw(st.sampled_from(INT_OPS)), sub(), sub())
    if kind == 6:
        return Unary(draw(st.sampled_from(["neg", "abs"])), sub())
    if kind == 7:
        return Select(draw(bool_expr(grid, depth - 1)), sub(), sub())
    if kind == 8:
        return Load("tab", (Binary("mod", sub(), Const(5)),), "int")
    return Load("tab", (sub(),), "int")  # may be out of range


@st.composite
def bool_expr(draw, grid: bool, depth: int):
    """Random bool IR over comparisons of random int IR."""
    if depth == 0 or draw(st.integers(0, 4)) == 0:
        if draw(st.integers(0, 9)) == 0:
            return draw(st.sampled_from([TRUE, FALSE]))
        d = max(depth - 1, 1)
        return Binary(draw(st.sampled_from(CMP_OPS)), draw(int_expr(grid, d)),
                      draw(int_expr(grid, d)))
    sub = lambda: draw(bool_expr(grid, depth - 1))  # noqa: E731
    kind = draw(st.integers(0, 5))
    if kind < 3:
        return Binary(draw(st.sampled_from(["and", "or", "eq", "ne"])), sub(), sub())
    if kind == 3:
        return Unary("not", sub())
    if kind == 4:
        return Select(sub(), sub(), sub())
    return Binary(draw(st.sampled_from(CMP_OPS)), draw(int_expr(grid, depth)),
                  draw(int_expr(grid, depth)))


def check_against_interpreter(expr, layout, B, H, Lq, Lkv):
    p = Pattern("rand", (), layout, (InputDecl("tab", "int", (5,)),), expr)
    expected = interp_mask(expr, B, H, Lq, Lkv, {"tab": TAB})
    undefined = [pt for pt, v in expected.items() if v is UNDEF]
    for chunk in (dense._CHUNK_ELEMS, Lkv):  # one chunk, and one query row per chunk
        with mock.patch.object(dense, "_CHUNK_ELEMS", chunk):
            if undefined:
                with pytest.raises(MaskEvalError) as err:
                    dense_mask(p, None if layout else Lq, None if layout else Lkv, H, B,
                               inputs={"tab": TAB})
                text = str(err.value)
                assert text.startswith(("division by zero", "index ")), text
                where = dict(kv.split("=") for kv in text.split(" at ")[-1].split(", ")) \
                    if " at " in text else {}
                assert any(all(str(pt["bhqk".index(a)]) == v for a, v in where.items())
                           for pt in undefined), (text, undefined[:3])
                continue
            got = dense_mask(p, None if layout else Lq, None if layout else Lkv, H, B,
                             inputs={"tab": TAB})
            assert got.shape == (B, H, Lq, Lkv) and got.dtype == torch.bool
            want = torch.tensor([bool(expected[pt]) for pt in sorted(expected)]).view(B, H, Lq, Lkv)
            assert torch.equal(got, want), str(expr)
    if not undefined:
        lowered = Pattern("low", (), None, p.inputs, lower_coords(expr, layout or GRID))
        assert not any(isinstance(n, Coord) for n in walk(lowered.mask))
        assert torch.equal(dense_mask(lowered, Lq, Lkv, H, B, inputs={"tab": TAB}),
                           dense_mask(p, None if layout else Lq, None if layout else Lkv, H, B,
                                      inputs={"tab": TAB}))


@given(bool_expr(True, 3), st.integers(1, 2), st.integers(1, 2))
def test_random_grid_masks_match_interpreter(expr, B, H):
    check_against_interpreter(expr, GRID, B, H, GRID.numel, GRID.numel)


@given(bool_expr(False, 3), st.integers(1, 2), st.integers(1, 3), st.integers(0, 6),
       st.integers(1, 6))
def test_random_flat_masks_match_interpreter(expr, B, H, Lq, Lkv):
    check_against_interpreter(expr, None, B, H, Lq, Lkv)


def test_floor_semantics_on_negative_operands():
    q, k = Var("q"), Var("k")
    d = Binary("sub", q, k)  # q - k in [-3, 3]
    for op, fn in (("floordiv", lambda a, b: a // b), ("mod", lambda a, b: a % b)):
        for c in (4, -4):
            expr = Binary("eq", Binary(op, d, Const(c)), Const(0))
            got = dense_mask(Pattern("f", (), None, (), expr), 4, 4)[0, 0]
            want = torch.tensor([[fn(i - j, c) == 0 for j in range(4)] for i in range(4)])
            assert torch.equal(got, want)
    # -3 // 4 == -1 and -3 % 4 == 1 (not truncation)
    v = eval_expr(Binary("floordiv", Const(-3), Const(4)), {})
    w = eval_expr(Binary("mod", Const(-3), Const(4)), {})
    assert (int(v), int(w)) == (-1, 1)


def test_float_functions_and_shapes():
    s = torch.tensor([[[[0.5, -2.0]]]], dtype=torch.float64)
    expr = Binary("mul", Const(3.0), FCall("tanh", (Binary("div", Var("s"), Const(3.0)),)))
    got = eval_expr(expr, {"s": s})
    assert got.dtype == torch.float64 and got.shape == s.shape
    assert torch.allclose(got, 3.0 * torch.tanh(s / 3.0), rtol=0, atol=1e-15)
    h = torch.arange(3).view(1, -1, 1, 1)
    got = eval_expr(Binary("add", Unary("float", Var("h")), FCall("sqrt", (Const(4.0),))), {"h": h})
    assert got.tolist() == [[[[2.0]], [[3.0]], [[4.0]]]]


def test_load_two_d_input_matches_loop():
    doc = torch.tensor([[0, 0, 1, 1, 1, 2], [0, 1, 1, 1, 2, 2]])
    b, q, k = Var("b"), Var("q"), Var("k")
    expr = Binary("and", Binary("le", k, q),
                  Binary("eq", Load("doc", (b, q), "int"), Load("doc", (b, k), "int")))
    p = Pattern("document", (), None, (InputDecl("doc", "int", ("b", "k")),), expr)
    got = p.dense_mask(6, 6, heads=2, batch=2, inputs={"doc": doc})
    for bb, hh, i, j in itertools.product(range(2), range(2), range(6), range(6)):
        assert bool(got[bb, hh, i, j]) == (j <= i and int(doc[bb, i]) == int(doc[bb, j]))


def test_float_and_bool_inputs():
    gate = torch.tensor([True, False, True, True])
    w = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float32)
    expr = Binary("and", Load("gate", (Var("k"),), "bool"),
                  Binary("gt", Load("w", (Var("q"),), "float"), Const(0.0)))
    decls = (InputDecl("gate", "bool", ("k",)), InputDecl("w", "float", ("q",)))
    got = dense_mask(Pattern("g", (), None, decls, expr), 4, 4, inputs={"gate": gate, "w": w})
    want = (w > 0)[:, None] & gate[None, :]
    assert torch.equal(got[0, 0], want)


# ---- selectors vs loops ------------------------------------------------------------------

def loop_select_blocks(scores, top=None, threshold=None):
    B, H, nq, nk = scores.shape
    out = torch.zeros(B, H, nq, nk, dtype=torch.bool)
    for b, h, i in itertools.product(range(B), range(H), range(nq)):
        row = [float(scores[b, h, i, j]) for j in range(nk)]
        if threshold is not None:
            keep = [j for j in range(nk) if row[j] > threshold]
        else:
            n = min(nk, max(1, math.ceil(Fraction(top) * nk)))
            keep = sorted(range(nk), key=lambda j: (-row[j], j))[:n]
        for j in keep:
            out[b, h, i, j] = True
    return out


@given(st.integers(1, 2), st.integers(1, 2), st.integers(1, 4), st.integers(1, 7),
       st.sampled_from([0.1, 0.25, 0.5, 0.7, 1.0, 3.0]), st.integers(0, 2**31))
def test_select_blocks_top_with_ties(B, H, nq, nk, top, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 3, (B, H, nq, nk), generator=g).float()  # many ties
    assert torch.equal(select_blocks(scores, top=top), loop_select_blocks(scores, top=top))
    assert torch.equal(select_blocks(scores, threshold=1.0),
                       loop_select_blocks(scores, threshold=1.0))


def test_blocks_keep_count_is_exact():
    assert dense.blocks_keep(0.7, 10) == 7  # not ceil(7.000000000000001) == 8
    assert dense.blocks_keep(0.1, 10) == 1  # the binary float 0.1 is a hair above 1/10
    assert dense.blocks_keep(0.4, 5) == 2 and dense.blocks_keep(0.3, 10) == 3
    assert dense.blocks_keep(0.01, 10) == 1 and dense.blocks_keep(2.0, 10) == 10


def test_blocks_mask_expands_to_tokens():
    B, H, Lq, Lkv, beta = 1, 2, 7, 9, 3
    g = torch.Generator().manual_seed(0)
    gate = torch.randint(0, 4, (B, H, 3, 3), generator=g).float()
    expr = Binary("and", Binary("le", Var("k"), Var("q")), Blocks("gate", beta, top=0.5))
    p = Pattern("seer", (), None, (InputDecl("gate", "float", ("b", "h", "q_blocks", "k_blocks")),),
                expr)
    got = p.dense_mask(Lq, Lkv, heads=H, batch=B, inputs={"gate": gate})
    sel = loop_select_blocks(gate, top=0.5)
    for b, h, i, j in itertools.product(range(B), range(H), range(Lq), range(Lkv)):
        assert bool(got[b, h, i, j]) == (j <= i and bool(sel[b, h, i // beta, j // beta]))


def loop_route(q, k, region, topk, q_shape, k_shape):
    """Exact (Fraction) BiFormer routing by loops over tokens."""
    def regions(shape):
        grid = [-(-s // r) for s, r in zip(shape, region)]
        ids = []
        for t in range(math.prod(shape)):
            c, rem = [], t
            for ax in reversed(range(len(shape))):
                c.append(rem % shape[ax])
                rem //= shape[ax]
            c.reverse()
            rid = 0
            for ax in range(len(shape)):
                rid = rid * grid[ax] + c[ax] // region[ax]
            ids.append(rid)
        return ids, math.prod(grid)

    def means(x, ids, n):
        D = x.shape[-1]
        tot = [[Fraction(0)] * D for _ in range(n)]
        cnt = [0] * n
        for t, r in enumerate(ids):
            cnt[r] += 1
            for d in range(D):
                tot[r][d] += Fraction(float(x[t, d]))
        return [[v / cnt[r] for v in tot[r]] for r in range(n)]

    B, Hq = q.shape[:2]
    ratio = Hq // k.shape[1]
    qids, nq = regions(q_shape)
    kids, nk = regions(k_shape)
    sel = torch.zeros(B, Hq, nq, nk, dtype=torch.bool)
    for b, h in itertools.product(range(B), range(Hq)):
        qm, km = means(q[b, h], qids, nq), means(k[b, h // ratio], kids, nk)
        for i in range(nq):
            aff = [sum(x * y for x, y in zip(qm[i], km[j])) for j in range(nk)]
            for j in sorted(range(nk), key=lambda j: (-aff[j], j))[:topk]:
                sel[b, h, i, j] = True
    return sel, qids, kids


@given(st.integers(1, 2), st.sampled_from([(1, 1), (2, 1), (4, 2)]), st.integers(1, 7),
       st.integers(0, 2**31))
def test_route_grid_matches_loop_with_ties(B, heads, topk, seed):
    Hq, Hkv = heads
    shape, region = (4, 6), (2, 4)  # border regions 2x2; every count is a power of two
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-1, 2, (B, Hq, 24, 2), generator=g).double()
    k = torch.randint(-1, 2, (B, Hkv, 24, 2), generator=g).double()
    want, qids, kids = loop_route(q, k, region, topk, shape, shape)
    assert torch.equal(route_selection(q, k, region, topk, shape), want)
    p = Pattern("biformer", (), Layout((Axis("y", 4), Axis("x", 6))), (), Route(region, topk))
    got = p.dense_mask(heads=Hq, batch=B, inputs={"query": q, "key": k})
    for b, h, i, j in itertools.product(range(B), range(Hq), range(24), range(24)):
        assert bool(got[b, h, i, j]) == bool(want[b, h, qids[i], kids[j]])


def test_route_one_d_different_lengths():
    g = torch.Generator().manual_seed(3)
    q = torch.randint(-2, 3, (1, 2, 8, 3), generator=g).double()
    k = torch.randint(-2, 3, (1, 2, 10, 3), generator=g).double()
    want, qids, kids = loop_route(q, k, (4,), 2, (8,), (10,))
    p = Pattern("r1", (), None, (), Route((4,), 2))
    got = p.dense_mask(8, 10, heads=2, inputs={"query": q, "key": k})
    for h, i, j in itertools.product(range(2), range(8), range(10)):
        assert bool(got[0, h, i, j]) == bool(want[0, h, qids[i], kids[j]])
    assert region_index((8,), (4,)).tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert region_index((3, 5), (2, 2)).view(3, 5).tolist() == \
        [[0, 0, 1, 1, 2], [0, 0, 1, 1, 2], [3, 3, 4, 4, 5]]


# ---- lengths, coordinates and error messages ----------------------------------------------

def test_grid_lengths_default_and_mismatch():
    p = Pattern("g", (), GRID, (), Binary("eq", Coord("q", 0, "y"), Coord("k", 0, "y")))
    m = p.dense_mask()
    assert m.shape == (1, 1, 12, 12) and int(m.sum()) == 3 * 16
    with pytest.raises(ValueError) as e:
        p.dense_mask(q_len=10)
    assert str(e.value) == ("q_len=10 does not match the layout grid(y = 3, x = 4) of "
                            "pattern 'g' (12 tokens)")
    flat = Pattern("c", (), None, (), Binary("le", Var("k"), Var("q")))
    with pytest.raises(ValueError) as e:
        flat.dense_mask(q_len=4)
    assert str(e.value) == "pattern 'c' has no layout: pass q_len and kv_len"
    with pytest.raises(ValueError) as e:
        flat.dense_mask(4, 4, heads=0)
    assert str(e.value) == "heads must be a positive int, got 0"


def test_error_messages_name_expression_and_position():
    q, k = Var("q"), Var("k")
    p = Pattern("z", (), None, (), Binary("eq", Binary("floordiv", q, Binary("sub", k, Const(2))),
                                          Const(0)))
    with pytest.raises(MaskEvalError) as e:
        p.dense_mask(3, 4)
    assert str(e.value) == "division by zero in `q // (k - 2)` at k=2"
    tab = InputDecl("tab", "int", (5,))
    p = Pattern("t", (), None, (tab,), Binary("eq", Load("tab", (Binary("add", q, Const(3)),), "int"),
                                              Const(1)))
    with pytest.raises(MaskEvalError) as e:
        p.dense_mask(4, 2, inputs={"tab": TAB})
    assert str(e.value) == ("index 5 out of range [0, 5) in dimension 0 of input 'tab' in "
                            "`tab[q + 3]` at q=2")
    # a guarded read is fine: q < 2 decides the `&`
    guarded = Pattern("t", (), None, (tab,), Binary("and", Binary("lt", q, Const(2)), p.mask))
    assert guarded.dense_mask(4, 2, inputs={"tab": TAB})[0, 0, :, 0].tolist() == \
        [True, False, False, False]  # tab[3] == 1, tab[4] == -5


def test_missing_route_inputs_and_coordinate_without_layout():
    p = Pattern("r", (), None, (), Route((2,), 1))
    with pytest.raises(ValueError) as e:
        p.dense_mask(4, 4)
    assert str(e.value) == "pattern 'r' uses route(...): pass inputs['query'] [batch, heads, q_len, D]"
    with pytest.raises(InputError):
        Pattern("c", (), None, (), TRUE).dense_mask(2, 2, inputs={"query": torch.zeros(1)})
    p = Pattern("c", (), None, (), Binary("eq", Coord("q", 0, "y"), Const(0)))
    with pytest.raises(MaskEvalError) as e:
        p.dense_mask(2, 2)
    assert str(e.value) == "coordinate q.y used, but the pattern has no layout"
    with pytest.raises(LayoutError):
        lower_coords(p.mask, None)


def test_lower_coords_text():
    from attncc.ir.printer import format_expr
    e = Binary("eq", Coord("q", 0, "y"), Coord("k", 1, "x"))
    assert format_expr(lower_coords(e, GRID)) == "((q // 4) % 3) == (k % 4)"


# ---- spec text -----------------------------------------------------------------------------

def natten_axis_loop(i, j, L, K, d, s, causal):
    """DESIGN §4 NATTEN condition on one axis, written directly from the formula."""
    g, ip = i % d, i // d
    Lg = L // d + (1 if g < L % d else 0)
    if j % d != g:
        return False
    jp = j // d
    if causal:
        lead = min(ip // s * s + s - 1, Lg - 1)
        return max(lead - K + 1, 0) <= jp <= ip
    lead = min(ip // s * s + s // 2, Lg - 1)
    start = min(max(lead - K // 2, 0), Lg - K)
    return start <= jp < start + K


@pytest.mark.parametrize("H, W, kernel, dilation, stride", [
    (7, 9, 3, 1, 1), (8, 8, 4, 2, 1), (9, 7, 3, 2, 2), (6, 10, 5, 1, 5), (7, 8, 2, 3, 1)])
def test_natten2d_spec_matches_formula(H, W, kernel, dilation, stride):
    import attncc
    p = attncc.load("specs/natten2d.attn", height=H, width=W, kernel=kernel,
                    dilation=dilation, stride=stride)
    got = p.dense_mask()[0, 0]
    for i, j in itertools.product(range(H * W), repeat=2):
        want = all(natten_axis_loop(a, c, L, kernel, dilation, stride, False)
                   for a, c, L in ((i // W, j // W, H), (i % W, j % W, W)))
        assert bool(got[i, j]) == want, (i, j)


def test_document_and_seer_gate_specs():
    import attncc
    p = attncc.parse("pattern document\ninput doc: int[b, k]\nmask causal & doc[b, q] == doc[b, k]\n")
    doc = torch.tensor([[0, 0, 0, 1, 1, 2, 2]])
    got = p.dense_mask(7, 7, inputs={"doc": doc})[0, 0]
    want = torch.tensor([[j <= i and doc[0, i] == doc[0, j] for j in range(7)] for i in range(7)])
    assert torch.equal(got, want)
    p = attncc.load("specs/seer_gate.attn", block=2, keep=0.5)
    gate = torch.tensor([[[[0.0, 1.0, 1.0], [3.0, 2.0, 2.0], [1.0, 1.0, 1.0]]]])
    got = p.dense_mask(6, 6, inputs={"gate": gate})[0, 0]
    sel = loop_select_blocks(gate, top=0.5)[0, 0]  # keeps 2 of 3 key blocks per query block
    want = torch.tensor([[j <= i and bool(sel[i // 2, j // 2]) for j in range(6)] for i in range(6)])
    assert torch.equal(got, want)
    with pytest.raises(InputError) as e:
        p.dense_mask(6, 6, inputs={"gate": gate[..., :2]})
    assert str(e.value) == ("input 'gate' has shape [1, 1, 3, 2], expected "
                            "float[b, h, q_blocks, k_blocks] = [1, 1, 3, 3]")
