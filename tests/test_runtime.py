"""attncc.compile and Kernel: spec resolution, argument validation (exact messages), backend
selection, caching, autograd, and generated kernels (Triton interpreter) against an
independent dense formula."""
import math
import os

import pytest
import torch

import attncc
from attncc.ir.inputs import InputError, InputTypeError
from attncc.runtime import compile as rc
from attncc.runtime.options import CompileOptions

SPECS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "specs")
DOC_TEXT = ("pattern document\ninput  doc: int[b, k]\nmask   causal & doc[b, q] == doc[b, k]\n"
            "score  softcap(s, 50)\n")


def qkv(B=2, Hq=2, Hkv=2, Lq=40, Lkv=40, D=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, Lq, D, generator=g).to(dtype),
            torch.randn(B, Hkv, Lkv, D, generator=g).to(dtype),
            torch.randn(B, Hkv, Lkv, D, generator=g).to(dtype))


def dense_attention(mask, q, k, v, scale=None):
    """Independent float64 attention on an explicit bool mask [B, Hq, Lq, Lkv] (GQA by repeat)."""
    r = q.shape[1] // k.shape[1]
    q, k, v = q.double(), k.double().repeat_interleave(r, 1), v.double().repeat_interleave(r, 1)
    s = q @ k.transpose(-1, -2) * (scale if scale is not None else 1 / math.sqrt(q.shape[-1]))
    s = s.masked_fill(~mask, float("-inf"))
    m = s.amax(-1, keepdim=True).clamp_min(-1e300)
    p = torch.exp(s - m)
    denom = p.sum(-1, keepdim=True)
    out = (p @ v) / torch.where(denom == 0, torch.ones_like(denom), denom)
    return out, (m + torch.log(denom)).squeeze(-1)


# ---- compile(): spec resolution ------------------------------------------------------------

def test_compile_path_text_pattern_same_ir_hash():
    path = os.path.join(SPECS, "document.attn")
    with open(path) as f:
        text = f.read()
    a = attncc.compile(path)
    b = attncc.compile(text)
    c = attncc.compile(attncc.load(path))
    assert a.pattern.ir_hash() == b.pattern.ir_hash() == c.pattern.ir_hash()
    import pathlib
    assert attncc.compile(pathlib.Path(path)).pattern.ir_hash() == a.pattern.ir_hash()
    plain = "pattern document\ninput doc: int[b, k]\nmask causal & doc[b, q] == doc[b, k] & doc[b, k] >= 0"
    assert attncc.compile(plain).pattern.ir_hash() == a.pattern.ir_hash()
    assert attncc.compile(DOC_TEXT).pattern.ir_hash() != a.pattern.ir_hash()  # + score clause


def test_compile_params_for_paths_and_text():
    path = os.path.join(SPECS, "sliding_window.attn")
    a = attncc.compile(path, params={"window": 16})
    b = attncc.compile("pattern sliding_window(window = 256)\nmask window(window)",
                       params={"window": 16})
    assert a.pattern.param_dict["window"] == 16
    assert a.pattern.ir_hash() == b.pattern.ir_hash()
    assert a.pattern.ir_hash() != attncc.compile(path).pattern.ir_hash()
    with pytest.raises(TypeError, match="params= applies to spec paths and spec text"):
        attncc.compile(a.pattern, params={"window": 8})


def test_compile_missing_file():
    with pytest.raises(FileNotFoundError) as e:
        attncc.compile("specs/no_such_spec.attn")
    assert str(e.value) == "spec file not found: specs/no_such_spec.attn"


def test_compile_spec_error_propagates():
    with pytest.raises(attncc.SpecError, match="casual"):
        attncc.compile("pattern p\nmask casual")


