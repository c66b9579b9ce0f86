"""Block-level attention scores for gate training (SeerAttention, Gao et al. 2024,
"SeerAttention: Learning Intrinsic Sparse Attention in Your LLMs", arXiv 2410.13276).

SeerAttention trains its gate network against the block-level ground truth of the attention
map: the softmax probabilities P[b, h, q, k] = exp(score(q, k) - lse[q]) (0 where the mask
drops the pair) pooled over every (query block, key block) of β tokens — max-pooled as in the
paper, or the mean over the block's real (q, k) pairs:

    out, scores = kern(q, k, v, return_block_scores=64)               # max pooling
    out, scores = kern(q, k, v, return_block_scores=64, block_scores_pool="mean")
    scores: float32 [B, Hq, ceil(Lq / β), ceil(Lkv / β)], no gradient

Only kept tiles are visited; P needs each row's final lse, so the scores come from a second
pass over the forward's key-tile lists (QKᵀ, mask and score modifier; no P·V):

* backends "triton" / "interpret" (no gradient needed): inside the generated forward kernel,
  behind the constexpr `BLOCK_SCORES` (the default launch compiles the pass away). 1-D tiles
  whose sizes divide β are required, so every tile lies in one block: the call uses the
  kernel's own tiles when they do, else 1-D tiles of the largest power of two >= 16 dividing
  β (`aligned_options`; grid layouts, whose tiles are boxes, take the torch pass below unless
  their options ask for 1-D tiles). Max: one float atomic max per tile into the output (exact
  and order-independent); mean: one partial sum per (query tile, key tile), summed in a fixed
  order here (no float atomic adds: two runs are bit-identical).
* backend "torch" (and the default CPU choice): the block-sparse torch forward, then the same
  second pass over its tile lists (`pooled_scores`), O(kept tiles) work and memory.
* other backends ("flex", "dense", generated kernels under autograd or with grid tiles, or β
  with no power-of-two divisor >= 16): their forward, then `pooled_scores` with the lse they
  return.
* "reference": `block_scores` below, dense float64 (the definition, O(β·Lkv) memory per block).

(batch, head, query tile) triples that an `output scale` skips (all weights zero) have lse
-inf, so their block scores are 0, on every backend.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..ir.inputs import InputError
from ..ir.nodes import Blocks, Route, Var, walk

__all__ = ["block_scores", "call_with_block_scores", "pooled_scores", "aligned_options",
           "KernelScores", "POOLS"]

POOLS = ("max", "mean")


def check_args(block, pool):
    """Raise InputError unless `block` is a positive int and `pool` one of POOLS."""
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise InputError(f"return_block_scores must be a positive block size in tokens, got "
                         f"{block!r}")
    if pool not in POOLS:
        raise InputError(f"block_scores_pool must be 'max' or 'mean', got {pool!r}")


def _counts(n: int, block: int, device) -> torch.Tensor:
    """Real tokens of each of the ceil(n / block) blocks (float32 [nb])."""
    nb = -(-n // block)
    c = torch.full((nb,), float(block), device=device)
    if nb:
        c[-1] = n - (nb - 1) * block
    return c


def _mean(sums: torch.Tensor, Lq: int, Lkv: int, block: int) -> torch.Tensor:
    cq, ck = _counts(Lq, block, sums.device), _counts(Lkv, block, sums.device)
    return sums / (cq[:, None] * ck[None, :])


# ---- the definition (dense float64) ---------------------------------------------------------

def block_scores(pattern, q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, inputs: dict,
                 scale: float, block: int, pool: str = "max") -> torch.Tensor:
    """Pooled softmax probabilities float32 [B, Hq, ceil(Lq/β), ceil(Lkv/β)] for q
    [B, Hq, Lq, D], k [B, Hkv, Lkv, D] and the forward's lse [B, Hq, Lq] (rows without a kept
    key, lse -inf, have probability 0), evaluated densely over β-row query blocks against all
    keys with the dense IR evaluator (the reference semantics; O(Lq·Lkv) time)."""
    from ..ir.dense import Evaluator, dense_mask
    check_args(block, pool)
    B, Hq, Lq, D = q.shape
    Lkv = k.shape[2]
    dev = q.device
    group = Hq // k.shape[1]
    kf = k.detach().to(torch.float64).repeat_interleave(group, 1)
    qf = q.detach().to(torch.float64)
    lse = lse.detach().to(torch.float64)
    nq, nk = -(-Lq // block), -(-Lkv // block)
    pad_k = nk * block - Lkv
    full_mask = None
    if any(isinstance(n, (Route, Blocks)) for n in walk(pattern.mask)):
        extra = dict(inputs)
        if any(isinstance(n, Route) for n in walk(pattern.mask)):
            extra.update({n: t for n, t in (("query", q), ("key", k)) if n not in extra})
        full_mask = dense_mask(pattern, q_len=Lq, kv_len=Lkv, heads=Hq, batch=B, inputs=extra,
                               device=dev)
    out = torch.zeros(B, Hq, nq, nk, dtype=torch.float64, device=dev)
    ar = lambda n, lo=0: torch.arange(lo, lo + n, device=dev)  # noqa: E731
    env = {"b": ar(B).view(-1, 1, 1, 1), "h": ar(Hq).view(1, -1, 1, 1),
           "k": ar(Lkv).view(1, 1, 1, -1), "Q_LEN": Lq, "KV_LEN": Lkv, "HEADS": Hq}
    for i in range(nq):
        r0, r1 = i * block, min(Lq, (i + 1) * block)
        s = (qf[:, :, r0:r1] @ kf.transpose(-1, -2)) * scale
        ev = Evaluator(dict(env, q=ar(r1 - r0, r0).view(1, 1, -1, 1), s=s),
                       layout=pattern.layout, inputs=inputs, device=dev)
        keep = full_mask[:, :, r0:r1] if full_mask is not None else ev.evaluate(pattern.mask)
        if pattern.score is not None:
            s = ev.evaluate(pattern.score).to(torch.float64).expand(s.shape)
        row_lse = lse[:, :, r0:r1, None]
        p = torch.where(keep & torch.isfinite(row_lse), torch.exp(s - row_lse.nan_to_num(0.0,
                        neginf=0.0)), torch.zeros((), dtype=torch.float64, device=dev))
        p = torch.nn.functional.pad(p, (0, pad_k)).view(B, Hq, r1 - r0, nk, block)
        out[:, :, i] = p.amax(dim=(2, 4)) if pool == "max" else p.sum(dim=(2, 4))
    if pool == "mean":
        out = _mean(out, Lq, Lkv, block)
    return out.to(torch.float32)


# ---- the second pass in torch (any backend's lse) -------------------------------------------

def _score_fn(pattern, inputs: dict, q_len: int, kv_len: int, heads: int, dtype):
    from ..ir.lower_torch import to_score_mod
    if pattern.score is None or (isinstance(pattern.score, Var) and pattern.score.name == "s"):
        return None
    return to_score_mod(pattern, {n: t.detach() for n, t in inputs.items()}, q_len=q_len,
                        kv_len=kv_len, heads=heads, float_dtype=dtype)


def pooled_scores(pattern, plan, q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor,
                  inputs: dict, scale: float, block: int, pool: str) -> torch.Tensor:
    """Block scores float32 [B, Hq, ceil(Lq/β), ceil(Lkv/β)] from the torch backend's tile
    lists `plan` (`attncc.runtime.torch_backend.plan_lists`) and the forward's lse
    [B, Hq, Lq]: the kept tiles' scores are recomputed slab by slab (no P·V), P = exp(s − lse)
    is reduced per tile when the tiles are 1-D runs whose sizes divide β, else per token
    pair into its block (`scatter_reduce`); memory O(one slab + the output)."""
    from .torch_backend import _Slabs, _cdtype, _scores, _tiles
    B, Hq, Lq, _ = q.shape
    Hkv, Lkv = k.shape[1], k.shape[2]
    cdt = _cdtype(q.dtype)
    nqb, nkb = -(-Lq // block), -(-Lkv // block)
    score_fn = _score_fn(pattern, inputs, Lq, Lkv, Hq, cdt)
    slabs = _Slabs(plan, B, Hq, Hkv, None)
    qt = _tiles(q.detach(), plan.q_tok, cdt, plan.q_contig) * scale
    kt = _tiles(k.detach(), plan.k_tok, cdt, plan.k_contig)
    lse_c = lse.detach().to(cdt)
    lse_c = torch.where(torch.isfinite(lse_c), lse_c, torch.full_like(lse_c, math.inf))
    lse_t = _tiles(lse_c, plan.q_tok, cdt, plan.q_contig)               # [B, H, nQT, Sq]
    sq, sk = slabs.sq, slabs.sk
    tiled = plan.q_contig and plan.k_contig and block % sq == 0 and block % sk == 0
    out = torch.zeros(B, Hq, nqb * nkb, dtype=cdt, device=q.device)
    reduce = "amax" if pool == "max" else "sum"
    zero = torch.zeros((), dtype=cdt, device=q.device)
    for t0, t1, slab_iter in slabs.chunks():
        qtok = plan.q_tok[t0:t1]
        qreal, qc = qtok >= 0, qtok.clamp(min=0)
        qg, lse_g = qt[:, :, t0:t1], lse_t[:, :, t0:t1, :, None]
        for ktok, kreal, full, ent, _ in slab_iter:
            s = _scores(slabs, qg, slabs.gather(kt, ent), score_fn, qc, ktok)
            keep = slabs.keep(qc, qreal, ktok, kreal, full)
            if tiled and pool == "max":
                # exp increases: a tile's largest P is exp(row max - lse) of one of its rows
                if keep is not None:
                    s = s.masked_fill(~keep, -math.inf)
                G, Ec = s.shape[2], ent.shape[-1]
                rmax = s.reshape(B, Hq, G, sq, Ec, sk).amax(-1)          # [B, H, G, Sq, Ec]
                p = torch.exp(rmax - lse_g).amax(3)                      # [B, H, G, Ec]
            else:
                p = torch.exp(s - lse_g)                                 # [B, H, G, Sq, N]
                if keep is not None:
                    p = torch.where(keep, p, zero)
            if tiled:  # one value per (query tile, listed key tile), then into its block
                G, Ec = p.shape[2], ent.shape[-1]
                if pool != "max":
                    p = p.view(B, Hq, G, sq, Ec, sk).sum((3, 5))          # [B, H, G, Ec]
                qb = (torch.arange(t0, t1, device=q.device) * sq // block).view(-1, 1)
                idx = qb * nkb + ent * sk // block
            else:  # token pairs into their blocks
                idx = (qc // block).view(1, 1, *qc.shape, 1) * nkb + (ktok // block)[..., None, :]
            idx = torch.broadcast_to(idx, p.shape).reshape(B, Hq, -1)
            out.scatter_reduce_(2, idx, p.reshape(B, Hq, -1), reduce)
    out = out.view(B, Hq, nqb, nkb)
    if pool == "mean":
        out = _mean(out, Lq, Lkv, block)
    return out.to(torch.float32)


# ---- inside the generated kernel ------------------------------------------------------------

def aligned_options(options, block: int, layout, head_dim: int = 64):
    """CompileOptions for a forward launch with the block-score pass: 1-D tiles that divide
    `block` — the options' own when they do, else the largest powers of two >= 16 dividing
    `block` and at most the options' sizes — and 8 warps for head dims above 64 (with 4, the
    pass of t5_bias at head dim 128 spills 404 B on sm_90 and music_transformer 24 B; none do
    with 8). None when `block` has no such divisor, or the pattern has a grid layout whose
    options do not ask for 1-D tiles (its tiles are boxes, not runs of β tokens)."""
    if layout is not None and not options.tile_1d:
        return None

    def fit(size):
        t = size
        while t >= 16 and block % t:
            t //= 2
        return t if t >= 16 else None
    bm, bn = fit(options.block_m), fit(options.block_n)
    if bm is None or bn is None:
        return None
    warps = max(options.num_warps, 8) if head_dim > 64 else options.num_warps
    if (bm, bn, warps) == (options.block_m, options.block_n, options.num_warps):
        return options
    return options.replace(block_m=bm, block_n=bn, num_warps=warps, autotune=False)


class KernelScores:
    """The block-score buffer of one kernel launch and its reduction.

    max:  int32 view of float32 [B, Hq, nqb, nkb] zeros; the kernel's atomic max per tile
    mean: float32 [B, Hq, nQT, nKT] zeros; the kernel stores each visited tile's sum, `result`
          adds the tiles of each block in a fixed order and divides by the block's pairs
    `launch` is the keyword arguments `attncc.runtime.launch.run_forward(block_scores=...)`
    passes to the kernel launch. On compute capability 8.x (`capability`, default: q's CUDA
    device) it adds `maxnreg=255`: the hardware limit, so no cap, but without it ptxas holds
    some of these kernels to 168 registers on sm_80 (3 blocks per SM) and spills 8-16 B
    (alibi, gna, natten2d, dilated_1d, mmdit_natten; 179-188 registers with it). On sm_90
    they do not spill without it, and it would raise causal from 128 to 180 registers."""

    def __init__(self, shape, block: int, pool: str, q_tile: int, kv_tile: int, device,
                 capability=None):
        B, Hq, Lq, Lkv = shape
        self.shape, self.block, self.pool = shape, block, pool
        self.nqb, self.nkb = -(-Lq // block), -(-Lkv // block)
        self.nqt, self.nkt = -(-Lq // q_tile), -(-Lkv // kv_tile)
        self.rq, self.rk = block // q_tile, block // kv_tile
        if pool == "max":
            self.buffer = torch.zeros(B, Hq, self.nqb, self.nkb, dtype=torch.float32,
                                      device=device)
            self.launch = dict(BS=self.buffer.view(torch.int32), BS_ROWS=self.nqb,
                               BS_COLS=self.nkb, BS_QDIV=self.rq, BS_KDIV=self.rk,
                               BLOCK_SCORES=1)
        else:
            self.buffer = torch.zeros(B, Hq, self.nqt, self.nkt, dtype=torch.float32,
                                      device=device)
            self.launch = dict(BS=self.buffer, BS_ROWS=self.nqt, BS_COLS=self.nkt, BS_QDIV=1,
                               BS_KDIV=1, BLOCK_SCORES=2)

        device = torch.device(device)
        if capability is None and device.type == "cuda":
            capability = torch.cuda.get_device_capability(device)
        if capability is not None and capability[0] == 8:
            self.launch["maxnreg"] = 255

    def result(self) -> torch.Tensor:
        """float32 [B, Hq, nqb, nkb]."""
        if self.pool == "max":
            return self.buffer
        B, Hq, Lq, Lkv = self.shape
        t = torch.nn.functional.pad(self.buffer, (0, self.nkb * self.rk - self.nkt,
                                                  0, self.nqb * self.rq - self.nqt))
        sums = t.view(B, Hq, self.nqb, self.rq, self.nkb, self.rk).sum((3, 5))
        return _mean(sums, Lq, Lkv, self.block)


def _kernel_path(kern, q, k, v, inputs, scale, block, pool, capability=None):
    """(out, lse, scores) from one generated-kernel launch with the block-score pass, or None
    when β has no power-of-two divisor >= 16. `capability`: the CUDA target (default: q's
    device; `aot_case` compiles for a named one)."""
    from .launch import run_forward
    from .prepass_kernel import kernel_forward, needs_prepass
    pattern = kern.pattern
    opts = aligned_options(kern.options, block, pattern.layout, max(q.shape[3], v.shape[3]))
    if opts is None:
        return None
    B, Hq, Lq, _ = q.shape
    Lkv = k.shape[2]
    target = KernelScores((B, Hq, Lq, Lkv), block, pool, opts.block_m, opts.block_n, q.device,
                          capability)
    if needs_prepass(pattern):
        out, lse, stats = kernel_forward(pattern, q, k, v, inputs, scale=scale, options=opts,
                                         block_scores=target.launch)
        kern.last_stats = stats.as_dict()
    else:
        bk = kern if opts is kern.options else kern.variant(opts)
        sched = bk.schedule(Lq, Lkv, Hq)
        out, lse = run_forward(bk._module(sched), sched, q, k, v, inputs=inputs, scale=scale,
                               options=opts, block_scores=target.launch)
    return out, lse, target.result()


# ---- the call ------------------------------------------------------------------------------

def call_with_block_scores(kern, backend: str, q, k, v, inputs: dict, scale: float, grad: bool,
                           block, pool: str):
    """`kern(q, k, v, return_block_scores=block, block_scores_pool=pool)` on `backend` with
    validated arguments: (out [B, Hq, Lq, Dv], lse float32 [B, Hq, Lq], scores float32
    [B, Hq, ceil(Lq/β), ceil(Lkv/β)]). See the module docstring for the paths."""
    check_args(block, pool)
    pattern = kern.pattern
    if pattern.normalize == "none":
        raise InputError("return_block_scores needs softmax probabilities; pattern "
                         f"'{pattern.name}' has `normalize none`")
    B, Hq, Lq, _ = q.shape
    Lkv = k.shape[2]
    if Lq == 0 or Lkv == 0:
        out, lse = kern._call(backend, q, k, v, inputs, scale, grad, True)
        scores = torch.zeros(B, Hq, -(-Lq // block), -(-Lkv // block), device=q.device)
        return out, lse, scores
    if backend in ("triton", "interpret") and not grad:
        with torch.no_grad():
            hit = _kernel_path(kern, q, k, v, inputs, scale, block, pool)
        if hit is not None:
            kern.last_block_scores = "kernel"
            return hit
    if backend == "reference":
        out, lse = kern._call(backend, q, k, v, inputs, scale, grad, True)
        kern.last_block_scores = "dense"
        with torch.no_grad():
            return out, lse, block_scores(pattern, q, k, lse, inputs, scale, block, pool)
    from .torch_backend import plan_lists, torch_attention
    detached = {n: t.detach() for n, t in inputs.items()}
    plan = plan_lists(pattern, q.detach(), k.detach(), detached, options=kern.options)
    if backend == "torch":
        out, lse, stats = torch_attention(pattern, q, k, v, inputs, scale=scale,
                                          options=kern.options, validate=False, plan=plan)
        kern.last_stats = stats
    else:
        out, lse = kern._call(backend, q, k, v, inputs, scale, grad, True)
    kern.last_block_scores = "tiles"
    with torch.no_grad():
        scores = pooled_scores(pattern, plan, q, k, lse, detached, scale, block, pool)
    return out, lse.to(torch.float32), scores


# ---- ahead-of-time compilation entry --------------------------------------------------------

def aot_case(spec: str, *, mode: str = "max", arch: int = 90, head_dim: int = 64,
             block: int = 64, dtype: str = "bfloat16", batch: int = 2, seed: int = 0,
             options: Optional[dict] = None) -> None:
    """Launch path for `attncc.runtime.aot.run_jobs` (entry
    "attncc.runtime.block_scores:aot_case"; the launches are captured, not run), on CPU
    tensors shaped by `Kernel.default_shape()`. mode "max" / "mean": the CUDA launch of
    `kern(q, k, v, return_block_scores=block, block_scores_pool=mode)`; "off": the default
    forward launch of the same source; "none": the source generated without the block-score
    pass (`generate_forward(..., block_scores=False)`), launched the same way. `arch`: the
    target the launch is made for (sm_`arch`); `options`: CompileOptions fields."""
    from .. import api
    from ..codegen.forward import generate_forward
    from .compile import Kernel
    from .launch import load_kernel, run_forward
    from .options import CompileOptions
    from .prepass_kernel import needs_prepass
    from .verify import random_inputs
    pattern = api.load(spec)
    kern = Kernel(pattern, CompileOptions(backend="triton", **(options or {})))
    n, _, heads = kern.default_shape()
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, n, head_dim, generator=gen).to(getattr(torch, dtype))
               for _ in range(3))
    inputs = random_inputs(pattern, batch=batch, heads=heads, q_len=n, kv_len=n, generator=gen)
    scale = head_dim ** -0.5
    if mode in POOLS:
        if _kernel_path(kern, q, k, v, inputs, scale, block, mode, (arch // 10, arch % 10)) is None:
            raise ValueError(f"no block-score kernel for block {block} (no power-of-two divisor "
                             ">= 16, or grid tiles)")
        return
    if needs_prepass(pattern):
        raise ValueError(f"mode {mode!r} launches the static schedule; pattern "
                         f"'{pattern.name}' needs the runtime pre-pass (use 'max' / 'mean')")
    sched = kern.schedule(n, n, heads)
    if mode == "off":
        module = kern._module(sched)
    elif mode == "none":
        module = load_kernel(generate_forward(pattern, sched, kern.options, block_scores=False))
    else:
        raise ValueError(f"mode must be 'max', 'mean', 'off' or 'none', got {mode!r}")
    run_forward(module, sched, q, k, v, inputs=inputs, scale=scale, options=kern.options)
