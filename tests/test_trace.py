"""Decorator frontend: a traced Python function builds the identical IR node (`is`) as the
equivalent spec text; Python control flow on symbolic values is a located SpecError."""
import inspect
import operator

import pytest
import torch
from hypothesis import given, strategies as st

import attncc
from attncc import decorator as trace

VARS = ["b", "h", "q", "k"]
ARITH = {"add": ("+", operator.add), "sub": ("-", operator.sub), "mul": ("*", operator.mul),
         "floordiv": ("//", operator.floordiv), "mod": ("%", operator.mod)}
CMP = {"lt": ("<", operator.lt), "le": ("<=", operator.le), "gt": (">", operator.gt),
       "ge": (">=", operator.ge), "eq": ("==", operator.eq), "ne": ("!=", operator.ne)}

# Trees: every int expression contains a variable, so a comparison's left side is always
# symbolic (Python would otherwise reflect `3 < x` into `x > 3`).
consts = st.integers(-6, 6)
divisors = st.integers(1, 5)


def int_exprs(bools):
    leaves = st.sampled_from(VARS).map(lambda v: ("var", v))

    def extend(inner):
        arith = st.tuples(st.just("arith"), st.sampled_from(sorted(ARITH)), inner,
                          st.one_of(inner, consts), st.booleans())
        minmax = st.tuples(st.just("minmax"), st.sampled_from(["min", "max"]), inner,
                           st.one_of(inner, consts))
        un = st.tuples(st.sampled_from(["neg", "abs"]), inner)
        sel = st.tuples(st.just("sel"), bools, inner, st.one_of(inner, consts))
        return st.one_of(arith, minmax, un, sel)
    return st.recursive(leaves, extend, max_leaves=6)


def bool_exprs():
    base_int = int_exprs(st.just(("true",)))
    cmp = st.tuples(st.just("cmp"), st.sampled_from(sorted(CMP)), base_int,
                    st.one_of(base_int, consts))

    def extend(inner):
        return st.one_of(st.tuples(st.sampled_from(["and", "or", "beq"]), inner, inner),
                         st.tuples(st.just("not"), inner))
    return st.recursive(cmp, extend, max_leaves=5)


def text(t):
    if isinstance(t, int):
        return str(t)
    tag = t[0]
    if tag == "var":
        return t[1]
    if tag == "true":
        return "true"
    if tag == "arith":
        _, op, a, b, swap = t
        a, b = (b, a) if swap and op not in ("floordiv", "mod") else (a, b)
        if op in ("floordiv", "mod") and isinstance(b, int):
            b = abs(b) or 1
        return f"({text(a)} {ARITH[op][0]} {text(b)})"
    if tag == "minmax":
        return f"{t[1]}({text(t[2])}, {text(t[3])})"
    if tag == "neg":
        return f"(-{text(t[1])})"
    if tag == "abs":
        return f"abs({text(t[1])})"
    if tag == "sel":
        return f"({text(t[1])} ? {text(t[2])} : {text(t[3])})"
    if tag == "cmp":
        return f"({text(t[2])} {CMP[t[1]][0]} {text(t[3])})"
    if tag in ("and", "or", "beq"):
        sym = {"and": "&", "or": "|", "beq": "=="}[tag]
        return f"({text(t[1])} {sym} {text(t[2])})"
    if tag == "not":
        return f"(!{text(t[1])})"
    raise AssertionError(t)


def python(t, env):
    """Evaluate the tree with Python operators on traced symbols."""
    if isinstance(t, int):
        return t
    tag = t[0]
    if tag == "var":
        return env[t[1]]
    if tag == "true":
        return True
    if tag == "arith":
        _, op, a, b, swap = t
        a, b = (b, a) if swap and op not in ("floordiv", "mod") else (a, b)
        if op in ("floordiv", "mod") and isinstance(b, int):
            b = abs(b) or 1
        return ARITH[op][1](python(a, env), python(b, env))
    if tag == "minmax":
        fn = attncc.min if t[1] == "min" else attncc.max
        return fn(python(t[2], env), python(t[3], env))
    if tag == "neg":
        return -python(t[1], env)
    if tag == "abs":
        return abs(python(t[1], env))
    if tag == "sel":
        return attncc.where(python(t[1], env), python(t[2], env), python(t[3], env))
    if tag == "cmp":
        return CMP[t[1]][1](python(t[2], env), python(t[3], env))
    if tag == "and":
        return python(t[1], env) & python(t[2], env)
    if tag == "or":
        return python(t[1], env) | python(t[2], env)
    if tag == "beq":
        return python(t[1], env) == python(t[2], env)
    if tag == "not":
        return ~python(t[1], env)
    raise AssertionError(t)