def test_compile_options():
    kern = attncc.compile(DOC_TEXT, block_m=32, backend="reference")
    assert kern.options == CompileOptions(block_m=32, backend="reference")
    assert kern.backend == "reference"
    kern = attncc.compile(DOC_TEXT, options=CompileOptions(num_warps=8), block_n=32)
    assert (kern.options.num_warps, kern.options.block_n, kern.backend) == (8, 32, None)
    with pytest.raises(TypeError) as e:
        attncc.compile(DOC_TEXT, blok_m=32)
    assert str(e.value).startswith("unknown compile option 'blok_m'; did you mean 'block_m'?")
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        attncc.compile(DOC_TEXT, backend="cuda")


# ---- backend selection -----------------------------------------------------------------------

def test_backend_selection_by_device():
    assert rc.resolve_backend(None, torch.device("cpu")) == rc.AUTO  # chosen per call shape
    assert rc.resolve_backend("flex", torch.device("cpu")) == "flex"
    assert rc.resolve_backend("reference", torch.device("cpu")) == "reference"
    with pytest.raises(rc.BackendError) as e:
        rc.resolve_backend("triton", torch.device("cpu"))
    assert str(e.value) == ("backend 'triton' needs CUDA tensors, but q is on cpu; use "
                            "backend='interpret' (Triton's interpreter), 'flex' or 'reference' "
                            "for CPU tensors")


def test_backend_selection_cuda_device_without_running():
    # selection only looks at the device type; no CUDA tensor is created
    assert rc.resolve_backend(None, torch.device("cuda")) == "triton"
    assert rc.resolve_backend("interpret", torch.device("cuda")) == "interpret"


def test_interpreter_off_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not rc.interpreter_enabled()
    kern = attncc.compile(os.path.join(SPECS, "causal.attn"), backend="interpret")
    q, k, v = qkv()
    with pytest.raises(rc.BackendError) as e:
        kern(q, k, v)
    assert str(e.value) == rc.INTERPRETER_OFF
    assert "TRITON_INTERPRET=1" in str(e.value) and "backend='flex'" in str(e.value)
    assert attncc.compile(kern.pattern, backend="reference")(q, k, v).shape == q.shape


def test_interpreter_switched_on_after_triton_import_is_detected(tmp_path):
    """Triton binds its own @jit helpers to a mode at import; TRITON_INTERPRET=1 set later
    cannot take effect, and the call says so instead of failing inside the interpreter."""
    import subprocess
    import sys
    script = tmp_path / "late.py"
    script.write_text(
        "import os, torch, triton.language, attncc\n"
        "from attncc.runtime import compile as rc\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        f"kern = attncc.compile({os.path.join(SPECS, 'causal.attn')!r}, backend='interpret')\n"
        "q = torch.randn(1, 1, 8, 4)\n"
        "try:\n"
        "    kern(q, q, q)\n"
        "except rc.BackendError as e:\n"
        "    print(str(e) == rc.INTERPRETER_LATE)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(SPECS), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env,
                         timeout=300)
    assert res.stdout.strip() == "True", res.stderr[-2000:]


# ---- argument validation (exact messages) --------------------------------------------------

@pytest.fixture(scope="module")
def doc_kernel():
    return attncc.compile(DOC_TEXT, backend="reference")


def _doc(B=2, L=40):
    return torch.sort(torch.randint(0, 3, (B, L), generator=torch.Generator().manual_seed(1)), -1).values


