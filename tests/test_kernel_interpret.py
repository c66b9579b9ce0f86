"""Generated forward kernels under the Triton interpreter (CPU) versus the float64 reference.

Schedules: `exact_schedule` below classifies every tile from the dense mask (FULL when all
of its real pairs are kept in every batch, PARTIAL when some are, EMPTY otherwise; one head
class per distinct tile map), so both kernel loops and the head-class table are exercised.
`all_partial_schedule` visits every tile with the mask: any sound schedule must give the
same result. Tolerances are on the relative max error max|out - ref| / max|ref|:
fp32 2e-5, fp16 1e-2, bf16 4e-2 (P is rounded to the input dtype before P·V, as on GPU);
lse (computed from fp32 scores) within 1e-4 (fp32) / 2e-3 (fp16, bf16) absolute.
"""
import os
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import attncc
from attncc.codegen.forward import generate_forward
from attncc.runtime.launch import load_kernel, run_forward
from attncc.runtime.options import CompileOptions
from attncc.schedule.schedule import CSR, HeadClass, Schedule, TileGrid

SPECS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "specs")

TOL = {torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 4e-2}
LSE_TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-3}


def _grids(p, lq, lkv, q_tile, kv_tile):
    if len(q_tile) > 1:
        return TileGrid(p.layout.shape, q_tile), TileGrid(p.layout.shape, kv_tile)
    return TileGrid((lq,), q_tile), TileGrid((lkv,), kv_tile)


def _tile_maps(mask, qg, kg):
    """mask bool [B, H, Lq, Lkv] → (visited, full) bool [H, n_q_tiles, n_kv_tiles]: some / every
    real (q, k) pair of the tile kept (in some / every batch); padding slots are ignored."""
    qi, ki = qg.token_index(), kg.token_index()                  # [nq, tq], [nk, tk]
    valid = (qi >= 0)[:, :, None, None] & (ki >= 0)[None, None]  # [nq, tq, nk, tk]

    def gather(m):                                               # [H, nq, tq, nk, tk]
        return m[:, qi.clamp(min=0)][:, :, :, ki.clamp(min=0)]

    visited = (gather(mask.any(0)) & valid).any(4).any(2)
    full = (gather(mask.all(0)) | ~valid).all(4).all(2)
    return visited, full & visited


def exact_schedule(p, lq, lkv, heads, mask, q_tile=(16,), kv_tile=(16,), full=True):
    """A tight, sound schedule computed from the dense `mask` [B, H, Lq, Lkv]."""
    qg, kg = _grids(p, lq, lkv, q_tile, kv_tile)
    anyt, allt = _tile_maps(mask, qg, kg)
    if not full:
        allt = torch.zeros_like(allt)
    classes, head_class, seen = [], [], {}
    for h in range(heads):
        key = (anyt[h].numpy().tobytes(), allt[h].numpy().tobytes())
        if key not in seen:
            seen[key] = len(classes)
            f = CSR.from_dense(allt[h])
            pt = CSR.from_dense(anyt[h] & ~allt[h])
            classes.append(HeadClass((h,), f, pt, f.transpose(kg.n_tiles),
                                     pt.transpose(kg.n_tiles)))
        head_class.append(seen[key])
    return Schedule(p, lq, lkv, heads, qg, kg, tuple(classes), tuple(head_class))


def all_partial_schedule(p, lq, lkv, heads, q_tile=(16,), kv_tile=(16,)):
    qg, kg = _grids(p, lq, lkv, q_tile, kv_tile)
    rows = [list(range(kg.n_tiles)) for _ in range(qg.n_tiles)]
    pt, f = CSR.from_rows(rows), CSR.from_rows([[] for _ in rows])
    hc = HeadClass(tuple(range(heads)), f, pt, f.transpose(kg.n_tiles), pt.transpose(kg.n_tiles))
    return Schedule(p, lq, lkv, heads, qg, kg, (hc,), (0,) * heads)


