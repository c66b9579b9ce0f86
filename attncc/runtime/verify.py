"""`verify`: run a pattern's kernel on random data and compare it with `attncc.reference`.

    report = verify(attncc.load("specs/document.attn"), backend="interpret")
    print(report)          # a short table, then PASS or FAIL
    assert report.ok

Random data: q, k, v ~ N(0, 1) in the requested dtype; declared runtime inputs get random
valid values — integer inputs are sorted ids in [0, 4) along their last dimension (packed
documents), float inputs uniform in [0, 1) (gates, head weights), bool inputs fair coins.
The comparison uses the very tensors the kernel saw (upcast to float64), so only the
kernel's arithmetic is measured.

Pass criterion: |out - ref| <= atol + rtol·|ref| everywhere, no NaN, the same rows have
lse = -inf (queries that see no key), and |lse - ref_lse| <= lse_tol on the others.

Gradients (`grad=True`; by default on for patterns with float runtime inputs, i.e. learnable
score tables, head weights or gates): out.backward(dO) with random dO, compared with
torch.autograd through the reference for q, k, v and every float input; the error of each
is max |g - g_ref| / max(1, max |g_ref|) and must stay within GRAD_TOLERANCES[dtype]
(inputs the reference gives no gradient, e.g. the block scores of `blocks`, must get none).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..ir.inputs import expected_shape
from ..ir.pattern import Pattern

# (atol, rtol, lse_tol) by input dtype. float32 allows for TF32 matmuls on GPUs.
TOLERANCES = {
    torch.float64: (1e-7, 1e-7, 1e-5),  # lse is float32 for every dtype (the Kernel contract)
    torch.float32: (2e-3, 2e-3, 2e-3),
    torch.float16: (1e-2, 1e-2, 1e-2),
    torch.bfloat16: (3e-2, 3e-2, 3e-2),
}
# Normalized gradient error allowed by input dtype (float32 allows for TF32 on GPUs).
GRAD_TOLERANCES = {torch.float64: 1e-6, torch.float32: 5e-3, torch.float16: 2e-2,
                   torch.bfloat16: 6e-2}
DEFAULT_1D_LEN = 100  # not a tile multiple: sequence tails are exercised
INT_INPUT_RANGE = 4


@dataclass(frozen=True)
class VerifyReport:
    """Outcome of `verify`. Errors are measured against the float64 reference.

    max_abs_err  max |out - ref|
    max_rel_err  max |out - ref| / (|ref| + atol)
    lse_err      max |lse - ref_lse| over rows that see at least one key
    empty_rows   query rows (over batch and heads) that see no key in the reference
    """
    pattern: str
    backend: str
    shape: tuple[int, ...]   # (batch, q_heads, kv_heads, q_len, kv_len, head_dim)
    dtype: str
    max_abs_err: float
    max_rel_err: float
    lse_err: float
    empty_rows: int
    empty_rows_match: bool
    has_nan: bool
    atol: float
    rtol: float
    lse_tol: float
    ok: bool
    # Things a PASS does not show, e.g. a mask that keeps no pair (so only zeros were checked).
    warnings: tuple[str, ...] = ()
    # Gradient check (None: not run): worst normalized error over q, k, v and float inputs.
    grad_err: Optional[float] = None
    grad_tol: float = 0.0

    @property
    def passed(self) -> bool:
        return self.ok

    def __str__(self) -> str:
        B, Hq, Hkv, Lq, Lkv, D = self.shape
        rows = [
            ("pattern", self.pattern),
            ("backend", self.backend),
            ("shape", f"B={B} Hq={Hq} Hkv={Hkv} Lq={Lq} Lkv={Lkv} D={D}"),
            ("dtype", self.dtype),
            ("max abs error", f"{self.max_abs_err:.3e}  (atol {self.atol:.0e}, rtol {self.rtol:.0e})"),
            ("max rel error", f"{self.max_rel_err:.3e}"),
            ("lse error", f"{self.lse_err:.3e}  (tol {self.lse_tol:.0e})"),
            ("empty rows", f"{self.empty_rows}" + ("" if self.empty_rows_match else "  (MISMATCH)")),
        ]
        if self.grad_err is not None:
            rows.append(("grad error", f"{self.grad_err:.3e}  (tol {self.grad_tol:.0e}, "
                                       "q, k, v and float inputs)"))
        if self.has_nan:
            rows.append(("NaN", "kernel output contains NaN"))
        width = max(len(r[0]) for r in rows)
        lines = [f"{name.ljust(width)}  {value}" for name, value in rows]
        lines += [f"warning: {w}" for w in self.warnings]
        lines.append("PASS" if self.ok else "FAIL")
        return "\n".join(lines)


def random_inputs(pattern: Pattern, *, batch: int, heads: int, q_len: int, kv_len: int,
                  device=None, generator: Optional[torch.Generator] = None) -> dict:
    """Random valid values for every declared runtime input of `pattern` (see module doc)."""
    out = {}
    for decl in pattern.inputs:
        shape = expected_shape(pattern, decl, batch=batch, heads=heads, q_len=q_len,
                               kv_len=kv_len)
        if decl.dtype == "int":
            t = torch.randint(0, INT_INPUT_RANGE, shape, generator=generator)
            t = torch.sort(t, dim=-1).values if t.dim() else t
        elif decl.dtype == "float":
            t = torch.rand(shape, generator=generator)
        else:
            t = torch.rand(shape, generator=generator) < 0.5
        out[decl.name] = t.to(device)
    return out


def verify(pattern, *, backend: Optional[str] = None, batch: int = 2, heads: Optional[int] = None,
           kv_heads: Optional[int] = None, q_len: Optional[int] = None,
           kv_len: Optional[int] = None, head_dim: int = 32, dtype: torch.dtype = torch.float32,
           seed: int = 0, device=None, options=None, inputs: Optional[dict] = None,
           grad: Optional[bool] = None) -> VerifyReport:
    """Compare `pattern`'s kernel with the float64 reference on random data.

    pattern   a Pattern, a spec path or text, or a Kernel (then `backend`/`options` are its own
              unless given); with no backend, CPU tensors run the generated kernels through
              Triton's interpreter when it is on, else the per-call default backend
    heads     query heads (default: the pattern's `heads` parameter, else 2); kv_heads
              defaults to heads (set it lower to test grouped-query attention)
    q_len     default: the layout's size on grid patterns, else 100; kv_len defaults to q_len
    device    default: CUDA when available, else CPU

    q [batch, heads, q_len, head_dim], k, v [batch, kv_heads, kv_len, head_dim] ~ N(0, 1) in
    `dtype`; `inputs` overrides the random runtime inputs. `grad` checks gradients too
    (default: when the pattern declares float inputs). Returns a VerifyReport.
    """
    from ..reference import reference
    from .compile import Kernel, compile

    if isinstance(pattern, Kernel):
        kern = pattern
        if backend is not None or options is not None:
            kern = compile(kern.pattern, backend=backend or kern.backend,
                           options=options or kern.options)
    else:
        kern = compile(pattern, backend=backend, options=options)
    p = kern.pattern
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if heads is None:
        h = p.param_dict.get("heads")
        heads = h if isinstance(h, int) and not isinstance(h, bool) and h > 0 else 2
    kv_heads = heads if kv_heads is None else kv_heads
    if p.fixed_length is not None:  # a grid or segmented layout fixes the lengths
        q_len = p.fixed_length if q_len is None else q_len
        kv_len = p.fixed_kv_length if kv_len is None else kv_len
    q_len = DEFAULT_1D_LEN if q_len is None else q_len
    kv_len = q_len if kv_len is None else kv_len
    if dtype not in TOLERANCES:
        raise ValueError(f"dtype must be one of float16, bfloat16, float32, float64, got {dtype}")

    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, q_len, head_dim, generator=gen).to(device, dtype)
    k = torch.randn(batch, kv_heads, kv_len, head_dim, generator=gen).to(device, dtype)
    v = torch.randn(batch, kv_heads, kv_len, head_dim, generator=gen).to(device, dtype)
    rand = random_inputs(p, batch=batch, heads=heads, q_len=q_len, kv_len=kv_len, device=device,
                         generator=gen)
    rand.update(inputs or {})

    from .compile import interpreter_enabled
    if kern.backend is None and device.type != "cuda" and interpreter_enabled():
        # Verification is of the generated kernels: on CPU through Triton's interpreter.
        kern = compile(p, backend="interpret", options=kern.options)
    out, lse = kern(q, k, v, return_lse=True, **rand)
    used = kern.last_backend
    ref, ref_lse = reference(p, q, k, v, return_lse=True, **rand)
    report = compare(p.name, used, (batch, heads, kv_heads, q_len, kv_len, head_dim), dtype,
                     out, lse, ref, ref_lse)
    if grad is None:
        grad = any(d.dtype == "float" for d in p.inputs)
    if not grad:
        return report
    import dataclasses
    err = grad_error(kern, q, k, v, rand, gen)
    tol = GRAD_TOLERANCES[dtype]
    return dataclasses.replace(report, grad_err=err, grad_tol=tol,
                               ok=report.ok and err <= tol)


def grad_error(kern, q, k, v, inputs: dict, gen: torch.Generator) -> float:
    """Worst normalized gradient error of `kern` against autograd through the reference
    (q, k, v and float inputs; inf when a gradient is missing, extra, or not finite)."""
    from ..reference import reference
    names = [n for n, t in inputs.items() if t.is_floating_point()]
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)] + \
        [inputs[n].detach().clone().requires_grad_(True) for n in names]
    out = kern(*leaves[:3], **dict(inputs, **dict(zip(names, leaves[3:]))))
    dout = torch.randn(out.shape, generator=gen).to(out.device, out.dtype)
    got = torch.autograd.grad(out, leaves, dout, allow_unused=True)
    ref_leaves = [t.detach().to(torch.float64).requires_grad_(True) for t in leaves]
    ref = reference(kern.pattern, *ref_leaves[:3],
                    **dict(inputs, **dict(zip(names, ref_leaves[3:]))))
    want = torch.autograd.grad(ref, ref_leaves, dout.to(torch.float64), allow_unused=True)
    worst = 0.0
    for g, w in zip(got, want):
        if w is None or g is None:
            if (w is None) != (g is None or not bool(g.any())):
                return float("inf")
            continue
        g64 = g.detach().to(torch.float64)
        if not bool(torch.isfinite(g64).all()):
            return float("inf")
        worst = max(worst, float((g64 - w).abs().max()) / max(1.0, float(w.abs().max())))
    return worst


def compare(name: str, backend: str, shape: tuple, dtype: torch.dtype, out, lse, ref,
            ref_lse) -> VerifyReport:
    """Build the VerifyReport of `out`/`lse` against the float64 `ref`/`ref_lse`."""
    atol, rtol, lse_tol = TOLERANCES[dtype]
    o, r = out.detach().to(torch.float64).cpu(), ref.detach().to(torch.float64).cpu()
    has_nan = bool(torch.isnan(o).any() or torch.isnan(lse).any())
    diff = (o - r).abs()
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
    max_abs = float(diff.max()) if diff.numel() else 0.0
    max_rel = float((diff / (r.abs() + atol)).max()) if diff.numel() else 0.0
    close = bool((diff <= atol + rtol * r.abs()).all())
    l, rl = lse.detach().to(torch.float64).cpu(), ref_lse.detach().to(torch.float64).cpu()
    empty = torch.isneginf(rl)
    empty_match = bool(torch.equal(empty, torch.isneginf(l)))
    live = ~empty
    lse_diff = (l[live] - rl[live]).abs()
    lse_diff = torch.where(torch.isnan(lse_diff), torch.full_like(lse_diff, float("inf")), lse_diff)
    lse_err = float(lse_diff.max()) if lse_diff.numel() else 0.0
    ok = close and not has_nan and empty_match and lse_err <= lse_tol
    notes = []
    if rl.numel() and bool(empty.all()):
        notes.append(f"the mask keeps no (query, key) pair at this shape (Lq={shape[3]}, "
                     f"Lkv={shape[4]}): every output row is 0, so this checks nothing of the "
                     "kernel's attention")
    return VerifyReport(warnings=tuple(notes), pattern=name, backend=backend, shape=tuple(shape),
                        dtype=str(dtype).replace("torch.", ""), max_abs_err=max_abs,
                        max_rel_err=max_rel, lse_err=lse_err, empty_rows=int(empty.sum()),
                        empty_rows_match=empty_match, has_nan=has_nan, atol=atol, rtol=rtol,
                        lse_tol=lse_tol, ok=ok)