@pytest.mark.parametrize("make, exc, message", [
    (lambda q, k, v: (q[0], k, v), InputError,
     "q must be 4-D [batch, heads, seq_len, head_dim], got shape [2, 40, 16]"),
    (lambda q, k, v: (q, k[:1], v), InputError, "k has batch size 1, expected 2 (the batch size of q)"),
    (lambda q, k, v: (q, k[:, :1].expand(2, 3, 40, 16), v[:, :1].expand(2, 3, 40, 16)), InputError,
     "q has 2 heads, not a multiple of the 3 heads of k (grouped-query attention needs an "
     "integer ratio Hq / Hkv, got 2/3)"),
    (lambda q, k, v: (q, k, v[:, :, :30]), InputError,
     "v has sequence length 30, expected 40 (the length of k)"),
    (lambda q, k, v: (q, k[..., :8], v), InputError, "k has head dim 8, expected 16 (the head dim of q)"),
    (lambda q, k, v: (q, k.half(), v), InputTypeError,
     "k has dtype float16, expected float32 (the dtype of q)"),
    (lambda q, k, v: (q.long(), k.long(), v.long()), InputTypeError,
     "q has dtype int64; supported: float16, bfloat16, float32, float64"),
    (lambda q, k, v: (q, k, "v"), InputTypeError, "v must be a torch.Tensor, got str"),
    (lambda q, k, v: (q, k.to("meta"), v), InputError,
     "k is on meta, expected cpu (the device of q)"),
])
def test_qkv_validation_messages(doc_kernel, make, exc, message):
    q, k, v = qkv()
    with pytest.raises(exc) as e:
        doc_kernel(*make(q, k, v), doc=_doc())
    assert str(e.value) == message


@pytest.mark.parametrize("inputs, exc, message", [
    ({}, InputError, "missing input 'doc': expected int[b, k] = [2, 40]"),
    ({"doc": _doc().float()}, InputTypeError,
     "input 'doc' has dtype float32, expected an integer tensor: int[b, k] = [2, 40]"),
    ({"doc": _doc()[:, :30]}, InputError,
     "input 'doc' has shape [2, 30], expected int[b, k] = [2, 40]"),
    ({"doc": _doc(), "docs": _doc()}, InputError,
     "unknown input 'docs' for pattern 'document' (declared: 'doc'); did you mean 'doc'?"),
    ({"doc": [0, 1]}, InputTypeError,
     "input 'doc' must be a torch.Tensor, got list; expected int[b, k] = [2, 40]"),
    ({"doc": _doc().to("meta")}, InputError,
     "input 'doc' is on meta, expected cpu (the device of q)"),
])
def test_runtime_input_validation_messages(doc_kernel, inputs, exc, message):
    q, k, v = qkv()
    with pytest.raises(exc) as e:
        doc_kernel(q, k, v, **inputs)
    assert str(e.value) == message


def test_grid_length_and_scale_validation():
    kern = attncc.compile(os.path.join(SPECS, "natten2d.attn"), backend="reference",
                          params={"height": 6, "width": 5, "kernel": 3})
    q, k, v = qkv(Lq=29, Lkv=30)
    with pytest.raises(InputError) as e:
        kern(q, k, v)
    assert str(e.value) == ("pattern 'natten2d' has layout grid(y = 6, x = 5) (30 tokens), "
                            "but q has sequence length 29")
    q, k, v = qkv(Lq=30, Lkv=30)
    for bad in (0.0, -1.0, float("nan"), "1"):
        with pytest.raises(InputError) as e:
            kern(q, k, v, scale=bad)
        assert str(e.value) == f"scale must be a positive finite number, got {bad!r}"


def test_float64_rejected_by_generated_kernels():
    q, k, v = qkv(dtype=torch.float64)
    kern = attncc.compile(os.path.join(SPECS, "causal.attn"), backend="interpret")
    with pytest.raises(InputTypeError) as e:
        kern(q, k, v)
    assert str(e.value) == ("q has dtype float64; backend 'interpret' supports float16, "
                            "bfloat16 and float32 (backend='reference' takes float64)")


# ---- numerics of the reference backend, non-contiguous inputs, autograd ---------------------