def run(p, sched, q, k, v, inputs=None, scale=None, out=None):
    opts = CompileOptions()
    module = load_kernel(generate_forward(p, sched, opts))
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    return run_forward(module, sched, q, k, v, inputs=inputs or {}, scale=scale, options=opts,
                       out=out)


def check(p, B, Hq, Hkv, lq, lkv, D, Dv, dtype, *, inputs=None, q_tile=(16,), kv_tile=(16,),
          scale=None, qk_gain=1.0, seed=0, partial_only=False):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, Hq, lq, D, generator=g) * qk_gain).to(dtype)
    k = torch.randn(B, Hkv, lkv, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, lkv, Dv, generator=g).to(dtype)
    inputs = inputs or {}
    mask = p.dense_mask(q_len=lq, kv_len=lkv, heads=Hq, batch=B, inputs=inputs)
    sched = (all_partial_schedule(p, lq, lkv, Hq, q_tile, kv_tile) if partial_only
             else exact_schedule(p, lq, lkv, Hq, mask, q_tile, kv_tile))
    out, lse = run(p, sched, q, k, v, inputs, scale)
    ref, ref_lse = attncc.reference(p, q, k, v, scale=scale, return_lse=True, **inputs)
    assert out.dtype == dtype and out.shape == (B, Hq, lq, Dv)
    assert lse.dtype == torch.float32 and lse.shape == (B, Hq, lq)
    assert not out.isnan().any() and not lse.isnan().any()
    err = (out.double() - ref).abs().max().item() / max(ref.abs().max().item(), 1e-6)
    assert err < TOL[dtype], f"relative error {err:.3g} > {TOL[dtype]}"
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), empty)
    assert (out[empty] == 0).all()
    lerr = (lse.double() - ref_lse)[~empty].abs().max().item() if (~empty).any() else 0.0
    assert lerr < LSE_TOL[dtype], f"lse error {lerr:.3g}"
    return sched


def _doc_ids(B, L, seed):
    g = torch.Generator().manual_seed(seed)
    starts = torch.rand(B, L, generator=g) < 0.15
    starts[:, 0] = True
    return torch.cumsum(starts.to(torch.int64), 1) - 1


F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

