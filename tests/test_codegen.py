"""Forward-kernel source generation: parseable output, golden sources, expression rendering,
and that no spec text can reach generated code except validated identifiers and numbers."""
import ast
import glob
import os

import pytest
import torch

import attncc
from attncc.codegen.emitter import Emitter, TemplateError, fill
from attncc.codegen.forward import generate_forward, kernel_name
from attncc.codegen.render import (CodegenError, Renderer, Scope, nonneg, render_number,
                                   safe_identifier)
from attncc.ir.nodes import Binary, Const, Coord, FCall, Load, Unary, Var
from attncc.ir.pattern import Axis, InputDecl, Layout, Pattern
from attncc.runtime.options import CompileOptions
from attncc.schedule.build import build_schedule
from attncc.schedule.closed_form import Bounds, Range
from attncc.schedule.schedule import CSR, HeadClass, Schedule, TileClass, TileGrid

SPECS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "specs", "*.attn")))
OPTS = CompileOptions(block_m=16, block_n=16)


def grid_schedule(p, q_tile=(16,), kv_tile=(16,), lq=128, lkv=128, heads=1, bounds=None):
    """A schedule that visits every tile as PARTIAL (codegen only reads its structure)."""
    if len(q_tile) > 1:
        qg, kg = TileGrid(p.layout.shape, q_tile), TileGrid(p.layout.shape, kv_tile)
        lq = lkv = p.layout.numel
    else:
        qg, kg = TileGrid((lq,), q_tile), TileGrid((lkv,), kv_tile)
    rows = [list(range(kg.n_tiles)) for _ in range(qg.n_tiles)]
    pt, f = CSR.from_rows(rows), CSR.from_rows([[] for _ in rows])
    hc = HeadClass(tuple(range(heads)), f, pt, f.transpose(kg.n_tiles), pt.transpose(kg.n_tiles),
                   bounds)
    return Schedule(p, lq, lkv, heads, qg, kg, (hc,), (0,) * heads)


# ---- whole sources -------------------------------------------------------------------------

STRINGS_ALLOWED = {"inf", "-inf", "ROWS_PER_BATCH", "Q_LEN", "KV_LEN", "HEADS", "GROUP",
                   "N_Q_TILES", "kernel", "block_m", "block_n", "q_tile", "kv_tile", "q_grid",
                   "kv_grid", "inputs", "input_dims", "num_warps", "num_stages", "closed_form",
                   "relaxed"}


def check_structure(source: str, p: Pattern) -> None:
    """The module is: imports of triton, @triton.jit functions, KERNEL and META; every
    string literal is a known word, the kernel name or a declared input name."""
    tree = ast.parse(source)
    name = kernel_name_of(source)
    allowed = STRINGS_ALLOWED | {name} | {d.name for d in p.inputs}
    for node in tree.body:
        if isinstance(node, ast.Import):
            assert [a.name for a in node.names] in (["triton"], ["triton.language"])
        elif isinstance(node, ast.FunctionDef):
            assert [ast.unparse(d) for d in node.decorator_list][0].startswith("triton.jit")
        else:
            assert isinstance(node, ast.Assign)
            assert [t.id for t in node.targets] in (["KERNEL"], ["META"])
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            assert node.value in allowed, node.value
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            assert node.func.id in {"range", "float", "_floordiv", "_floormod", "_tanh"}, \
                node.func.id


def kernel_name_of(source: str) -> str:
    return next(n.name for n in ast.parse(source).body
                if isinstance(n, ast.FunctionDef) and n.name.startswith("attncc_fwd_"))