def test_reference_backend_matches_independent_formula_gqa_noncontiguous(doc_kernel):
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 40, 4, 16, generator=g).transpose(1, 2)      # non-contiguous [2, 4, 40, 16]
    k = torch.randn(2, 2, 16, 40, generator=g).transpose(2, 3)      # non-contiguous [2, 2, 40, 16]
    v = torch.randn(2, 2, 40, 16, generator=g)
    doc = _doc()
    out, lse = doc_kernel(q, k, v, doc=doc, return_lse=True)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert out.shape == (2, 4, 40, 16) and lse.shape == (2, 4, 40)
    i = torch.arange(40)
    mask = (i[None, :] <= i[:, None]) & (doc[:, None, :, None] == doc[:, None, None, :])
    mask = mask.expand(2, 4, 40, 40)
    r = q.shape[1] // k.shape[1]
    s = q.double() @ k.double().repeat_interleave(r, 1).transpose(-1, -2) / 4.0
    s = 50 * torch.tanh(s / 50)  # softcap
    s = s.masked_fill(~mask, float("-inf"))
    ref = torch.softmax(s, -1) @ v.double().repeat_interleave(r, 1)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), atol=1e-5, rtol=1e-5)


def test_empty_sequences():
    kern = attncc.compile(os.path.join(SPECS, "causal.attn"), backend="reference")
    q, k, v = qkv(Lq=5, Lkv=0)
    out, lse = kern(q, k, v, return_lse=True)
    assert torch.equal(out, torch.zeros_like(q)) and torch.isneginf(lse).all()


def test_autograd_matches_dense_gradients():
    kern = attncc.compile(os.path.join(SPECS, "sliding_window.attn"), params={"window": 7},
                          backend="reference")
    q, k, v = qkv(Hq=4, Hkv=2, Lq=24, Lkv=24, D=8, seed=5)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = kern(q, k, v)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
    (out * w).sum().backward()
    i = torch.arange(24)
    mask = ((i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < 7)).expand(2, 4, 24, 24)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref, _ = dense_attention(mask, *leaves)
    (ref * w.double()).sum().backward()
    for got, want in zip((q, k, v), leaves):
        assert got.grad.dtype == torch.float32
        torch.testing.assert_close(got.grad.double(), want.grad, atol=1e-5, rtol=1e-5)


def test_autograd_only_requested_grads_and_lse_not_differentiable():
    kern = attncc.compile(os.path.join(SPECS, "causal.attn"), backend="reference")
    q, k, v = qkv(Lq=8, Lkv=8, D=4)
    v.requires_grad_()
    out, lse = kern(q, k, v, return_lse=True)
    assert not lse.requires_grad
    out.sum().backward()
    assert q.grad is None and k.grad is None and v.grad is not None


def test_pattern_call_uses_one_cached_kernel():
    @attncc.pattern
    def causal(q, k):
        return q >= k
    p = causal.pattern
    assert rc.kernel_for(p) is rc.kernel_for(p)
    q, k, v = qkv(Lq=8, Lkv=8, D=4)
    expected = attncc.reference(p, q, k, v).float()
    rc._PATTERN_KERNELS[p] = attncc.compile(p, backend="reference")
    torch.testing.assert_close(causal(q, k, v), expected)


# ---- generated kernels through the Triton interpreter ----------------------------------------

def test_structure_key_and_schedule_cache():
    kern = attncc.compile(os.path.join(SPECS, "causal.attn"), block_m=16, block_n=16)
    s1 = kern.schedule(40, 40, 2)
    assert kern.schedule(40, 40, 2) is s1
    assert kern.schedule(40, heads=2) is s1
    assert rc.structure_key(s1).startswith("((16,), (16,), 1, 1,")


def _interp_case(spec, params, **shape):
    kern = attncc.compile(os.path.join(SPECS, spec), params=params, block_m=16, block_n=16)
    q, k, v = qkv(**shape)
    return kern, q, k, v


@pytest.mark.parametrize("spec, params, shape", [
    ("causal.attn", {}, dict(Lq=37, Lkv=45, Hq=4, Hkv=2)),
    ("sliding_window.attn", {"window": 9}, dict(Lq=50, Lkv=50)),
])
def test_interpreted_kernel_matches_dense_formula(spec, params, shape):
    kern, q, k, v = _interp_case(spec, params, **shape)
    out, lse = kern(q, k, v, return_lse=True)
    mask = kern.pattern.dense_mask(q.shape[2], k.shape[2], heads=q.shape[1], batch=q.shape[0])
    ref, ref_lse = dense_attention(mask, q, k, v)
    torch.testing.assert_close(out.double(), ref, atol=2e-4, rtol=2e-4)
    live = ~torch.isneginf(ref_lse)
    torch.testing.assert_close(lse.double()[live], ref_lse[live], atol=2e-4, rtol=2e-4)


