"""backend="torch": block-sparse torch attention with its own backward.

Outputs and gradients (q, k, v, float score tables, output-scale weights) are compared with
torch.autograd through the dense float64 `attncc.reference`.
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attncc
from attncc.runtime import torch_backend
from attncc.runtime.torch_backend import torch_attention


def _tensors(B, Hq, Hkv, Lq, Lkv, D, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    def mk(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    return mk(B, Hq, Lq, D), mk(B, Hkv, Lkv, D), mk(B, Hkv, Lkv, D)


def _compare(pattern, B=1, Hq=2, Hkv=1, Lq=150, Lkv=None, D=16, inputs=None, grad_inputs=(),
             dtype=torch.float64, tol=1e-9, seed=0, via_kernel=False):
    """Run `pattern` on the torch backend and the reference; compare out, lse on kept rows,
    and the gradients of q, k, v and of `grad_inputs`. Returns the torch backend's results."""
    Lkv = Lq if Lkv is None else Lkv
    q, k, v = _tensors(B, Hq, Hkv, Lq, Lkv, D, dtype, seed)
    inputs = dict(inputs or {})
    ins = {n: (t.detach().clone().requires_grad_() if n in grad_inputs else t)
           for n, t in inputs.items()}
    if via_kernel:
        out, lse = attncc.compile(pattern, backend="torch")(q, k, v, return_lse=True, **ins)
    else:
        out, lse, _ = torch_attention(pattern, q, k, v, ins)
    assert out.dtype == dtype
    leaves = [q, k, v] + [ins[n] for n in grad_inputs]
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1),
                       dtype=torch.float64).to(dtype)
    grads = torch.autograd.grad(out, leaves, dout)
    rleaves = [t.detach().to(torch.float64).requires_grad_() for t in leaves]
    rins = dict(inputs, **dict(zip(grad_inputs, rleaves[3:])))
    ref, rlse = attncc.reference(pattern, *rleaves[:3], return_lse=True, **rins)
    rgrads = torch.autograd.grad(ref, rleaves, dout.to(torch.float64), allow_unused=True)
    torch.testing.assert_close(out.detach().to(torch.float64), ref.detach(), atol=tol, rtol=tol)
    empty = torch.isneginf(rlse)
    assert torch.equal(torch.isneginf(lse) & empty, empty)
    ltol = tol if lse.dtype == torch.float64 else max(tol, 2e-6)   # Kernel returns float32 lse
    kept = ~empty & ~torch.isneginf(lse)       # lse of rows skipped by an output scale is -inf
    torch.testing.assert_close(lse.detach().to(torch.float64)[kept], rlse.detach()[kept],
                               atol=ltol, rtol=ltol)
    for name, g, r in zip(["q", "k", "v", *grad_inputs], grads, rgrads):
        assert not torch.isnan(g).any(), name
        r = torch.zeros_like(g, dtype=torch.float64) if r is None else r
        torch.testing.assert_close(g.to(torch.float64), r, atol=tol * 10, rtol=tol * 10,
                                   msg=lambda m, n=name: f"d{n}: {m}")
    return out, lse, grads


# ---- library specs --------------------------------------------------------------------------

@pytest.mark.parametrize("spec, params, shape", [
    ("causal", {}, dict(Hq=4, Hkv=2, Lq=150)),
    ("sliding_window", {"window": 40}, dict(Lq=200, B=2)),
    ("chunked", {"chunk": 48}, dict(Lq=150)),
    ("prefix_lm", {"prefix": 40}, dict(Lq=150)),
    ("dilated_1d", {"width": 30, "dilation": 3}, dict(Lq=131)),
    ("natten2d", {"height": 12, "width": 11, "kernel": 5}, dict(Lq=132)),
    ("alibi", {}, dict(Hq=4, Hkv=2, Lq=150)),
    ("softcap", {"cap": 5.0}, dict(Lq=150)),
    ("biformer", {"height": 16, "width": 16, "region": 4, "topk": 3}, dict(Lq=256)),
])
def test_library_spec_matches_reference(spec, params, shape):
    _compare(attncc.load(f"specs/{spec}.attn", **params), **shape)