# name: (spec text, params, B, Hq, Hkv, Lq, Lkv, D, Dv, dtype)
CASES = {
    "causal": ("pattern c\nmask causal", {}, 1, 2, 2, 61, 61, 16, 16, F32),
    "causal_lq_ne_lkv_gqa4": ("pattern c\nmask causal", {}, 1, 4, 1, 37, 70, 40, 40, F16),
    "causal_bf16_d64": ("pattern c\nmask causal", {}, 1, 2, 1, 33, 33, 64, 64, BF16),
    "sliding_window": ("pattern sw(w = 9)\nmask window(w)", {}, 1, 4, 2, 70, 70, 16, 16, F32),
    "chunked": ("pattern ch(c = 12)\nmask causal & chunked(c)", {}, 1, 2, 1, 50, 50, 16, 32, F32),
    "dilated": ("pattern d(w = 10, dil = 3)\nmask dilated(w, dil)", {},
                1, 2, 2, 45, 45, 16, 16, F32),
    "prefix_lm": ("pattern pl(n = 5)\nmask prefix(n) | causal", {}, 1, 2, 2, 33, 47, 16, 16, F16),
    "sinks": ("pattern ss(n = 2, w = 8)\nmask causal & (sinks(n) | window(w))", {},
              1, 2, 2, 52, 52, 16, 16, F32),
    "moa_head_classes": ("pattern moa\nmask causal & (k < 2 | q - k < (h < 2 ? 5 : 20))", {},
                         1, 4, 2, 40, 40, 16, 16, F32),
    "alibi": ("pattern al\nmask causal\nscore alibi", {}, 1, 4, 4, 30, 30, 16, 16, F32),
    "dense_d128_dv80": ("pattern d\nmask true", {}, 1, 2, 1, 37, 41, 128, 80, F32),
    "constant_score": ("pattern z\nmask causal\nscore 1.5", {}, 1, 2, 2, 30, 30, 16, 16, F16),
    "logic_select_minmax": ("pattern ops\nmask !(k > q) & (h < 1 ? q - k < 5 : q - k < 9) "
                            "& max(q, k) - min(q, k) != 3", {}, 1, 2, 2, 40, 40, 16, 16, F32),
    "float_functions": ("pattern ff\nmask causal\nscore s + log(k + 1) * 0.3 - sqrt(q + 1) * 0.2"
                        " + exp(s * 0.1) - exp2(s * 0.2) + tanh(s)", {},
                        1, 2, 2, 33, 33, 16, 16, F32),
    # Floor `//` and `%` on negative operands (the kernel's integer ops truncate).
    "floor_semantics": ("pattern fl\nmask (q - k) % 5 < 3 & (k - q) // 4 >= -3 "
                        "& (k - q) // 4 < 5", {}, 1, 2, 2, 45, 45, 16, 16, F32),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_library_patterns(name):
    text, params, B, Hq, Hkv, lq, lkv, D, Dv, dtype = CASES[name]
    p = attncc.parse(text, **params)
    check(p, B, Hq, Hkv, lq, lkv, D, Dv, dtype)


def test_softcap_score_modifier():
    p = attncc.parse("pattern sc(cap = 2.0)\nmask causal\nscore softcap(s, cap)")
    # Large scores so the cap matters (tanh saturates).
    check(p, 1, 2, 2, 40, 40, 16, 16, F32, qk_gain=4.0)


def test_document_input_and_batch():
    p = attncc.parse("pattern doc\ninput doc: int[b, k]\nmask causal & doc[b, q] == doc[b, k]")
    check(p, 2, 2, 1, 45, 45, 16, 16, F32, inputs={"doc": _doc_ids(2, 45, 3)})


def test_output_scale():
    p = attncc.parse("pattern moh\ninput weight: float[b, q, h]\nmask causal\n"
                     "output scale weight[b, q, h]")
    w = torch.rand(1, 35, 2, generator=torch.Generator().manual_seed(1))
    w[:, :, 1] = 0.0
    check(p, 1, 2, 2, 35, 35, 16, 16, F32, inputs={"weight": w})


def test_natten2d_multidim_tiles():
    p = attncc.parse("pattern n2(height = 6, width = 10, kernel = 3, dilation = 2)\n"
                     "layout grid(y = height, x = width)\n"
                     "mask neighborhood(kernel, dilation = dilation)")
    sched = check(p, 1, 2, 1, 60, 60, 16, 16, F32, q_tile=(4, 4), kv_tile=(4, 8))
    assert sched.q_grid.tile == (4, 4)


def test_natten2d_flat_tiles_on_grid_layout():
    p = attncc.parse("pattern n2(height = 5, width = 7, kernel = 3)\n"
                     "layout grid(y = height, x = width)\nmask neighborhood(kernel)")
    check(p, 1, 2, 2, 35, 35, 16, 16, F16)


def test_all_partial_schedule_agrees():
    p = attncc.parse("pattern sw(w = 7)\nmask window(w)")
    check(p, 1, 2, 2, 40, 40, 16, 16, F32, partial_only=True)


def test_fully_masked_rows_and_poisoned_output():
    # Query 0 sees nothing (k < q), and with Lkv < Lq the last rows of `k > q + 30` neither.
    p = attncc.parse("pattern strict\nmask k < q & k > q - 30")
    B, H, L = 1, 2, 40
    q, k, v = (torch.randn(B, H, L, 16) for _ in range(3))
    mask = p.dense_mask(q_len=L, kv_len=L, heads=H)
    sched = exact_schedule(p, L, L, H, mask)
    poisoned = torch.full((B, H, L, 16), float("nan"))
    out, lse = run(p, sched, q, k, v, out=poisoned)
    assert out.data_ptr() == poisoned.data_ptr()
    ref, ref_lse = attncc.reference(p, q, k, v, return_lse=True)
    assert not out.isnan().any()
    assert (out[:, :, 0] == 0).all() and torch.isneginf(lse[:, :, 0]).all()
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=0)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-4, rtol=0)