def test_kernel_source_cache_and_module_reuse(tmp_path, monkeypatch):
    import ast
    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(tmp_path))
    kern = attncc.compile(os.path.join(SPECS, "causal.attn"), backend="interpret", block_m=16,
                          block_n=16)
    src = kern.source
    ast.parse(src)
    q, k, v = qkv(Lq=32, Lkv=32)
    kern(q, k, v)
    sched = kern.schedule(32, 32, 2)
    key = rc.cache.cache_key(kern.pattern.ir_hash(), kern.options.key(), rc.structure_key(sched))
    on_disk = rc.cache.read(key, "kernel.py", tmp_path)
    assert on_disk == kern.source_for(sched)
    assert rc.cache.read(key, "ir.txt", tmp_path) == kern.pattern.ir_text()
    assert rc.cache.read(key, "schedule.txt", tmp_path).startswith("shape q_len=32 kv_len=32 heads=2\n")
    n = len(rc._MODULES)
    other = attncc.compile(kern.pattern, backend="interpret", block_m=16, block_n=16)
    other(q, k, v)
    assert len(rc._MODULES) == n  # same IR, options and structure: one module per process


# ---- other backends and the benchmark harness -------------------------------------------------

def test_flex_backend_matches_reference():
    from attncc.runtime.verify import verify
    p = attncc.load(os.path.join(SPECS, "sliding_window.attn"), window=20)
    r = verify(p, backend="flex", q_len=70, heads=2, kv_heads=1, device="cpu")
    assert r.ok and r.backend == "flex", f"\n{r}"


def test_bench_forward_counts_kept_pairs():
    from attncc.runtime.bench import bench_forward
    p = attncc.load(os.path.join(SPECS, "sliding_window.attn"), window=16)
    res = bench_forward(p, batch=2, heads=2, q_len=100, head_dim=8, backend="reference",
                        baselines=("sdpa", "sdpa+mask"), warmup=0, reps=1)
    # independent count: query i keeps min(i + 1, 16) keys
    kept = 2 * 2 * sum(min(i + 1, 16) for i in range(100))
    assert res.kept_pairs == kept and res.density == kept / (2 * 2 * 100 * 100)
    assert [t.name for t in res.timings] == ["attncc", "sdpa", "sdpa+mask"]
    t = res.timing("sdpa")
    assert t.tflops == pytest.approx(2 * (8 + 8) * kept / (t.ms * 1e-3) / 1e12)
    assert res.ratio("attncc") == 1.0
    text = str(res)
    assert text.startswith("sliding_window (forward): B=2 H=2 Lq=100 Lkv=100 D=8 float32 on cpu")
    assert "| sdpa+mask |" in text


def test_bench_training_step_times_forward_and_backward():
    """backward=True: every row is a training step (gradients reach q, k, v), counted as
    2·(4·D + 3·Dv) FLOP per kept pair; FlexAttention has no CPU backward and says so."""
    from attncc.runtime.bench import bench_forward
    p = attncc.load(os.path.join(SPECS, "sliding_window.attn"), window=16)
    res = bench_forward(p, batch=1, heads=2, q_len=96, head_dim=8, backend="torch",
                        baselines=("sdpa+mask", "flex"), warmup=0, reps=1, backward=True)
    kept = 2 * sum(min(i + 1, 16) for i in range(96))
    assert res.kept_pairs == kept and res.mode == "forward + backward"
    t = res.timing("sdpa+mask")
    assert t.tflops == pytest.approx(2 * (4 * 8 + 3 * 8) * kept / (t.ms * 1e-3) / 1e12)
    flex = res.timing("flex")
    assert flex.ms != flex.ms and flex.note == "not run: FlexAttention has no backward on CPU"
    assert str(res).startswith("sliding_window (forward + backward): B=1 H=2 Lq=96")