def test_box_tiles_with_padding_slots():
    """natten2d on 12×11 with 4×8 boxes: tiles hang over the grid's edge (padding slots)."""
    from attncc.runtime.options import CompileOptions
    p = attncc.load("specs/natten2d.attn", height=12, width=11, kernel=5)
    q, k, v = _tensors(1, 2, 1, 132, 132, 8)
    out, _, stats = torch_attention(p, q, k, v, options=CompileOptions(q_tile=(4, 8),
                                                                        kv_tile=(4, 8)))
    assert stats["q_tile"] == "4×8"
    dout = torch.randn(out.shape, dtype=torch.float64)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    rl = [t.detach().requires_grad_() for t in (q, k, v)]
    ref = attncc.reference(p, *rl)
    torch.testing.assert_close(out, ref, atol=1e-9, rtol=1e-9)
    for g, r in zip(grads, torch.autograd.grad(ref, rl, dout)):
        torch.testing.assert_close(g, r, atol=1e-9, rtol=1e-9)


def test_document_with_padding():
    doc = torch.tensor([[0] * 50 + [1] * 60 + [2] * 30 + [-1] * 10, [0] * 150])
    _compare(attncc.load("specs/document.attn"), B=2, Hq=2, Hkv=1, Lq=150, inputs={"doc": doc})


def test_seer_gate_fixed_selection():
    gate = torch.randn(1, 2, 3, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    _compare(attncc.load("specs/seer_gate.attn", block=64, keep=0.5), Lq=150,
             inputs={"gate": gate})


def test_moh_output_scale_gradients_include_skipped_heads():
    """dW = rowsum(O ⊙ dO) also where the forward skipped a (batch, head, query tile)."""
    w = torch.rand(2, 150, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    w[:, :64, 1] = 0          # query tile 0 of head 1 skipped
    w[0, :, 2] = 0            # head 2 of batch 0 skipped everywhere
    p = attncc.load("specs/moh.attn")
    _compare(p, B=2, Hq=4, Hkv=2, Lq=150, inputs={"weight": w}, grad_inputs=("weight",))
    # The skipped rows have a non-zero weight gradient (it is not just 0 · something).
    q, k, v = _tensors(2, 4, 2, 150, 150, 16)
    wl = w.clone().requires_grad_()
    out, _, stats = torch_attention(p, q, k, v, {"weight": wl})
    assert stats["skipped_head_tiles"] == 2 + 3   # (b, h=1, tile 0) twice; (0, 2, all 3 tiles)
    out.sum().backward()
    assert (wl.grad[0, :, 2].abs() > 0).all()


RELBIAS = """pattern relbias(window = 20)
input bias: float[h, 32]
input temp: float[h]
mask causal & q - k < window
score (q - k < 5 ? s * temp[h] : s) + bias[h, clamp(q - k, 0, 31)]
"""


def _relbias_inputs():
    g = torch.Generator().manual_seed(5)
    return {"bias": torch.randn(4, 32, generator=g, dtype=torch.float64),
            "temp": torch.rand(4, generator=g, dtype=torch.float64) + 0.5}


def test_score_tables_select_and_temperature_gradients():
    _compare(attncc.parse(RELBIAS), Hq=4, Hkv=2, Lq=150, inputs=_relbias_inputs(),
             grad_inputs=("bias", "temp"))


def test_through_compile_with_lse_and_tables():
    _compare(attncc.parse(RELBIAS), Hq=4, Hkv=2, Lq=100, Lkv=130, inputs=_relbias_inputs(),
             grad_inputs=("bias",), via_kernel=True)


def test_lse_gradient():
    p = attncc.load("specs/sliding_window.attn", window=30)
    q, k, v = _tensors(1, 2, 1, 100, 100, 8)
    _, lse, _ = torch_attention(p, q, k, v)
    g = torch.autograd.grad(lse.sum(), (q, k))
    rl = [t.detach().requires_grad_() for t in (q, k, v)]
    _, rlse = attncc.reference(p, *rl, return_lse=True)
    r = torch.autograd.grad(rlse.sum(), rl[:2])
    for a, b in zip(g, r):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


# ---- empty rows, dtypes, determinism --------------------------------------------------------

def test_empty_rows_zero_gradients():
    """Lq > Lkv with bottom-right causal: the first Lq - Lkv queries see no key."""
    p = attncc.load("specs/causal.attn")
    out, lse, grads = _compare(p, Hq=2, Hkv=1, Lq=130, Lkv=70)
    assert torch.isneginf(lse[:, :, :60]).all() and (out[:, :, :60] == 0).all()
    assert (grads[0][:, :, :60] == 0).all()


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2),
                                        (torch.float16, 5e-3)])