@pytest.mark.parametrize("path", SPECS, ids=[os.path.basename(s) for s in SPECS])
def test_every_library_spec_generates_parseable_source(path):
    p = attncc.load(path)
    tiles = [((16,), (16,))]
    if p.layout is not None:
        nd = len(p.layout.axes)
        tiles.append(({1: (16,), 2: (4, 4), 3: (2, 2, 4)}[nd],) * 2)
    uses_selector = any(type(n).__name__ in ("Route", "Blocks")
                        for n in __import__("attncc.ir.nodes", fromlist=["walk"]).walk(p.mask))
    for q_tile, kv_tile in tiles:
        if hasattr(p.layout, "q"):  # segmented: the real schedule (part tilings), small tiles
            opts = CompileOptions(block_m=16, block_n=16, tile_1d=len(q_tile) == 1,
                                  q_tile=None if len(q_tile) == 1 else q_tile,
                                  kv_tile=None if len(q_tile) == 1 else kv_tile)
            sched = build_schedule(p, heads=p.param_dict.get("heads", 1), options=opts)
        else:
            sched = grid_schedule(p, q_tile, kv_tile)
        if uses_selector:
            with pytest.raises(CodegenError, match="runtime selectors are handled by the pre-pass"):
                generate_forward(p, sched, OPTS)
            continue
        source = generate_forward(p, sched, OPTS)
        check_structure(source, p)
        compile(source, path, "exec")


def _golden_patterns():
    causal = attncc.parse("pattern causal\nmask causal")
    document = attncc.parse("pattern document\ninput doc: int[b, k]\n"
                            "mask causal & doc[b, q] == doc[b, k]\nscore softcap(s, 30.0)")
    natten = attncc.parse("pattern natten2d(height = 8, width = 12, kernel = 3)\n"
                          "layout grid(y = height, x = width)\nmask neighborhood(kernel)")
    moh = attncc.parse("pattern moh\ninput weight: float[b, q, h]\nmask causal & "
                       "abs(q - k) % 3 != 1\noutput scale weight[b, q, h]")
    return {"causal": (causal, grid_schedule(causal)),
            "document_softcap": (document, grid_schedule(document)),
            "natten2d_boxes": (natten, grid_schedule(natten, (4, 4), (4, 8))),
            "moh_dilated": (moh, grid_schedule(moh)),
            "causal_closed_form": (causal, grid_schedule(causal, bounds=_causal_bounds(8))),
            "natten2d_closed_form": (natten, grid_schedule(natten, (4, 4), (4, 4),
                                                           bounds=_box_bounds((2, 3))))}


def _box_bounds(counts) -> Bounds:
    """Per axis a: key tiles [qt_a - 1, qt_a) PARTIAL, [qt_a, qt_a + 1) FULL,
    [qt_a + 1, qt_a + 2) PARTIAL (a neighborhood one tile wide)."""
    axes = []
    for a in range(len(counts)):
        t = Var(f"qt{a}")
        at = lambda d: Binary("add", t, Const(d))  # noqa: E731
        axes.append((Range(at(-1), t, TileClass.PARTIAL), Range(t, at(1), TileClass.FULL),
                     Range(at(1), at(2), TileClass.PARTIAL)))
    return Bounds(tuple(f"qt{a}" for a in range(len(counts))), tuple(axes), tuple(counts),
                  tuple(counts))


def _causal_bounds(n: int) -> Bounds:
    """Equal-length causal with 16-token tiles: key tiles [0, qt) FULL, [qt, qt+1) PARTIAL."""
    qt = Var("qt")
    one = Binary("add", qt, Const(1))
    return Bounds(("qt",), ((Range(Const(0), qt, TileClass.FULL),
                             Range(qt, one, TileClass.PARTIAL)),), (n,), (n,))


@pytest.mark.parametrize("name", sorted(_golden_patterns()))
def test_golden_sources(name, golden):
    p, sched = _golden_patterns()[name]
    source = generate_forward(p, sched, OPTS)
    check_structure(source, p)
    golden(f"triton/{name}.py", source)