@given(bool_exprs())
def test_traced_expression_is_the_spec_node(tree):
    spec = attncc.parse(f"pattern t\nmask {text(tree)}\n")

    def fn(b, h, q, k):
        return python(tree, {"b": b, "h": h, "q": q, "k": k})
    traced = attncc.pattern(fn, name="t")
    assert traced.mask is spec.mask
    assert traced == spec


def test_decorator_on_grid_equals_spec():
    @attncc.pattern(layout=attncc.grid(y=8, x=8))
    def local(q, k):
        return (abs(q.y - k.y) <= 3) & (abs(q.x - k.x) <= 3)
    spec = attncc.parse("pattern local\nlayout grid(y = 8, x = 8)\n"
                        "mask abs(q.y - k.y) <= 3 & abs(q.x - k.x) <= 3\n")
    assert local.mask is spec.mask
    assert local == spec


def test_bare_decorator_and_helpers():
    @attncc.pattern
    def sw(q, k):
        return trace.window(4) | trace.sinks(2)
    assert sw.mask is attncc.parse("pattern sw\nmask window(4) | sinks(2)").mask

    @attncc.pattern(layout=attncc.grid(y=8, x=8))
    def na(q, k):
        return trace.neighborhood((3, 5), dilation=(2, 1), stride=(1, 2))
    spec = attncc.parse("pattern na\nlayout grid(y = 8, x = 8)\n"
                        "mask neighborhood((3, 5), dilation = (2, 1), stride = (1, 2))")
    assert na.mask is spec.mask


def test_inputs_and_heads():
    @attncc.pattern(inputs={"doc": "int[b, k]"})
    def document(b, q, k, doc):
        return trace.causal() & (doc[b, q] == doc[b, k]) & (doc[b, k] >= 0)
    spec = attncc.load("specs/document.attn")
    assert document == spec


def test_control_flow_error_points_at_user_line():
    def f(q, k):
        if q < k:
            return q < k
        return q >= k
    line = inspect.getsourcelines(f)[1] + 1
    with pytest.raises(attncc.SpecError) as e:
        attncc.pattern(f)
    msg = str(e.value)
    assert msg.startswith(f"{__file__}:{line}:")
    assert msg.split("\n")[0].endswith(
        "error: a symbolic condition cannot be used in Python control flow (`if`, `and`, `or`, "
        "`not`); use `&`, `|`, `~` or attncc.where(cond, a, b)")
    assert msg.split("\n")[1] == "          if q < k:"
    assert msg.split("\n")[2] == "             ^~~~~"


@pytest.mark.parametrize("body", [
    lambda q, k: (q < k) and (k < 3),
    lambda q, k: not (q < k),
    lambda q, k: bool(q == k),
    lambda q, k: 0 <= q - k < 4,       # chained comparison uses `and`
])
def test_python_logic_is_rejected(body):
    with pytest.raises(attncc.SpecError, match="cannot be used in Python control flow"):
        attncc.pattern(body)


def test_type_errors_match_spec_wording():
    with pytest.raises(attncc.SpecError, match=r"operands of '&' must be boolean, got int and int"):
        attncc.pattern(lambda q, k: q & k)
    with pytest.raises(attncc.SpecError, match=r"mask must be a boolean expression, got int"):
        attncc.pattern(lambda q, k: q + k)
    with pytest.raises(attncc.SpecError, match=r"unknown axis 'z' \(the layout has axes y, x\)"):
        attncc.pattern(lambda q, k: q.z == k.x, layout=attncc.grid(y=4, x=4))
    with pytest.raises(attncc.SpecError, match=r"parameter 'j' of <lambda> is neither"):
        attncc.pattern(lambda q, j: q == j)


# ---- keyword parameters, prelude primitives, score modifiers -----------------------------------