def test_low_precision_inputs(dtype, tol):
    p = attncc.load("specs/softcap.attn", cap=20.0)
    _compare(p, Hq=4, Hkv=2, Lq=97, Lkv=120, D=16, dtype=dtype, tol=tol)


def test_two_backward_runs_are_bit_identical(monkeypatch):
    # Small slabs: many chunks and accumulation steps per gradient.
    monkeypatch.setattr(torch_backend, "SLAB_ELEMS", 1 << 12)
    p = attncc.parse(RELBIAS)
    ins = _relbias_inputs()
    runs = []
    for _ in range(2):
        q, k, v = _tensors(2, 4, 2, 150, 150, 16, torch.float32)
        bias = ins["bias"].float().requires_grad_()
        out, _, _ = torch_attention(p, q, k, v, {"bias": bias, "temp": ins["temp"].float()})
        out.backward(torch.ones_like(out))
        runs.append([q.grad, k.grad, v.grad, bias.grad])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_long_lists_use_online_softmax_over_entry_chunks(monkeypatch):
    """A query tile whose list exceeds one slab is split over key-tile chunks."""
    monkeypatch.setattr(torch_backend, "SLAB_ELEMS", 1 << 13)
    _compare(attncc.load("specs/causal.attn"), Hq=2, Hkv=1, Lq=200, D=8)