def test_empty_schedule_gives_zero_rows():
    p = attncc.parse("pattern none\nmask k < 0")
    q, k, v = (torch.randn(1, 1, 20, 16) for _ in range(3))
    sched = exact_schedule(p, 20, 20, 1, p.dense_mask(q_len=20, kv_len=20))
    assert sched.classes[0].partial.nnz == 0 and sched.classes[0].full.nnz == 0
    out, lse = run(p, sched, q, k, v, out=torch.full((1, 1, 20, 16), float("nan")))
    assert (out == 0).all() and torch.isneginf(lse).all()


def test_non_contiguous_strides():
    p = attncc.parse("pattern c\nmask causal")
    base = torch.randn(1, 30, 2, 48)        # [B, L, H, 3·D] packed layout
    q, k, v = (base[..., i * 16:(i + 1) * 16].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    sched = exact_schedule(p, 30, 30, 2, p.dense_mask(q_len=30, kv_len=30, heads=2))
    out, _ = run(p, sched, q, k, v)
    torch.testing.assert_close(out.double(), attncc.reference(p, q, k, v), atol=2e-5, rtol=0)


# ---- property: random band masks × shapes ------------------------------------------------

_EXAMPLES = 10 if settings.default.max_examples <= 40 else 60


@st.composite
def band_specs(draw):
    lo = draw(st.integers(-20, 20))
    width = draw(st.integers(1, 40))
    parts = [f"q - k >= {lo}", f"q - k < {lo + width}"]
    if draw(st.booleans()):
        parts.append(f"k // {draw(st.integers(1, 24))} != {draw(st.integers(0, 3))}")
    if draw(st.booleans()):
        parts.append(f"(q - k) % {draw(st.integers(2, 7))} <= {draw(st.integers(0, 3))}")
    text = " & ".join(parts)
    if draw(st.booleans()):
        text = f"({text}) | k < {draw(st.integers(0, 6))}"
    return "pattern band\nmask " + text


@settings(max_examples=_EXAMPLES)
@given(spec=band_specs(), lq=st.integers(1, 96), lkv=st.integers(1, 96),
       ratio=st.sampled_from([1, 2]), partial_only=st.booleans())
def test_random_bands(spec, lq, lkv, ratio, partial_only):
    p = attncc.parse(spec)
    check(p, 1, 2, 2 // ratio, lq, lkv, 16, 16, F32, partial_only=partial_only)


# ---- schedules from attncc.schedule.build (closed-form bounds where derivable) ------------

def _built(p, lq, lkv, heads, **opts):
    from attncc.schedule.build import build_schedule
    options = CompileOptions(**opts)
    return build_schedule(p, lq, lkv, heads, options=options), options


BUILT = {
    # name: (spec, Lq, Lkv, Hq, Hkv, options, expect closed form)
    "causal": ("pattern c\nmask causal", 50, 70, 2, 1, {}, True),
    "window": ("pattern sw\nmask window(9)", 70, 70, 2, 2, {}, True),
    "chunked": ("pattern ch\nmask causal & chunked(12)", 50, 50, 2, 2, {}, True),
    "sinks": ("pattern s\nmask causal & (sinks(4) | window(20))", 90, 90, 2, 2, {}, True),
    "moa": ("pattern moa\nmask causal & (k < 2 | q - k < (h < 2 ? 10 : 30))", 60, 60, 4, 2,
            {}, True),
    "natten2d_boxes": ("pattern n2(height = 12, width = 10, kernel = 5)\n"
                       "layout grid(y = height, x = width)\nmask neighborhood(kernel)",
                       120, 120, 1, 1, {"q_tile": (4, 4), "kv_tile": (4, 4)}, False),  # CSR
    "natten2d_dilated": ("pattern n2(height = 12, width = 10, kernel = 3, dilation = 2)\n"
                         "layout grid(y = height, x = width)\n"
                         "mask neighborhood(kernel, dilation = dilation)",
                         120, 120, 2, 1, {"q_tile": (4, 4), "kv_tile": (4, 8)}, None),
}


@pytest.mark.parametrize("name", sorted(BUILT))
def test_built_schedules(name):
    text, lq, lkv, hq, hkv, opts, closed = BUILT[name]
    p = attncc.parse(text)
    sched, options = _built(p, lq, lkv, hq, block_m=16, block_n=16, **opts)
    module = load_kernel(generate_forward(p, sched, options))
    if closed is not None:
        assert module.META["closed_form"] is closed
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, hq, lq, 16, generator=g)
    k, v = (torch.randn(1, hkv, lkv, 16, generator=g) for _ in range(2))
    out, lse = run_forward(module, sched, q, k, v, inputs={}, scale=0.3, options=options)
    ref, ref_lse = attncc.reference(p, q, k, v, scale=0.3, return_lse=True)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=0)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-4, rtol=0)