def test_autograd_reaches_float_runtime_inputs():
    """MoH head weights: out = attn(causal) · w[b, q, h], so d(sum(out · g))/dw[b, q, h] =
    Σ_d g · attn — independent of attncc's reference."""
    kern = attncc.compile(os.path.join(SPECS, "moh.attn"), backend="reference")
    q, k, v = qkv(B=2, Hq=2, Hkv=1, Lq=12, Lkv=12, D=4, seed=2)
    w = torch.rand(2, 12, 2, generator=torch.Generator().manual_seed(4)).requires_grad_()
    g = torch.randn(2, 2, 12, 4, generator=torch.Generator().manual_seed(5))
    (kern(q, k, v, weight=w) * g).sum().backward()
    i = torch.arange(12)
    attn, _ = dense_attention((i[None, :] <= i[:, None]).expand(2, 2, 12, 12), q, k, v)
    expected = (attn * g.double()).sum(-1).transpose(1, 2)        # [B, Lq, H]
    torch.testing.assert_close(w.grad.double(), expected, atol=1e-5, rtol=1e-5)


def test_one_kernel_object_serves_several_lengths():
    kern = attncc.compile(os.path.join(SPECS, "sliding_window.attn"), params={"window": 21},
                          backend="interpret", block_m=16, block_n=16)
    for L in (40, 72, 40):
        q, k, v = qkv(Lq=L, Lkv=L, seed=L)
        mask = kern.pattern.dense_mask(L, L, heads=2, batch=2)
        ref, _ = dense_attention(mask, q, k, v)
        torch.testing.assert_close(kern(q, k, v).double(), ref, atol=2e-4, rtol=2e-4)
    assert set(kern._schedules) == {(40, 40, 2), (72, 72, 2)}


def test_interpreted_kernel_noncontiguous_inputs():
    kern = attncc.compile(os.path.join(SPECS, "document.attn"), backend="interpret", block_m=16,
                          block_n=16)
    g = torch.Generator().manual_seed(7)
    q = torch.randn(2, 40, 4, 16, generator=g).transpose(1, 2)       # [2, 4, 40, 16], strided
    k = torch.randn(2, 2, 16, 40, generator=g).transpose(2, 3)       # [2, 2, 40, 16], strided
    v = torch.randn(2, 2, 40, 32, generator=g)[..., ::2]             # [2, 2, 40, 16], strided
    doc = torch.sort(torch.randint(0, 3, (2, 80), generator=g), -1).values[:, ::2]
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous() or doc.is_contiguous())
    out = kern(q, k, v, doc=doc)
    mask = kern.pattern.dense_mask(40, 40, heads=4, batch=2, inputs={"doc": doc})
    ref, _ = dense_attention(mask, q, k, v)
    torch.testing.assert_close(out.double(), ref, atol=2e-4, rtol=2e-4)


def test_pick_fastest_skips_failing_configs():
    times = {"a": 3.0, "b": 1.0, "c": 1.0, "boom": 0.0}

    def run(c):
        if c == "boom":
            raise RuntimeError("out of shared memory")
        return c

    timer = lambda fn: times[fn()]  # noqa: E731
    assert rc.pick_fastest(["a", "boom", "b", "c"], run, timer) == "b"
    with pytest.raises(RuntimeError, match="out of shared memory"):
        rc.pick_fastest(["boom"], run, timer)
    assert all(isinstance(w, int) and isinstance(s, int) for w, s in rc.AUTOTUNE_CONFIGS)
    for w, s in rc.AUTOTUNE_CONFIGS:
        CompileOptions(num_warps=w, num_stages=s)   # every config is a valid option set