def test_memory_is_o_kept_tiles(monkeypatch):
    """Forward and backward of a 1K-token window work on slabs: every score block and every
    gathered K/V block stays within SLAB_ELEMS, far below one Lq×Lkv matrix."""
    monkeypatch.setattr(torch_backend, "SLAB_ELEMS", 1 << 13)
    sizes = []
    scores, gather = torch_backend._scores, torch_backend._Slabs.gather

    def spy_scores(*args):
        s = scores(*args)
        sizes.append(s.numel())
        return s

    def spy_gather(self, tiles, ent):
        g = gather(self, tiles, ent)
        sizes.append(g.numel() // g.shape[-1])
        return g
    monkeypatch.setattr(torch_backend, "_scores", spy_scores)
    monkeypatch.setattr(torch_backend._Slabs, "gather", spy_gather)
    p = attncc.load("specs/sliding_window.attn", window=64)
    L = 1024
    q, k, v = _tensors(1, 1, 1, L, L, 16, torch.float32)
    out, _, _ = torch_attention(p, q, k, v)
    out.sum().backward()
    assert len(sizes) > 20 and max(sizes) <= 1 << 13 < L * L // 64


# ---- random bands -----------------------------------------------------------------------------

@settings(max_examples=15)
@given(lo=st.integers(0, 40), hi=st.integers(0, 40), dil=st.integers(1, 3),
       Lq=st.integers(1, 140), Lkv=st.integers(1, 140), ratio=st.sampled_from([1, 2, 3]),
       Hkv=st.integers(1, 2), B=st.integers(1, 2), softcap=st.booleans(), docs=st.booleans(),
       weights=st.booleans(), seed=st.integers(0, 2**16))
def test_random_bands_match_reference(lo, hi, dil, Lq, Lkv, ratio, Hkv, B, softcap, docs,
                                      weights, seed):
    """Bands with dilation, optionally ∧ packed documents, a softcap and a learned output
    scale (some head tiles all zero), odd lengths, Lq ≠ Lkv, GQA."""
    g = torch.Generator().manual_seed(seed)
    Hq = Hkv * ratio
    docs = docs and Lq <= Lkv
    lines = ["pattern band"]
    inputs, grad_inputs = {}, ()
    if docs:
        lines.append("input doc: int[b, k]")
        inputs["doc"] = torch.randint(0, 4, (B, Lkv), generator=g).sort(-1).values
    if weights:
        lines.append("input w: float[b, q, h]")
        w = torch.rand(B, Lq, Hq, generator=g, dtype=torch.float64)
        w[:, :, 0] = 0
        inputs["w"], grad_inputs = w, ("w",)
    lines.append(f"mask q - k <= {lo} & k - q <= {hi} & (q - k) % {dil} == 0"
                 + (" & doc[b, q] == doc[b, k]" if docs else ""))
    if softcap:
        lines.append("score softcap(s, 3.0)")
    if weights:
        lines.append("output scale w[b, q, h]")
    _compare(attncc.parse("\n".join(lines)), B=B, Hq=Hq, Hkv=Hkv, Lq=Lq, Lkv=Lkv, D=8,
             inputs=inputs, grad_inputs=grad_inputs, seed=seed)


def test_torch_backend_is_registered():
    from attncc.runtime.compile import RUNNERS, SELF_DIFFERENTIABLE
    from attncc.runtime.options import BACKENDS
    assert "torch" in BACKENDS and "torch" in RUNNERS and "torch" in SELF_DIFFERENTIABLE
    # Under autograd the kernel's output comes straight from the torch backend's own
    # Function (no dense-reference wrapper around it).
    q, k, v = _tensors(1, 2, 1, 70, 70, 8, torch.float32)
    out = attncc.compile(attncc.load("specs/causal.attn"), backend="torch")(q, k, v)
    assert type(out.grad_fn).__name__ == "_TorchAttentionBackward"


def test_segment_path_of_the_kv_accumulation_matches_reference_and_is_bit_identical(monkeypatch):
    """The dK/dV accumulation that CUDA runs (stable sort + segment_reduce instead of the
    atomic index_add_), forced on CPU: gradients equal the float64 reference's, and two runs
    with GQA (several query heads and query tiles per key tile in one slab) give the same bits."""
    from attncc.runtime import reduce
    monkeypatch.setattr(torch_backend, "index_add_rows", reduce.segment_add_rows)
    monkeypatch.setattr(torch_backend, "SLAB_ELEMS", 1 << 12)
    p = attncc.load("specs/sliding_window.attn", window=40)
    _compare(p, B=2, Hq=4, Hkv=2, Lq=150, D=16)
    runs = []
    for _ in range(2):
        q, k, v = _tensors(2, 4, 2, 150, 150, 16, torch.float32)
        out, _, _ = torch_attention(p, q, k, v, {})
        out.backward(torch.ones_like(out))
        runs.append([k.grad, v.grad])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_segment_add_rows_sums_each_target_in_row_order():
    from attncc.runtime.reduce import index_add_rows, segment_add_rows
    g = torch.Generator().manual_seed(3)
    index = torch.randint(0, 7, (200,), generator=g)
    src = torch.randn(200, 5, generator=g, dtype=torch.float64)
    acc = torch.randn(7, 5, generator=g, dtype=torch.float64)
    want = acc.clone()
    for i, t in enumerate(index.tolist()):       # independent formula: one row at a time
        want[t] += src[i]
    got = segment_add_rows(acc.clone(), index, src)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # Integer-valued rows: every order gives the exact sum, so both paths agree bit for bit.
    src_i = torch.randint(-50, 50, (200, 5), generator=g).to(torch.float32)
    a = segment_add_rows(torch.zeros(7, 5), index, src_i)
    b = index_add_rows(torch.zeros(7, 5), index, src_i)
    assert torch.equal(a, b)
    assert torch.equal(segment_add_rows(torch.ones(3, 2), index[:0], src_i[:0]), torch.ones(3, 2))