def test_keyword_parameters_become_pattern_parameters():
    @attncc.pattern
    def sliding(q, k, window=128):
        return attncc.causal() & (q - k < window)
    spec = attncc.parse("pattern sliding(window = 128)\nmask causal & q - k < window\n")
    assert sliding == spec and sliding.params == (("window", 128),)
    assert sliding.ir_hash() == spec.ir_hash()
    narrow = sliding.bind(window=3)
    assert narrow == attncc.parse("pattern sliding(window = 3)\nmask causal & q - k < window\n")
    m = narrow.dense_mask(8, 8)[0, 0]
    q, k = torch.arange(8)[:, None], torch.arange(8)[None, :]
    assert torch.equal(m, (k <= q) & (q - k < 3))
    with pytest.raises(attncc.SpecError, match="unknown parameter 'windw'"):
        sliding.bind(windw=3)


def test_prelude_primitives_on_the_package():
    @attncc.pattern(layout=attncc.grid(y=8, x=8))
    def na(q, k, kernel=3):
        return attncc.neighborhood(kernel)
    assert na == attncc.parse("pattern na(kernel = 3)\nlayout grid(y = 8, x = 8)\n"
                              "mask neighborhood(kernel)\n")

    @attncc.pattern
    def mix(q, k, w=4):
        return attncc.window(w) | attncc.sinks(2) | (attncc.chunked(8) & attncc.prefix(1)) \
            | attncc.dilated(6, 3)
    assert mix == attncc.parse("pattern mix(w = 4)\n"
                               "mask window(w) | sinks(2) | chunked(8) & prefix(1) | dilated(6, 3)\n")


def test_score_modifier_gives_the_spec_ir():
    @attncc.pattern(score=lambda s, cap=30.0: attncc.softcap(s, cap))
    def capped(q, k):
        return attncc.causal()
    spec = attncc.parse("pattern capped\nmask causal\nscore softcap(s, 30.0)\n")
    assert capped.score is spec.score and capped == spec

    @attncc.pattern(score=lambda s: attncc.alibi(s), name="alibi_causal")
    def al(q, k):
        return q >= k
    assert al == attncc.parse("pattern alibi_causal\nmask q >= k\nscore alibi\n")

    @attncc.pattern(inputs={"table": "float[h, 9]"},
                    score=lambda s, h, q, k, table, maxdist=4: s + table[h, q - k + maxdist])
    def rel(q, k, maxdist=4):
        return abs(q - k) <= maxdist
    assert rel == attncc.parse("pattern rel(maxdist = 4)\ninput table: float[h, 9]\n"
                               "mask abs(q - k) <= maxdist\n"
                               "score s + table[h, q - k + maxdist]\n")


def test_float_arithmetic_stays_out_of_masks():
    with pytest.raises(attncc.SpecError, match="float arithmetic is only allowed"):
        @attncc.pattern
        def bad(q, k):
            return q * 0.5 < k


def test_normalize_none_gives_the_spec_ir_and_the_linear_path():
    @attncc.pattern(normalize="none",
                    score=lambda s, h, q, k, heads=4: s * trace.exp(-0.5 * (h + 1) / heads * (q - k)))
    def decay(q, k, heads=4):
        return attncc.causal()
    spec = attncc.parse("pattern decay(heads = 4)\nmask causal\n"
                        "score s * exp(-0.5 * (h + 1) / heads * (q - k))\nnormalize none\n")
    assert decay == spec and decay.normalize == "none"
    assert decay.bind(heads=4) == spec
    # the call runs the chunked linear algorithm and equals the float64 formula
    from attncc.runtime.compile import kernel_for
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 37, 8, generator=gen) for _ in range(3))
    out = decay(q, k, v)
    assert kernel_for(decay.pattern).last_algorithm.linear
    h = torch.arange(4).view(1, -1, 1, 1).double()
    i, j = torch.arange(37).view(-1, 1), torch.arange(37).view(1, -1)
    w = (q.double() @ k.double().transpose(-1, -2)) * 8 ** -0.5 \
        * torch.exp(-0.5 * (h + 1) / 4 * (i - j)) * (j <= i)
    torch.testing.assert_close(out.double(), w @ v.double(), rtol=1e-4, atol=1e-4)
    plain = attncc.pattern(lambda q, k: q >= k)
    assert plain.normalize == "softmax"


def test_bad_normalize_is_a_located_error():
    with pytest.raises(attncc.SpecError, match="normalize must be 'softmax' or 'none', got 'linear'") as e:
        attncc.pattern(normalize="linear")
    assert "test_trace.py" in str(e.value)


# ---- segmented and separate layouts -------------------------------------------------------

