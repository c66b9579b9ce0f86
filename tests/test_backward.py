"""Generated backward kernels (dQ over the forward schedule, dK/dV over the transposed one)
against torch.autograd through the dense float64 reference, on CPU through Triton's
interpreter (small shapes, 16-token tiles).

Tolerances: float32 inputs — absolute 2e-5 after dividing by max(1, max |reference grad|)
(the kernels sum in float32 with tl.dot; observed errors are ~1e-6); bfloat16 inputs — 4e-2
relative to max(1, max |grad|) (P and dS are rounded to bfloat16 before their products, as
in flash attention).
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attncc
from attncc.ir.dense import Evaluator
from attncc.ir.nodes import Var
from attncc.passes.derive import derivative, float_loads
from attncc.runtime.reduce import reduce_table_grad
from attncc.schedule.transpose import transpose_classes, transposed_rows, transposed_schedule

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _inputs(pattern, B, Hq, Lq, Lkv, gen):
    out = {}
    sizes = {"b": B, "h": Hq, "q": Lq, "k": Lkv}
    for d in pattern.inputs:
        shape = [sizes[x] if isinstance(x, str) and x in sizes else x for x in d.dims]
        if d.dtype.startswith("float"):
            if "q_blocks" in shape:  # block scores of `blocks(...)`, 16-token blocks here
                shape = [-(-Lq // 16) if x == "q_blocks" else -(-Lkv // 16) if x == "k_blocks"
                         else x for x in shape]
            out[d.name] = torch.randn(*shape, generator=gen).requires_grad_(True)
        else:  # packed document ids: non-decreasing per batch row
            out[d.name] = torch.randint(0, 3, shape, generator=gen).sort(-1).values
    return out


def check_grads(spec, *, B=1, Hq=2, Hkv=1, Lq=37, Lkv=None, D=16, dtype=torch.float32,
                seed=0, tol=2e-5, params=None, block=(16, 16), tiles=None):
    """Run kernel forward + backward and compare every gradient with the reference's
    (`tiles`: multi-dimensional query and key tile shape, instead of `block`)."""
    Lkv = Lq if Lkv is None else Lkv
    shape = dict(q_tile=tiles, kv_tile=tiles) if tiles else dict(block_m=block[0],
                                                                 block_n=block[1])
    kern = attncc.compile(spec, backend="interpret", params=params, **shape)
    if tiles:
        assert kern.schedule(Lq, Lkv, Hq).q_grid.tile == tiles
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Lq, D, generator=gen).to(dtype).requires_grad_(True)
    k = torch.randn(B, Hkv, Lkv, D, generator=gen).to(dtype).requires_grad_(True)
    v = torch.randn(B, Hkv, Lkv, D, generator=gen).to(dtype).requires_grad_(True)
    inputs = _inputs(kern.pattern, B, Hq, Lq, Lkv, gen)
    names = [n for n, t in inputs.items() if t.requires_grad]
    leaves = [q, k, v] + [inputs[n] for n in names]
    out = kern(q, k, v, **inputs)
    dout = torch.randn(out.shape, generator=gen).to(dtype)
    got = torch.autograd.grad(out, leaves, dout, allow_unused=True)
    ref_leaves = [t.detach().to(torch.float64).requires_grad_(True) for t in leaves]
    ref_inputs = dict(inputs, **dict(zip(names, ref_leaves[3:])))
    ref = attncc.reference(kern.pattern, *ref_leaves[:3], **ref_inputs)
    want = torch.autograd.grad(ref, ref_leaves, dout.to(torch.float64), allow_unused=True)
    labels = ["dq", "dk", "dv"] + [f"d{n}" for n in names]
    for label, g, w in zip(labels, got, want):
        if w is None:
            assert g is None or not g.any(), f"{label}: reference has no gradient"
            continue
        assert g is not None, f"{label}: missing gradient"
        assert g.shape == w.shape, label
        assert torch.isfinite(g).all(), f"{label}: non-finite gradient"
        err = (g.to(torch.float64) - w).abs().max().item() / max(1.0, w.abs().max().item())
        assert err <= tol, f"{label}: error {err:.3g} > {tol}"
    return kern, got


# ---- hand-picked patterns: every loop kind and list source ----------------------------------

CASES = {
    # closed-form dQ loops, Lq != Lkv (bottom-right causal), GQA 2:1, odd lengths
    "band": dict(spec="pattern band\nmask causal & q + KV_LEN - Q_LEN - k < 20\n",
                 Hq=2, Hkv=1, Lq=29, Lkv=37),
    # score modifiers with the chain rule: softcap of s plus a learned relative bias table
    "softcap_bias": dict(spec="pattern rb\ninput bias: float[h, 80]\nmask causal & q - k < 24\n"
                              "score softcap(s + bias[h, q - k + KV_LEN - 1], 3.0)\n",
                         Lq=37, Lkv=40),
    # alibi + temperature + select + abs + min: every derivative rule of float expressions
    "modifiers": dict(spec="pattern mods\nmask dilated(24, 2) | k < 4\n"
                           "score (h < 1 ? s * 0.5 : min(s, 1.5 - abs(s))) "
                           "+ exp2(-8.0 * (h + 1) / HEADS) * (k - q)\n", Hq=2, Lq=33),
    # output scale w[b, q, h]: dW including a head skipped by the forward (weights zeroed below)
    "moh": dict(spec=None, Hq=2, Hkv=2, Lq=33),
    # document ids (pre-pass lists per batch and head; transposed lists from the call's classes)
    "document": dict(spec=None, B=2, Lq=37),
    # 2-D neighborhood: multi-dimensional tiles, CSR loops
    "natten2d": dict(spec=None, Lq=48, params={"height": 8, "width": 6, "kernel": 3}),
    # routing on a 2-D map: the selection (from q and k) held fixed, region-aligned tiles
    "biformer": dict(spec=None, Lq=64, params={"height": 8, "width": 8, "region": 4, "topk": 2}),
    # Swin-style 2-D relative position bias on multi-dimensional tiles (the table index is a
    # function of both coordinates), plus a second table read (per-key bias, GQA 2:1): the
    # table gradients index pairs through the tiles' token maps
    "relpos2d": dict(spec="pattern rp2(height = 8, width = 6)\nlayout grid(y = height, x = width)\n"
                          "input rel: float[h, 2 * height - 1, 2 * width - 1]\n"
                          "input kb: float[b, k]\n"
                          "mask abs(q.y - k.y) <= 2 & abs(q.x - k.x) <= 2\n"
                          "score s + rel[h, q.y - k.y + height - 1, q.x - k.x + width - 1]"
                          " + 0.5 * kb[b, k]\n",
                     B=2, Hq=4, Hkv=2, Lq=48, tiles=(4, 4)),
    # block selection: gradients with the selection held fixed; the gate gets none
    "seer_gate": dict(spec=None, Hq=2, Hkv=2, Lq=45, params={"block": 16, "keep": 0.4}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_gradients_match_reference(name):
    case = dict(CASES[name])
    if case["spec"] is None:
        case["spec"] = f"specs/{name}.attn"
    check_grads(**case)


def test_output_scale_skipped_head_gets_its_gradient():
    kern = attncc.compile("specs/moh.attn", backend="interpret", block_m=16, block_n=16)
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 20, 16, generator=gen).requires_grad_(True) for _ in range(3))
    w = torch.randn(1, 20, 2, generator=gen)
    w[:, :, 1] = 0.0  # head 1 skipped in the forward (all weights zero)
    w.requires_grad_(True)
    out = kern(q, k, v, weight=w)
    assert not out[:, 1].any()
    (dw,) = torch.autograd.grad(out, (w,), torch.ones_like(out))
    unscaled = attncc.reference(attncc.load("specs/causal.attn"), q.double(), k.double(),
                                v.double())
    torch.testing.assert_close(dw[:, :, 1].double(), unscaled[:, 1].sum(-1), atol=1e-5, rtol=0)
    assert dw[:, :, 1].abs().min() > 0
    assert kern.last_stats["skipped_head_tiles"] == 0  # dW needs head 1's unscaled output
    # Weights without a gradient: head 1's query tiles are skipped in forward and backward.
    out = kern(q, k, v, weight=w.detach())
    assert kern.last_stats["skipped_head_tiles"] == 2
    got = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    refs = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref = attncc.reference(kern.pattern, *refs, weight=w.detach().double())
    want = torch.autograd.grad(ref, refs, torch.ones_like(ref))
    for g, r in zip(got, want):
        torch.testing.assert_close(g.double(), r, atol=2e-5, rtol=0)


def test_table_gradients_in_query_tile_chunks(monkeypatch):
    # Scratch for one query tile per dQ launch: 3 launches, the same gradients.
    from attncc.runtime import autograd
    monkeypatch.setattr(autograd, "TABLE_SCRATCH_BYTES", 1)
    check_grads(CASES["softcap_bias"]["spec"], Lq=37, Lkv=40)


def test_bfloat16():
    check_grads(CASES["band"]["spec"], Hq=2, Hkv=1, Lq=33, Lkv=33, dtype=torch.bfloat16,
                tol=4e-2)


def test_empty_rows_give_zero_gradients():
    # Queries q < 8 see no key; their dq rows are 0 and nothing is NaN.
    kern, (dq, dk, dv) = check_grads("pattern e\nmask causal & q >= 8\n", Lq=24)
    assert not dq[:, :, :8].any()


def test_two_runs_are_bit_identical():
    spec = CASES["softcap_bias"]["spec"]
    runs = [check_grads(spec, Hq=2, Hkv=1, Lq=20, seed=5)[1] for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# ---- random specs ---------------------------------------------------------------------------

MASKS = ["causal & q + KV_LEN - Q_LEN - k < {w}", "abs(q - k) <= {w}", "dilated({w}, 3)",
         "prefix(5) | (causal & q - k < {w})", "(q // 16 == k // 16) & causal", "k < {w} | q < 3"]
SCORES = [None, "softcap(s, 2.0)", "s * 0.7", "alibi", "s + bias[h, q - k + KV_LEN - 1]"]


def _spec(mask, score, oscale):
    inputs = []
    if score is not None and "bias" in score:
        inputs.append("input bias: float[h, 96]")
    if oscale:
        inputs.append("input weight: float[b, q, h]")
    lines = ["pattern rnd", *inputs, f"mask {mask}"]
    if score is not None:
        lines.append(f"score {score}")
    if oscale:
        lines.append("output scale weight[b, q, h]")
    return "\n".join(lines) + "\n"


random_case = st.fixed_dictionaries({
    "mask": st.sampled_from(MASKS), "w": st.integers(1, 40), "score": st.sampled_from(SCORES),
    "oscale": st.booleans(), "Lq": st.integers(1, 40), "Lkv": st.integers(1, 40),
    "ratio": st.sampled_from([(1, 1), (2, 1), (3, 1)]), "seed": st.integers(0, 99)})


def _run_random(c):
    spec = _spec(c["mask"].format(w=c["w"]), c["score"], c["oscale"])
    Lq, Lkv = c["Lq"], max(c["Lkv"], c["Lq"])  # bias table covers q - k + Lkv - 1 < 96
    check_grads(spec, Hq=c["ratio"][0], Hkv=c["ratio"][1], Lq=Lq, Lkv=Lkv, seed=c["seed"])


@settings(max_examples=3)
@given(random_case)
def test_random_specs(c):
    _run_random(c)


@pytest.mark.slow
@settings(max_examples=60)
@given(random_case)
def test_random_specs_wide(c):
    _run_random(c)


# ---- pieces --------------------------------------------------------------------------------

def test_derivative_of_score_expressions_matches_torch_autograd():
    p = attncc.parse("pattern d\ninput bias: float[h, 9]\nmask true\n"
                     "score softcap(s * 0.5 + bias[h, 3], 2.0) - max(s, 0.3) / (1.0 + abs(s))"
                     " + exp(-s * s) + log(2.0 + s * s) + sqrt(3.0 + s)\n")
    s = torch.linspace(-2.5, 2.5, 41, dtype=torch.float64).requires_grad_(True)
    bias = torch.randn(2, 9, dtype=torch.float64).requires_grad_(True)
    env = {"s": s.view(1, 1, 1, -1), "h": torch.tensor([1]).view(1, -1, 1, 1),
           "b": 0, "q": 0, "k": 0}
    ev = lambda e: Evaluator(env, inputs={"bias": bias}).evaluate(e)  # noqa: E731
    val = ev(p.score).sum()
    ds, dbias = torch.autograd.grad(val, (s, bias))
    torch.testing.assert_close(ev(derivative(p.score, Var("s"))).reshape(-1), ds)
    (load,) = float_loads(p.score)
    torch.testing.assert_close(ev(derivative(p.score, load)).sum(), dbias[1, 3])


def test_transposed_rows_are_the_transpose_of_the_schedule():
    kern = attncc.compile("pattern t\nmask dilated(20, 3) | k < 4\n", block_m=16, block_n=16)
    sched = kern.schedule(70, 90, 1)
    rows = transposed_rows(sched)
    tiles = sched.tile_matrix(0)                                  # [nQT, nKT]
    for kind, val in (("full", 2), ("partial", 1)):
        off, idx = rows[f"{kind}_offsets"], rows[f"{kind}_indices"]
        for n in range(sched.n_kv_tiles):
            got = idx[off[n]:off[n + 1]].tolist()
            assert got == (tiles[:, n] == val).nonzero()[:, 0].tolist()
    # The transposed pattern's schedule: the same tiles, transposed (sound either way;
    # equal for these masks), with closed-form bounds for the band.
    for spec in ("pattern t\nmask dilated(20, 3) | k < 4\n", "specs/sliding_window.attn",
                 "pattern t\nmask causal & q + KV_LEN - Q_LEN - k < 40\n"):
        kern = attncc.compile(spec, block_m=16, block_n=32)
        sched = kern.schedule(70, 90, 2)
        t = transposed_schedule(sched, kern.options)
        assert torch.equal(t.tile_matrix(1).T, sched.tile_matrix(1))
    assert t.classes[0].bounds is not None
    cls = torch.randint(0, 3, (2, 3, 4, 5), dtype=torch.int8)
    assert torch.equal(transpose_classes(cls)[1, 2, 3], cls[1, 2, :, 3])


def test_reduce_table_grad_is_a_fixed_order_scatter_sum():
    idx = torch.tensor([3, -1, 0, 3, 5, 0])
    val = torch.tensor([1.0, 100.0, 2.0, 0.5, 4.0, 0.25])
    assert reduce_table_grad(idx, val, 6).tolist() == [2.25, 0, 0, 1.5, 0, 4.0]


@pytest.mark.parametrize("path", ["specs/softcap.attn", "specs/natten2d.attn",
                                  "specs/biformer.attn", "specs/moh.attn"])
def test_backward_source_is_valid_python(path):
    import ast
    src = attncc.compile(path).backward_source
    ast.parse(src)
    assert "KERNEL_DKV" in src and "atomic" not in src


def test_cli_inspect_prints_the_backward_source(capsys):
    from attncc.cli import main
    assert main(["inspect", "specs/sliding_window.attn", "--stage", "triton-bwd",
                 "--q-len", "512"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# attncc backward attention kernels")
    assert "closed-form bounds" in out and "KERNEL_DKV" in out
    assert "dK/dV query-tile loops: closed-form query-tile ranges" in out


def test_dkv_query_slices_at_large_head_dims():
    # Head dim 72 (BLOCK_D 128) with 64-token query tiles: dK/dV walks each query tile in
    # two 32-row slices (SUB_M); key tiles of 16 keep the interpreter quick.
    check_grads("pattern sl\nmask causal & q - k < 50\n", Hq=2, Hkv=1, Lq=70, D=72,
                block=(64, 16))