def test_closed_form_reads_no_lists():
    p, sched = _golden_patterns()["causal_closed_form"]
    source = generate_forward(p, sched, OPTS)
    assert "FULL_INDICES +" not in source and "PARTIAL_INDICES +" not in source
    assert "for n in range(kt_lo_full0, tl.minimum(kt_hi_full0, n_tail))" in source
    assert "'closed_form': True" in source
    csr = generate_forward(p, grid_schedule(p), OPTS)
    assert "tl.load(FULL_INDICES + it)" in csr and "'closed_form': False" in csr


def test_multidim_tiles_run_one_loop_per_tile_class():
    """Multi-dimensional tiles read CSR lists even where closed-form bounds exist: one
    pipelined loop per tile class, not one loop nest per combination of per-axis ranges."""
    p, sched = _golden_patterns()["natten2d_closed_form"]
    source = generate_forward(p, sched, OPTS)
    assert "for kt0 in range(" not in source and "'closed_form': False" in source
    assert source.count("for it in range(") == 2


def test_adjacent_ranges_of_one_class_are_one_loop():
    """prefix_lm: the prefix tile [0, 1) and the causal FULL tiles [1, qt) are one FULL loop;
    the statically empty ranges leave no code."""
    p = attncc.load(os.path.join(os.path.dirname(__file__), "..", "specs", "prefix_lm.attn"))
    sched = attncc.compile(p).schedule(256)
    assert sched.classes[0].bounds is not None
    source = generate_forward(p, sched, OPTS)
    full = source[source.index("# FULL key tiles"):source.index("# PARTIAL key tiles")]
    assert full.count("for ") == 1 and "kt_lo_full1" not in source


def test_full_loop_has_no_mask_code():
    p = attncc.parse("pattern w\nmask window(7)")
    source = generate_forward(p, grid_schedule(p), OPTS)
    full = source[source.index("# FULL key tiles"):source.index("# PARTIAL key tiles")]
    partial = source[source.index("# PARTIAL key tiles"):source.index("l_ok = ")]
    assert "keep" not in full and "k_ok" not in full and "m_use" not in full
    assert "p = tl.exp2(x * qk_scale - m_new[:, None])" in full  # scale folded: one FMA
    assert "keep = k_ok[None, :] & " in partial and "m_use" in partial


def test_shared_subexpression_is_one_local_and_invariants_are_hoisted():
    p = attncc.parse("pattern d\ninput doc: int[b, k]\n"
                     "mask abs(q - k) < 9 & abs(q - k) % 2 == 0 & doc[b, q] == doc[b, k]")
    source = generate_forward(p, grid_schedule(p), OPTS)
    main = source[:source.index("if BLOCK_SCORES:")]  # (the block-score pass repeats the mask)
    assert main.count("tl.abs(") == 1
    hoisted = source.index("tl.load(in0 + b * in0_s0 + q * in0_s1")
    assert hoisted < source.index("for it in range(")


def test_kernel_name_is_stable_and_keyed():
    p = attncc.parse("pattern causal\nmask causal")
    s = grid_schedule(p)
    a = kernel_name(p, s, OPTS)
    assert a == kernel_name(p, grid_schedule(p), CompileOptions(block_m=16, block_n=16))
    assert a.startswith("attncc_fwd_causal_") and len(a) == len("attncc_fwd_causal_") + 12
    assert a != kernel_name(p, s, OPTS.replace(num_warps=8))
    assert a != kernel_name(p, grid_schedule(p, (32,), (16,)), OPTS)


# ---- hostile names and numbers -----------------------------------------------------------

HOSTILE = ["x__import__('os')", "a\nimport os", "os.system", "", "1abc", "for", "é",
           "a" * 65, "x); import os; (y"]


@pytest.mark.parametrize("bad", HOSTILE)
def test_hostile_pattern_name_is_rejected(bad):
    p = Pattern(bad, (), None, (), Binary("le", Var("k"), Var("q")))
    with pytest.raises(CodegenError, match="pattern name .* is not a valid identifier"):
        generate_forward(p, grid_schedule(p), OPTS)