def test_segmented_layout_decorator_gives_the_spec_node():
    spec = attncc.load("specs/mmdit_natten.attn", text=7, frames=3, height=4, width=5,
                       kernel_t=3, kernel=3)

    @attncc.pattern(layout=[attncc.tokens(text=7), attncc.grid(t=3, y=4, x=5)])
    def mmdit_natten(q, k, text=7, frames=3, height=4, width=5, kernel_t=3, kernel=3):
        return q.text | k.text | attncc.neighborhood((kernel_t, kernel, kernel))

    assert mmdit_natten.mask is spec.mask
    assert mmdit_natten.layout == spec.layout and mmdit_natten == spec
    assert mmdit_natten.ir_text() == spec.ir_text()


def test_cls_registers_decorator_gives_the_spec_node():
    spec = attncc.load("specs/vit_cls_natten.attn", registers=2, height=5, width=6, kernel=3)

    @attncc.pattern(layout=[attncc.tokens(cls=1, reg=2), attncc.grid(y=5, x=6)])
    def vit_cls_natten(q, k, registers=2, height=5, width=6, kernel=7):
        return q.cls | k.cls | q.reg | k.reg | attncc.neighborhood(3)

    assert vit_cls_natten.mask is spec.mask and vit_cls_natten.layout == spec.layout


def test_separate_layouts_decorator_gives_the_spec_node_and_runs():
    spec = attncc.load("specs/hilo.attn", height=4, width=6, pool=2, hifi_heads=1, heads=2)

    @attncc.pattern(q_layout=attncc.grid(y=4, x=6),
                    k_layout=[attncc.grid(y=4, x=6), attncc.tokens(pooled=6)])
    def hilo(q, k, h, height=4, width=6, pool=2, hifi_heads=1, heads=2):
        return attncc.where(h < hifi_heads, k.grid & attncc.blocked(pool), k.pooled)

    assert hilo.mask is spec.mask and hilo == spec
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 24, 8, generator=g)
    k, v = (torch.randn(1, 2, 30, 8, generator=g) for _ in range(2))
    assert (hilo(q, k, v).double() - attncc.reference(spec, q, k, v)).abs().max() < 1e-5


def test_two_grid_primitives_through_the_decorator():
    spec = attncc.parse("pattern pooled\nlayout q_grid(y = 8, x = 8)\nlayout k_grid(y = 4, x = 4)\n"
                        "mask neighborhood(3)\n")

    @attncc.pattern(q_layout=attncc.grid(y=8, x=8), k_layout=attncc.grid(y=4, x=4))
    def pooled(q, k):
        return attncc.neighborhood(3)

    assert pooled.mask is spec.mask and pooled == spec


@pytest.mark.parametrize("kwargs, body, message", [
    (dict(q_layout=attncc.grid(y=4)), lambda q, k: q.y == k.y,
     "separate layouts need both q_layout= and k_layout="),
    (dict(layout=[attncc.tokens(a=2), attncc.tokens(a=3), attncc.grid(y=4)]),
     lambda q, k: q.a, "layout: bad segment name 'a' (duplicate)"),
    (dict(layout=[attncc.grid(y=2), attncc.grid(x=2)]), lambda q, k: q.y == k.x,
     "layout: at most one grid segment per side"),
    (dict(layout=[attncc.tokens(text=2), attncc.grid(y=4)]), lambda q, k: q.nosuch,
     "unknown segment or axis 'nosuch' of the layout (it has text, grid, y)"),
    (dict(layout=[attncc.tokens(text=2), attncc.grid(y=4)], score=lambda s, q: s + q.y),
     lambda q, k: q.y == k.y,
     "grid coordinates cannot be used in the score clause of a layout with token segments "
     "(only compared in the mask)"),
])
def test_segmented_decorator_misuse_is_a_located_error(kwargs, body, message):
    with pytest.raises(attncc.SpecError) as e:
        attncc.pattern(body, **kwargs) if "score" not in kwargs else \
            attncc.pattern(**kwargs)(body)
    assert str(e.value).splitlines()[0].split(": error: ", 1)[1] == message
    assert "test_trace.py" in str(e.value).splitlines()[0]


def test_tokens_sizes_are_checked():
    with pytest.raises(attncc.SpecError, match="size of segment 'text' must be a positive "
                                                "integer, got 0"):
        attncc.tokens(text=0)