def test_per_program_lists_hook():
    """Per-(batch, head, query tile) CSR lists (what a runtime pre-pass supplies) through
    the same kernel: here exact per-batch lists of a document mask."""
    p = attncc.parse("pattern doc\ninput doc: int[b, k]\nmask causal & doc[b, q] == doc[b, k]")
    B, H, L = 2, 2, 40
    doc = _doc_ids(B, L, 11)
    doc[0] = (torch.arange(L) >= 32).to(torch.int64)   # a long document: FULL tiles in batch 0
    mask = p.dense_mask(q_len=L, kv_len=L, heads=H, batch=B, inputs={"doc": doc})
    sched = all_partial_schedule(p, L, L, H)
    rows_full, rows_part = [], []
    for b in range(B):
        for h in range(H):
            anyt, allt = _tile_maps(mask[b:b + 1, h:h + 1], sched.q_grid, sched.kv_grid)
            rows_full += [r.nonzero().flatten().tolist() for r in allt[0]]
            rows_part += [r.nonzero().flatten().tolist() for r in (anyt[0] & ~allt[0])]
    assert sum(map(len, rows_full)) > 0
    f, pt = CSR.from_rows(rows_full), CSR.from_rows(rows_part)
    lists = {"full_offsets": f.offsets, "full_indices": f.indices,
             "partial_offsets": pt.offsets, "partial_indices": pt.indices}
    q, k, v = (torch.randn(B, H, L, 16) for _ in range(3))
    module = load_kernel(generate_forward(p, sched, CompileOptions()))
    out, _ = run_forward(module, sched, q, k, v, inputs={"doc": doc}, scale=0.25, lists=lists)
    ref = attncc.reference(p, q, k, v, scale=0.25, doc=doc)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=0)
    # Lists that drop every visited tile leave every row empty: proof they are read.
    empty = {key: (torch.zeros(B * H * sched.n_q_tiles + 1, dtype=torch.int32)
                   if key.endswith("offsets") else torch.zeros(0, dtype=torch.int32))
             for key in lists}
    out0, lse0 = run_forward(module, sched, q, k, v, inputs={"doc": doc}, scale=0.25, lists=empty)
    assert (out0 == 0).all() and torch.isneginf(lse0).all()


@settings(max_examples=_EXAMPLES)
@given(spec=band_specs(), lq=st.integers(1, 96), lkv=st.integers(1, 96))
def test_random_bands_built_schedule(spec, lq, lkv):
    p = attncc.parse(spec)
    sched, options = _built(p, lq, lkv, 2, block_m=16, block_n=16)
    module = load_kernel(generate_forward(p, sched, options))
    g = torch.Generator().manual_seed(lq * 97 + lkv)
    q = torch.randn(1, 2, lq, 16, generator=g)
    k, v = (torch.randn(1, 1, lkv, 16, generator=g) for _ in range(2))
    out, lse = run_forward(module, sched, q, k, v, inputs={}, scale=0.25, options=options)
    ref, ref_lse = attncc.reference(p, q, k, v, scale=0.25, return_lse=True)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=0)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))


