"""Runtime of `normalize none` patterns (linear attention, no softmax).

    out[b, h, q] = Σ_k keep(q, k) · score(q, k) · v[b, h // group, k]     (DESIGN §9, issue 12)

`run_none` is what `Kernel.__call__` runs for such a pattern. It asks the separability proof
(`attncc.passes.linear.decide`) which algorithm applies for the call's shape:

  linear     mask `k <= q + d`, score `s · c_h · r_h^(q - k)` with r_h in (0, 1]: the chunked
             linear-time algorithm of Lightning Attention-2 (Qin et al., 2024, arXiv
             2401.04658): inside a block of β tokens the decayed masked product
             ((Q_t K_tᵀ) ⊙ Δ) V_t, Δ_rc = r^(r - c)[r >= c]; across blocks a running state
             Z (D × Dv per head, float32) carries the past, Z ← r^β Z + (K_t ⊙ r^(β-1-c))ᵀ V_t,
             read by (Q_t ⊙ r^(r+1)) Z. O(L·β·D + L·D·Dv) work, O(L·D + D·Dv·L/β) memory.
             Backends "triton" / "interpret" run the Triton kernels of `attncc.codegen.linear`
             (forward and backward); the others (torch, flex, dense, ...) run `chunked_linear`
             in torch, whose own backward recomputes block products and reverse-scans the
             state gradient (nothing of size L·β or L² is saved).
  quadratic  anything else: the ordinary block-sparse path. "triton" / "interpret" run the
             generated forward kernel with its no-softmax key-tile step; other backends run
             `quadratic_none` (torch, one slab per (head class, query tile) over the schedule's
             non-empty key tiles); "reference" runs `attncc.reference`.

Queries are aligned to key positions p = q + d (d = KV_LEN - Q_LEN for `causal`); a query
with p < 0 sees no key (output 0). `return_lse=True` returns 0 for rows with a kept key and
-inf for rows without (the log of the implicit normaliser 1; see `attncc.reference`).

Decode: `step(kern, state, q, k, v)` is the recurrent form, Z ← r Z + k vᵀ, out = c·scale·q Z
per token (any number of new tokens per call, chunked internally).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..ir.inputs import InputError, check_qkv
from ..passes.linear import LinearDecision, decide

__all__ = ["run_none", "chunked_linear", "linear_attention", "quadratic_none", "step",
           "algorithm", "run_linear_forward", "run_linear_backward"]


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _expand_kv(x: torch.Tensor, hq: int) -> torch.Tensor:
    """[B, Hkv, L, *] → [B, Hq, L, *] (query head h reads kv head h // (Hq // Hkv))."""
    g = hq // x.shape[1]
    return x if g == 1 else x.repeat_interleave(g, dim=1)


# ---- the chunked algorithm (torch) ----------------------------------------------------------

def _decays(log_r: torch.Tensor, H: int, block: int, dtype, device):
    """(Δ [1, H, 1, β, β], a = r^(r+1) [1, H, 1, β, 1], b = r^(β-1-c) [1, H, 1, β, 1],
    r^β [1, H, 1, 1]) of one block."""
    idx = torch.arange(block, device=device, dtype=dtype)
    lr = log_r.to(device=device, dtype=dtype).view(1, H, 1, 1, 1)
    diff = idx[:, None] - idx[None, :]
    delta = torch.where(diff >= 0, torch.exp(lr * diff.clamp_min(0)),
                        torch.zeros((), dtype=dtype, device=device))
    a = torch.exp(lr * (idx + 1).view(1, 1, 1, -1, 1))
    b = torch.exp(lr * (block - 1 - idx).view(1, 1, 1, -1, 1))
    return delta, a, b, torch.exp(lr.view(1, H, 1, 1) * block)


def _blocks(t: torch.Tensor, pad: int, block: int) -> torch.Tensor:
    B, H, L, E = t.shape
    if pad:
        t = F.pad(t, (0, 0, pad, 0))
    return t.reshape(B, H, (L + pad) // block, block, E)


def _states(U: torch.Tensor, decay: torch.Tensor):
    """Z_t = Σ_{j < t} r^(β (t - 1 - j)) U_j (the state before block t) and the final state."""
    z = torch.zeros_like(U[:, :, 0])
    states = []
    for t in range(U.shape[2]):
        states.append(z)
        z = decay * z + U[:, :, t]
    return torch.stack(states, dim=2), z


class _Chunked(torch.autograd.Function):
    """The chunked algorithm with its own backward: nothing of size L·β is saved (the state
    sequence is recomputed), memory O(L·D + D·Dv·L/β)."""

    @staticmethod
    def forward(ctx, q, k, v, log_r, block):
        B, H, L, D = q.shape
        pad = (-L) % block
        Q, K, V = (_blocks(t, pad, block) for t in (q, k, v))
        delta, a, b, decay = _decays(log_r, H, block, q.dtype, q.device)
        U = (K * b).transpose(-1, -2) @ V                                # [B, H, T, D, Dv]
        Z, final = _states(U, decay)
        out = ((Q @ K.transpose(-1, -2)) * delta) @ V + (Q * a) @ Z
        ctx.save_for_backward(q, k, v, log_r)
        ctx.block = block
        ctx.mark_non_differentiable(final)
        return out.reshape(B, H, -1, v.shape[-1])[:, :, pad:], final

    @staticmethod
    def backward(ctx, dout, dfinal):
        q, k, v, log_r = ctx.saved_tensors
        block = ctx.block
        B, H, L, D = q.shape
        pad = (-L) % block
        Q, K, V, dO = (_blocks(t, pad, block) for t in (q, k, v, dout))
        delta, a, b, decay = _decays(log_r, H, block, q.dtype, q.device)
        Z, _ = _states((K * b).transpose(-1, -2) @ V, decay)
        # dU_t = dZ_{t+1} = Σ_{s > t} r^(β (s - t - 1)) (Q_s ⊙ a)ᵀ dO_s: a reverse scan.
        G = (Q * a).transpose(-1, -2) @ dO                               # [B, H, T, D, Dv]
        g = torch.zeros_like(G[:, :, 0])
        dU = []
        for t in range(G.shape[2] - 1, -1, -1):
            dU.append(g)
            g = decay * g + G[:, :, t]
        dU = torch.stack(dU[::-1], dim=2)
        dP = (dO @ V.transpose(-1, -2)) * delta                         # [B, H, T, β, β]
        P = (Q @ K.transpose(-1, -2)) * delta
        dQ = dP @ K + (dO @ Z.transpose(-1, -2)) * a
        dK = dP.transpose(-1, -2) @ Q + (V @ dU.transpose(-1, -2)) * b
        dV = P.transpose(-1, -2) @ dO + (K * b) @ dU
        grads = [t.reshape(B, H, -1, t.shape[-1])[:, :, pad:] for t in (dQ, dK, dV)]
        return (*grads, None, None)


def chunked_linear(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_r: torch.Tensor,
                   block: int = 64):
    """Causal decayed linear attention, chunked (Lightning Attention-2), in torch.

    q, k [B, H, L, D], v [B, H, L, Dv] (one dtype; q already scaled), log_r [H] (<= 0):
    out[p] = Σ_{k <= p} r_h^(p - k) (q_p · k_k) v_k with r_h = exp(log_r[h]).
    Returns (out [B, H, L, Dv], state [B, H, D, Dv]) where state = Σ_k r^(L-1-k) k_kᵀ v_k is the
    recurrent state after the last token. The sequence is padded at the front to a multiple
    of `block` (zero keys add nothing; relative distances are unchanged). Differentiable in
    q, k, v by its own backward (`_Chunked`: the intra-block products are recomputed per
    block, the states by a forward scan, their gradients by a reverse scan)."""
    return _Chunked.apply(q, k, v, log_r.to(device=q.device, dtype=q.dtype), block)


def linear_attention(q, k, v, c: torch.Tensor, log_r: torch.Tensor, d: int, scale: float,
                     block: int = 64, state: Optional[torch.Tensor] = None,
                     kernel=None):
    """out[q] = c_h · Σ_{k <= q + d} r_h^(q - k) · scale (q·k) v[k] for q [B, Hq, Lq, D],
    k [B, Hkv, Lkv, D], v [B, Hkv, Lkv, Dv], c and log_r float64 [Hq].

    `state` [B, Hq, D, Dv] (only with d == 0 and Lq == Lkv): the recurrent state of earlier
    tokens, which precede these. Returns (out in the compute dtype [B, Hq, Lq, Dv], new state
    or None). `kernel`: an optional forward (q, k, v, log_r, scale) -> out (k, v with Hq
    heads, inputs in their own dtype) replacing `chunked_linear` when d == 0 and Lq == Lkv
    (the Triton kernel)."""
    B, Hq, Lq, D = q.shape
    Lkv, Dv = k.shape[2], v.shape[-1]
    dt = _compute_dtype(q)
    if d == 0 and Lq == Lkv and kernel is not None and state is None:
        out, final, rows = kernel(q, _expand_kv(k, Hq), _expand_kv(v, Hq), log_r, scale).to(dt), None, None
    elif d == 0 and Lq == Lkv:
        qf = q.to(dt) * scale
        kf, vf = _expand_kv(k, Hq).to(dt), _expand_kv(v, Hq).to(dt)
        out, final = chunked_linear(qf, kf, vf, log_r, block)
        rows = None
    else:
        if state is not None:
            raise InputError("a recurrent state needs as many queries as keys")
        qf = q.to(dt) * scale
        kf, vf = _expand_kv(k, Hq).to(dt), _expand_kv(v, Hq).to(dt)
        n = max(Lkv, d + Lq)
        p = torch.arange(Lq, device=q.device) + d
        rows = p >= 0
        qq = qf.new_zeros(B, Hq, n, D)
        qq[:, :, p[rows]] = qf[:, :, rows]
        kf, vf = (F.pad(t, (0, 0, 0, n - Lkv)) for t in (kf, vf))
        full, final = chunked_linear(qq, kf, vf, log_r, block)
        out = full.new_zeros(B, Hq, Lq, Dv)
        out[:, :, rows] = full[:, :, p[rows]]
        final = None
    factor = (c * torch.exp(-d * log_r)).to(device=q.device, dtype=dt).view(1, Hq, 1, 1)
    out = out * factor
    if state is not None:
        lr = log_r.to(device=q.device, dtype=dt).view(1, Hq, 1, 1)
        pos = torch.arange(1, Lq + 1, device=q.device, dtype=dt).view(1, 1, -1, 1)
        s0 = state.to(dt)
        qf = q.to(dt) * scale
        out = out + (qf * torch.exp(lr * pos)) @ s0 * c.to(q.device, dt).view(1, Hq, 1, 1)
        final = final + torch.exp(lr * Lq) * s0
    return out, final


# ---- the quadratic path (torch) ---------------------------------------------------------------

def quadratic_none(pattern, schedule, q, k, v, inputs: dict, scale: float):
    """`normalize none` on the block-sparse schedule, in torch: for every head class and query
    tile, one slab over the union of its non-empty key tiles; the mask and score are evaluated
    per element by the dense IR evaluator. Returns (out [B, Hq, Lq, Dv] compute dtype,
    any_kept bool [B, Hq, Lq]). Differentiable."""
    from ..ir.dense import Evaluator
    B, Hq, Lq, D = q.shape
    Lkv, Dv = k.shape[2], v.shape[-1]
    dt = _compute_dtype(q)
    dev = q.device
    group = Hq // k.shape[1]
    qidx = schedule.q_grid.token_index().to(dev)
    kidx = schedule.kv_grid.token_index().to(dev)
    out = torch.zeros(B, Hq, Lq, Dv, dtype=dt, device=dev)
    kept = torch.zeros(B, Hq, Lq, dtype=torch.bool, device=dev)
    bvar = torch.arange(B, device=dev).view(-1, 1, 1, 1)
    for cls in schedule.classes:
        heads = torch.tensor(cls.heads, dtype=torch.int64, device=dev)
        kvh = heads // group
        qh, kh, vh = q[:, heads].to(dt), k[:, kvh].to(dt), v[:, kvh].to(dt)
        tiles = cls.classes(schedule.n_kv_tiles)
        for m in range(schedule.n_q_tiles):
            cols = torch.nonzero(tiles[m]).flatten()
            if cols.numel() == 0:
                continue
            qi = qidx[m][qidx[m] >= 0]
            ki = kidx[cols.to(dev)].reshape(-1)
            ki = ki[ki >= 0]
            s = (qh[:, :, qi] @ kh[:, :, ki].transpose(-1, -2)) * scale
            env = {"b": bvar, "h": heads.view(1, -1, 1, 1), "q": qi.view(1, 1, -1, 1),
                   "k": ki.view(1, 1, 1, -1), "Q_LEN": Lq, "KV_LEN": Lkv, "HEADS": Hq}
            ev = Evaluator(dict(env, s=s.to(torch.float64) if dt == torch.float64 else s),
                           layout=pattern.layout, inputs=inputs, device=dev)
            keep = ev.evaluate(pattern.mask).expand(s.shape)
            w = s if pattern.score is None else ev.evaluate(pattern.score).to(dt).expand(s.shape)
            w = torch.where(keep, w, torch.zeros((), dtype=dt, device=dev))
            out[:, heads.view(-1, 1), qi.view(1, -1)] = w @ vh[:, :, ki]
            kept[:, heads.view(-1, 1), qi.view(1, -1)] = keep.any(-1)
    return out, kept


# ---- autograd for the Triton forward ------------------------------------------------------------

class _TritonLinear(torch.autograd.Function):
    """Forward by the Triton kernel; backward by the Triton backward kernels
    (`run_linear_backward`), or, with `bwd=None`, by differentiating `chunked_linear` (torch)
    recomputed from the saved inputs. Neither saves anything of size L²."""

    @staticmethod
    def forward(ctx, fwd, bwd, block, scale, log_r, q, k, v):
        ctx.save_for_backward(q, k, v, log_r)
        ctx.block, ctx.scale, ctx.bwd = block, scale, bwd
        return fwd(q, k, v, log_r, scale)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, log_r = ctx.saved_tensors
        if ctx.bwd is not None:
            dq, dk, dv = ctx.bwd(q, k, v, dout.contiguous(), log_r, ctx.scale)
            return (None, None, None, None, None, dq, dk, dv)
        dt = _compute_dtype(q)
        with torch.enable_grad():
            leaves = [t.detach().to(dt).requires_grad_(w)
                      for t, w in zip((q, k, v), ctx.needs_input_grad[5:])]
            out, _ = chunked_linear(leaves[0] * ctx.scale, leaves[1], leaves[2], log_r, ctx.block)
            need = [t for t in leaves if t.requires_grad]
            grads = iter(torch.autograd.grad(out, need, dout.to(dt)))
        res = [next(grads).to(t.dtype) if x.requires_grad else None
               for t, x in zip((q, k, v), leaves)]
        return (None, None, None, None, None, *res)


_LINEAR_MODULES: dict = {}
# Triton launch: 32-token blocks and 32 value channels per program keep the kernel free of
# register spills for head dims 64 and 128 on sm_80 and sm_90 (float32, float16, bfloat16;
# checked with `attncc.runtime.aot`, see docs/LINEAR.md).
TRITON_BLOCK = 32
TRITON_MAX_DV = 32


def run_linear_forward(q, k, v, log_r, *, scale: float, options, block: int = TRITON_BLOCK,
                       max_dv: int = TRITON_MAX_DV):
    """out [B, H, L, Dv] (q's dtype) of the Triton linear kernel (`attncc.codegen.linear`):
    out[p] = scale · Σ_{k <= p} r_h^(p - k) (q_p · k_k) v_k for q, k [B, H, L, D],
    v [B, H, L, Dv] of one dtype on one device (CUDA, or CPU under TRITON_INTERPRET=1),
    log_r [H] (<= 0)."""
    from ..codegen.linear import block_sizes, generate_linear_forward
    from .launch import load_kernel
    key = (options.num_warps, options.num_stages)
    module = _LINEAR_MODULES.get(key)
    if module is None:
        module = _LINEAR_MODULES[key] = load_kernel(generate_linear_forward(options))
    B, H, L, D = q.shape
    Dv = v.shape[-1]
    out = torch.empty(B, H, L, Dv, dtype=q.dtype, device=q.device)
    consts = block_sizes(D, Dv, block, max_dv)
    lr = log_r.to(device=q.device, dtype=torch.float32).contiguous()
    grid = (B * H, -(-Dv // consts["BLOCK_DV"]))
    dot_fp32 = q.dtype == torch.float32 or (q.device.type == "cpu" and q.dtype == torch.bfloat16)
    module.KERNEL[grid](q, k, v, out, lr, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
                        L, H, D, Dv, float(scale), **consts, DOT_FP32=dot_fp32,
                        num_warps=module.META["num_warps"],
                        num_stages=module.META["num_stages"])
    return out


def run_linear_backward(q, k, v, dout, log_r, scale: float, *, options,
                        block: int = TRITON_BLOCK, slice_: int = TRITON_MAX_DV):
    """(dq, dk, dv) of `run_linear_forward`'s output for the incoming gradient dout
    [B, H, L, Dv], by the three Triton backward kernels (`codegen.linear.
    generate_linear_backward`); tensors as in `run_linear_forward`, gradients in their dtypes."""
    from ..codegen.linear import block_sizes, generate_linear_backward
    from .launch import load_kernel
    key = ("bwd", options.num_warps, options.num_stages)
    module = _LINEAR_MODULES.get(key)
    if module is None:
        module = _LINEAR_MODULES[key] = load_kernel(generate_linear_backward(options))
    B, H, L, D = q.shape
    Dv = v.shape[-1]
    c = block_sizes(D, Dv, block, max_dv=1 << 30)      # full (power-of-two) head dims
    full_dv = c["BLOCK_DV"]
    if q.dtype == torch.float32 and max(c["BLOCK_D"], full_dv) > 64 and block > 16:
        # float32 tiles of 128 channels: 16-token blocks keep sm_80/sm_90 free of spills
        block = 16
        c = block_sizes(D, Dv, block, max_dv=1 << 30)
    ds, dvs = min(slice_, c["BLOCK_D"]), min(slice_, full_dv)
    lr = log_r.to(device=q.device, dtype=torch.float32).contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dot_fp32 = q.dtype == torch.float32 or (q.device.type == "cpu" and q.dtype == torch.bfloat16)
    launch = dict(num_warps=module.META["num_warps"], num_stages=module.META["num_stages"])
    rest = (L, H, D, Dv, float(scale))
    module.DQ_KERNEL[(B * H, -(-D // ds))](
        k, v, dout, dq, lr, *k.stride(), *v.stride(), *dout.stride(), *dq.stride(), *rest,
        BLOCK=block, BLOCK_DS=ds, BLOCK_DV=full_dv, DOT_FP32=dot_fp32, **launch)
    module.DK_KERNEL[(B * H, -(-D // ds))](
        q, v, dout, dk, lr, *q.stride(), *v.stride(), *dout.stride(), *dk.stride(), *rest,
        BLOCK=block, BLOCK_DS=ds, BLOCK_DV=full_dv, DOT_FP32=dot_fp32, **launch)
    module.DV_KERNEL[(B * H, -(-Dv // dvs))](
        q, k, dout, dv, lr, *q.stride(), *k.stride(), *dout.stride(), *dv.stride(), *rest,
        BLOCK=block, BLOCK_D=c["BLOCK_D"], BLOCK_DVS=dvs, DOT_FP32=dot_fp32, **launch)
    return dq, dk, dv


def _triton_kernel(kern):
    """(q', k', v', log_r) -> out by the generated Triton linear kernel, autograd-capable."""
    block = kern.options.block_m  # of the torch recomputation in backward

    def fwd(q, k, v, log_r, scale):
        return run_linear_forward(q, k, v, log_r, scale=scale, options=kern.options)

    def bwd(q, k, v, dout, log_r, scale):
        return run_linear_backward(q, k, v, dout, log_r, scale, options=kern.options)

    def call(q, k, v, log_r, scale):
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            return _TritonLinear.apply(fwd, bwd, block, scale, log_r, q, k, v)
        return fwd(q, k, v, log_r, scale)
    return call


# ---- entry points ------------------------------------------------------------------------------

def algorithm(pattern, heads: int, q_len: int, kv_len: int) -> LinearDecision:
    """Which algorithm a `normalize none` call of this shape runs, and why."""
    return decide(pattern, heads, q_len, kv_len)[0]


def run_none(kern, backend: str, q, k, v, inputs: dict, scale: float, need_lse: bool,
             grad: bool = False):
    """(out in q's dtype [B, Hq, Lq, Dv], lse float32 [B, Hq, Lq] or None) of a `normalize
    none` pattern by `backend`; arguments already validated by `Kernel.__call__`. With `grad`
    (some input requires grad) the result is differentiable: the linear paths and the torch
    quadratic path directly, the generated quadratic kernel through its generated dQ and
    dK/dV kernels (`runtime.autograd.GeneratedAttention`, no softmax)."""
    pattern = kern.pattern
    B, Hq, Lq = q.shape[0], q.shape[1], q.shape[2]
    Lkv = k.shape[2]
    if backend == "reference":
        from ..reference import reference
        out, lse = reference(pattern, q, k, v, scale=scale, return_lse=True, **inputs)
        return out.to(q.dtype), (lse.to(torch.float32) if need_lse else None)
    dec, values = decide(pattern, Hq, Lq, Lkv)
    kern.last_algorithm = dec
    if dec.linear:
        c, log_r = values
        d = dec.form.offset(Lq, Lkv)
        fwd = _triton_kernel(kern) if backend in ("triton", "interpret") else None
        out, _ = linear_attention(q, k, v, c, log_r, d, scale, block=kern.options.block_m,
                                  kernel=fwd)
        lse = None
        if need_lse:
            row = torch.arange(Lq, device=q.device) + d >= 0
            lse = torch.where(row, 0.0, float("-inf")).to(torch.float32).expand(B, Hq, Lq)
        return out.to(q.dtype), lse
    if backend in ("triton", "interpret"):
        if grad:  # the generated dQ and dK/dV kernels, without softmax
            from .autograd import GeneratedAttention
            out, lse = GeneratedAttention.apply(kern, backend, scale, need_lse, tuple(inputs),
                                                q, k, v, *inputs.values())
            return out.to(q.dtype), (lse.to(torch.float32) if need_lse else None)
        from .compile import RUNNERS
        out, lse = RUNNERS[backend](kern, q, k, v, inputs, scale, True)
        return out.to(q.dtype), (lse.to(torch.float32) if need_lse else None)
    sched = kern.schedule(Lq, Lkv, Hq)
    if sched.runtime:  # data-dependent selectors: dense evaluation
        from ..reference import reference
        out, lse = reference(pattern, q, k, v, scale=scale, return_lse=True, **inputs)
        return out.to(q.dtype), (lse.to(torch.float32) if need_lse else None)
    out, kept = quadratic_none(pattern, sched, q, k, v, inputs, scale)
    lse = torch.where(kept, 0.0, float("-inf")).to(torch.float32) if need_lse else None
    return out.to(q.dtype), lse


def step(kern, state: Optional[torch.Tensor], q, k, v, *, scale: Optional[float] = None):
    """Recurrent (decode) form of a separable `normalize none` pattern.

    state  None (no earlier tokens) or float32 [B, Hq, D, Dv]: Σ_k r_h^(t-k) k_kᵀ v_k over the
           tokens so far (t the last one), as returned by the previous call
    q      [B, Hq, n, D], k [B, Hkv, n, D], v [B, Hkv, n, Dv]: the next n >= 1 tokens (queries
           at the same positions as their keys, `causal` with equal lengths)
    Returns (out [B, Hq, n, Dv] in q's dtype, new state float32 [B, Hq, D, Dv]).
    Per token: Z ← r_h Z + k vᵀ, out = c_h · scale · q Z (n tokens at once by the chunked
    algorithm). Raises InputError for a pattern that is not separable."""
    B, Hq, Hkv, Lq, Lkv, D, Dv = check_qkv(q, k, v)
    if Lq != Lkv:
        raise InputError(f"step takes as many queries as keys, got {Lq} and {Lkv}")
    dec, values = decide(kern.pattern, Hq, Lq, Lkv)
    if not dec.linear or dec.form.offset(Lq, Lkv) != 0:
        why = dec.reason if not dec.linear else "the mask is not `k <= q` (causal)"
        raise InputError(f"pattern '{kern.pattern.name}' has no recurrent form: {why}")
    if state is not None:
        if not isinstance(state, torch.Tensor) or tuple(state.shape) != (B, Hq, D, Dv):
            got = tuple(state.shape) if isinstance(state, torch.Tensor) else type(state).__name__
            raise InputError(f"state must be a tensor [B, Hq, D, Dv] = {[B, Hq, D, Dv]}, "
                             f"got {got}")
    scale = kern._scale(scale, D)
    c, log_r = values
    if state is None:
        state = q.new_zeros(B, Hq, D, Dv, dtype=_compute_dtype(q))
    out, final = linear_attention(q, k, v, c, log_r, 0, scale, block=kern.options.block_m,
                                  state=state)
    return out.to(q.dtype), final.to(torch.float32 if q.dtype != torch.float64 else q.dtype)


def aot_case(head_dim: int = 64, head_dim_v: Optional[int] = None, dtype: str = "bfloat16",
             batch: int = 2, heads: int = 8, q_len: int = 4096, block: int = TRITON_BLOCK,
             num_warps: int = 4, num_stages: int = 2, max_dv: int = TRITON_MAX_DV) -> None:
    """Entry for `attncc.runtime.aot.run_jobs` ("attncc.runtime.linear:aot_case"): the CUDA
    launch path of the linear kernel on CPU tensors (the AOT worker captures the launch)."""
    from .options import CompileOptions
    dt = getattr(torch, dtype)
    dv = head_dim if head_dim_v is None else head_dim_v
    q = torch.randn(batch, heads, q_len, head_dim).to(dt)
    k = torch.randn(batch, heads, q_len, head_dim).to(dt)
    v = torch.randn(batch, heads, q_len, dv).to(dt)
    log_r = -torch.rand(heads, dtype=torch.float64)
    run_linear_forward(q, k, v, log_r, scale=head_dim ** -0.5, block=block, max_dv=max_dv,
                       options=CompileOptions(num_warps=num_warps, num_stages=num_stages))


def aot_backward_case(head_dim: int = 64, head_dim_v: Optional[int] = None,
                      dtype: str = "bfloat16", batch: int = 2, heads: int = 8, q_len: int = 4096,
                      num_warps: int = 4, num_stages: int = 2, block: int = TRITON_BLOCK) -> None:
    """Entry for `attncc.runtime.aot.run_jobs` ("attncc.runtime.linear:aot_backward_case"): the
    three backward launches of the linear kernel on CPU tensors (captured, not run)."""
    from .options import CompileOptions
    dt = getattr(torch, dtype)
    dv = head_dim if head_dim_v is None else head_dim_v
    q, k = (torch.randn(batch, heads, q_len, head_dim).to(dt) for _ in range(2))
    v, dout = (torch.randn(batch, heads, q_len, dv).to(dt) for _ in range(2))
    run_linear_backward(q, k, v, dout, -torch.rand(heads, dtype=torch.float64), head_dim ** -0.5,
                        options=CompileOptions(num_warps=num_warps, num_stages=num_stages),
                        block=block)