@pytest.mark.parametrize("bad", HOSTILE)
def test_hostile_input_name_is_rejected(bad):
    load = Load(bad, (Var("b"), Var("k")), "int")
    mask = Binary("eq", load, Const(0))
    p = Pattern("p", (), None, (InputDecl(bad, "int", ("b", "k")),), mask)
    with pytest.raises(CodegenError, match="input name .* is not a valid identifier"):
        generate_forward(p, grid_schedule(p), OPTS)


def test_hostile_axis_name_stays_in_a_comment():
    layout = Layout((Axis("y\nimport os", 8), Axis("x", 8)))
    mask = Binary("le", Coord("k", 0, "y\nimport os"), Coord("q", 0, "y\nimport os"))
    p = Pattern("grid", (), layout, (), mask)
    source = generate_forward(p, grid_schedule(p, (4, 4), (4, 4)), OPTS)
    check_structure(source, p)
    assert "\nimport os" not in source


def test_numbers_render_safely():
    assert render_number(5) == "5" and render_number(-5) == "(-5)"
    assert render_number(0.5) == "0.5" and render_number(-2.5) == "(-2.5)"
    assert render_number(float("inf")) == 'float("inf")'
    assert render_number(2 ** 63 - 1) == str(2 ** 63 - 1)
    for bad in (2 ** 63, -2 ** 63 - 1, 10 ** 40, float("nan"), True, "1", None):
        with pytest.raises(CodegenError):
            render_number(bad)
    p = Pattern("big", (), None, (), Binary("lt", Binary("sub", Var("q"), Var("k")),
                                            Const(10 ** 30)))
    with pytest.raises(CodegenError, match="does not fit in 64 bits"):
        generate_forward(p, grid_schedule(p), OPTS)
    p = Pattern("neg", (), None, (), Binary("ge", Binary("sub", Var("q"), Var("k")),
                                            Const(-12345678901)))
    source = generate_forward(p, grid_schedule(p), OPTS)
    check_structure(source, p)
    assert "(-12345678901)" in source


def test_safe_identifier():
    assert safe_identifier("doc_ids2", "input name") == "doc_ids2"
    for bad in HOSTILE + [None, 3]:
        with pytest.raises(CodegenError):
            safe_identifier(bad, "input name")


# ---- expression rendering ---------------------------------------------------------------

def _render(expr, **vars_):
    scope = Scope(vars={n: n for n in ("b", "h", "q", "k", "s", "Q_LEN", "KV_LEN", "HEADS")})
    r = Renderer(scope, "t").render([expr])
    return r.text(expr), r.helpers


def test_floor_division_uses_helpers_only_when_signs_are_unknown():
    q, k = Var("q"), Var("k")
    assert _render(Binary("floordiv", q, Const(4))) == ("(q // 4)", set())
    assert _render(Binary("mod", Binary("add", q, k), Const(3))) == ("((q + k) % 3)", set())
    assert _render(Binary("floordiv", Binary("sub", q, k), Const(4))) == \
        ("_floordiv(q - k, 4)", {"_floordiv"})
    assert _render(Binary("mod", q, Const(-3))) == ("_floormod(q, -3)", {"_floormod"})
    # A floor-mod by a non-negative divisor is itself non-negative.
    inner = Binary("mod", Binary("sub", q, k), Const(3))
    assert nonneg(inner) and _render(Binary("floordiv", inner, Const(2)))[0] == \
        "(_floormod(q - k, 3) // 2)"


def test_float_functions_and_casts():
    x = Unary("float", Binary("sub", Var("q"), Var("k")))
    text, helpers = _render(FCall("tanh", (Binary("div", Var("s"), x),)))
    assert text == "_tanh(s / tl.cast(q - k, tl.float32))" and helpers == {"_tanh"}
    assert _render(Unary("float", Const(3)))[0] == "3.0"
    assert _render(FCall("exp2", (Var("s"),)))[0] == "tl.exp2(s)"