# ---- launcher ------------------------------------------------------------------------------

def test_load_kernel_writes_the_source_and_reuses_the_module(tmp_path):
    from attncc.runtime.launch import LaunchError
    p = attncc.parse("pattern c\nmask causal")
    source = generate_forward(p, all_partial_schedule(p, 32, 32, 1), CompileOptions())
    path = tmp_path / "k.py"
    m1 = load_kernel(source, str(path))
    assert path.read_text() == source and m1.META["block_m"] == 16
    assert load_kernel(source, str(path)) is m1
    assert [f.name for f in tmp_path.iterdir()] == ["k.py"]   # no temp files left behind
    with pytest.raises(LaunchError, match="not an attncc forward kernel"):
        load_kernel("X = 1\n", str(tmp_path / "other.py"))


def test_schedule_tensors_concatenate_classes_and_are_cached():
    from attncc.runtime.launch import schedule_tensors
    p = attncc.parse("pattern moa\nmask causal & (h < 1 ? q - k < 16 : q - k < 40)")
    mask = p.dense_mask(q_len=48, kv_len=48, heads=2)
    sched = exact_schedule(p, 48, 48, 2, mask)
    assert len(sched.classes) == 2
    t = schedule_tensors(sched, "cpu")
    assert schedule_tensors(sched, "cpu") is t
    n_q = sched.n_q_tiles
    for kind in ("full", "partial"):
        off, idx = t[f"{kind}_offsets"], t[f"{kind}_indices"]
        assert off.dtype == torch.int32 and off.numel() == 2 * n_q + 1
        for c, cls in enumerate(sched.classes):
            for m in range(n_q):
                row = c * n_q + m
                assert idx[off[row]:off[row + 1]].tolist() == getattr(cls, kind).row(m)
    assert t["head_class"].tolist() == list(sched.head_class)


def test_run_forward_rejects_mismatched_arguments():
    from attncc.runtime.launch import LaunchError
    p = attncc.parse("pattern doc\ninput doc: int[b, k]\nmask causal & doc[b, q] == doc[b, k]")
    sched = all_partial_schedule(p, 32, 32, 2)
    module = load_kernel(generate_forward(p, sched, CompileOptions()))
    q, k, v = (torch.randn(1, 2, 32, 16) for _ in range(3))
    with pytest.raises(LaunchError, match="missing input 'doc'"):
        run_forward(module, sched, q, k, v, inputs={}, scale=0.25)
    with pytest.raises(LaunchError, match="schedule is for q_len=32"):
        run_forward(module, sched, q[:, :, :31], k, v, inputs={"doc": torch.zeros(1, 32)},
                    scale=0.25)
    with pytest.raises(LaunchError, match="out must be"):
        run_forward(module, sched, q, k, v, inputs={"doc": torch.zeros(1, 32, dtype=torch.int64)},
                    scale=0.25, out=torch.empty(1, 2, 32, 8))


@pytest.mark.parametrize("tile", [(4, 4, 1), (1, 4, 4), (2, 8, 1)])
def test_tiles_with_an_axis_of_extent_one(tile):
    """A multi-D tile may be 1 token wide along an axis (the cost model picks such shapes
    for thin grids); every slot still gets its own coordinate."""
    p = attncc.load(os.path.join(SPECS, "natten3d.attn"), depth=3, height=4, width=5, kernel=3,
                    kernel_t=3)
    kern = attncc.compile(p, backend="interpret", q_tile=tile, kv_tile=tile)
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 2, 60, 16, generator=g) for _ in range(3))
    torch.testing.assert_close(kern(q, k, v).double(), attncc.reference(p, q, k, v),
                               atol=2e-5, rtol=0)