def test_unknown_variable_or_input_is_a_clear_error():
    scope = Scope(vars={"q": "q"})
    with pytest.raises(CodegenError, match="variable 'k' is not available"):
        Renderer(scope, "t").render([Binary("lt", Var("q"), Var("k"))])
    with pytest.raises(CodegenError, match="input 'w' is not declared"):
        Renderer(scope, "t").render([Binary("lt", Load("w", (Var("q"),), "int"), Var("q"))])


def test_mask_cannot_use_score():
    p = Pattern("bad", (), None, (), Binary("lt", Var("s"), Const(0.0)))
    with pytest.raises(CodegenError, match="cannot depend on the score"):
        generate_forward(p, grid_schedule(p), OPTS)


def test_tile_slots_must_be_a_power_of_two_of_at_least_16():
    p = attncc.parse("pattern g(height = 8, width = 8)\nlayout grid(y = height, x = width)\n"
                     "mask abs(q.y - k.y) <= 1")
    with pytest.raises(CodegenError, match="power of two >= 16"):
        generate_forward(p, grid_schedule(p, (2, 4), (4, 4)), OPTS)


# ---- emitter -------------------------------------------------------------------------------

def test_fill_expands_block_and_inline_holes():
    lines = fill("def {{name}}():\n    {{body}}\n    return 1",
                 {"name": "f", "body": ["a = 1", "b = 2"]})
    assert lines == ["def f():", "    a = 1", "    b = 2", "    return 1"]
    assert fill("x\n  {{empty}}\ny", {"empty": []}) == ["x", "y"]


def test_fill_rejects_missing_unused_and_multiline_inline():
    with pytest.raises(TemplateError, match="'body' is not filled"):
        fill("{{body}}", {})
    with pytest.raises(TemplateError, match="without a hole: extra"):
        fill("x", {"extra": "1"})
    with pytest.raises(TemplateError, match="needs one line"):
        fill("a = {{v}}", {"v": "1\n2"})


def test_emitter_blocks_indent():
    em = Emitter()
    with em.block("for i in range(3):"):
        em.line("x = i")
        em.comment("note")
    em.line("y = 1")
    assert em.text() == "for i in range(3):\n    x = i\n    # note\ny = 1\n"


def test_tiles_below_16_tokens_are_refused():
    """Compiled `tl.dot` needs at least 16 rows per operand: a 2×2 query tile is refused when
    the kernel is generated (on every backend that runs generated kernels), naming the tile."""
    p = attncc.parse("pattern p(n = 8)\nlayout grid(y = n, x = n)\nmask abs(q.y - k.y) <= 1")
    kern = attncc.compile(p, backend="interpret", q_tile=(2, 2), kv_tile=(4, 4))
    q = torch.randn(1, 1, 64, 16)
    with pytest.raises(CodegenError) as e:
        kern(q, q, q)
    assert str(e.value) == ("query tile has 4 token slots; kernels need a power of two >= 16 "
                            "(tl.dot)")


def test_index_products_are_64_bit():
    """Row offsets of Q/O/LSE and the K/V tile origins are 64-bit (no int32 overflow past
    2**31 elements); in-tile K/V offsets stay 32-bit and are computed once per program."""
    p = attncc.parse("pattern w\nmask window(7)")
    for sched in (grid_schedule(p), _golden_patterns()["natten2d_boxes"][1]):
        pat = p if sched.pattern is p else sched.pattern
        source = generate_forward(pat, sched, OPTS)
        assert "q_idx.to(tl.int64)[:, None] * stride_qm" in source
        assert "q_idx.to(tl.int64)[:, None] * stride_om" in source
        assert "q_idx.to(tl.int64) * stride_lm" in source
        assert "k_idx[None, :] * stride_kn" not in source and "k_offs = " in source
        loads = [ln for ln in source.splitlines() if "k_blk = tl.load(" in ln]
        assert loads and all("tl.int64" in ln and "+ k_offs" in ln for ln in loads)
