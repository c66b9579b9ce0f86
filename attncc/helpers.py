"""Helpers that build the runtime inputs of data-dependent patterns.

    weight = moh_weights(router_logits, topk=2, shared=2)    # specs/moh.attn: weight[b, q, h]
    doc    = document_ids([[5, 3], [8]], total_len=8)        # specs/document.attn: doc[b, k]
    offs   = document_offsets([[5, 3], [8]])                 # [[0, 5, 8], [0, 8, 8]]
    k2, v2 = hilo_kv(k, v, height=16, width=16, pool=2)      # specs/hilo.attn: full + pooled keys

Every function validates its arguments and raises `HelperError` (a `ValueError`) naming the
offending argument; all tensor work stays on the argument's device.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch

__all__ = ["HelperError", "moh_weights", "document_ids", "document_offsets",
           "check_document_ids", "cluster_ids", "moba_blocks", "combiner_kv", "hilo_kv"]

Lengths = Union[torch.Tensor, Sequence[int], Sequence[Sequence[int]]]


class HelperError(ValueError):
    """A helper argument has the wrong type, shape, dtype or values."""


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def moh_weights(router_logits: torch.Tensor, topk: int, shared: int = 0) -> torch.Tensor:
    """Mixture-of-heads weights (MoH, Jin et al. 2024) for `output scale weight[b, q, h]`.

    router_logits float [B, L, H] → weights [B, L, H] in the logits' dtype. Heads 0..shared-1
    are shared: weight 1 for every token. For the routed heads r = shared..H-1, per token:

        p_r = softmax(router_logits[..., shared:])_r
        keep = the `topk` routed heads of highest p (ties to the lower head index)
        w_r = p_r / Σ_{r' ∈ keep} p_r'   if r ∈ keep,   else 0

    so the kept routed weights sum to 1 and every other routed head has weight exactly 0
    (attncc skips a head on a query tile where all its weights are 0).
    Requires 0 <= shared <= H and 0 <= topk <= H - shared; NaN logits are rejected.
    """
    if not isinstance(router_logits, torch.Tensor):
        raise HelperError(f"router_logits must be a torch.Tensor, got {type(router_logits).__name__}")
    if router_logits.dim() != 3:
        raise HelperError(f"router_logits must be 3-D [batch, seq_len, heads], got shape "
                          f"{list(router_logits.shape)}")
    if not router_logits.dtype.is_floating_point:
        raise HelperError(f"router_logits must be a floating-point tensor, got "
                          f"{str(router_logits.dtype).replace('torch.', '')}")
    H = router_logits.shape[-1]
    if not _is_int(shared) or not 0 <= shared <= H:
        raise HelperError(f"shared must be an int in [0, {H}] (the number of heads), got {shared!r}")
    routed = H - shared
    if not _is_int(topk) or not 0 <= topk <= routed:
        raise HelperError(f"topk must be an int in [0, {routed}] (the number of routed heads), "
                          f"got {topk!r}")
    if bool(torch.isnan(router_logits).any()):
        raise HelperError("router_logits contains NaN")
    out = torch.zeros_like(router_logits)
    out[..., :shared] = 1
    if topk == 0:
        return out
    p = torch.softmax(router_logits[..., shared:].to(torch.float32), dim=-1)
    order = torch.sort(-p, dim=-1, stable=True).indices[..., :topk]
    kept = torch.zeros_like(p).scatter_(-1, order, p.gather(-1, order))
    out[..., shared:] = (kept / kept.sum(-1, keepdim=True)).to(out.dtype)
    return out


def _lengths_tensor(lengths: Lengths, device=None) -> torch.Tensor:
    """int64 [B, n_docs] from a tensor, a flat list (one batch) or a list of lists (ragged:
    shorter rows are padded with empty documents)."""
    if isinstance(lengths, torch.Tensor):
        if lengths.dtype.is_floating_point or lengths.dtype == torch.bool or lengths.is_complex():
            raise HelperError(f"lengths must be an integer tensor, got "
                              f"{str(lengths.dtype).replace('torch.', '')}")
        if lengths.dim() == 1:
            lengths = lengths[None]
        if lengths.dim() != 2:
            raise HelperError(f"lengths must be [batch, n_docs], got shape {list(lengths.shape)}")
        t = lengths.to(torch.int64)
    else:
        rows = list(lengths)
        if rows and all(_is_int(x) for x in rows):
            rows = [rows]
        for b, row in enumerate(rows):
            if isinstance(row, (str, bytes)) or not hasattr(row, "__iter__") \
                    or not all(_is_int(x) for x in row):
                raise HelperError(f"lengths[{b}] must be a list of ints, got {row!r}")
        width = max((len(r) for r in rows), default=0)
        t = torch.tensor([list(r) + [0] * (width - len(r)) for r in rows], dtype=torch.int64,
                         device=device).reshape(len(rows), width)
    if t.numel() and bool((t < 0).any()):
        b, j = (int(i) for i in (t < 0).nonzero()[0])
        raise HelperError(f"lengths[{b}][{j}] = {int(t[b, j])} is negative")
    return t


def document_offsets(lengths: Lengths) -> torch.Tensor:
    """Document start offsets: lengths [B, n_docs] (tensor, flat list or list of lists) →
    int32 [B, n_docs + 1] with offsets[b, 0] = 0 and offsets[b, j + 1] = offsets[b, j] +
    lengths[b, j]. Negative lengths raise HelperError."""
    t = _lengths_tensor(lengths)
    out = torch.zeros(t.shape[0], t.shape[1] + 1, dtype=torch.int64, device=t.device)
    out[:, 1:] = torch.cumsum(t, dim=1)
    return out.to(torch.int32)


def document_ids(lengths: Lengths, total_len: int) -> torch.Tensor:
    """Packed-document ids for `specs/document.attn`: lengths [B, n_docs] → int32 [B, total_len].

    Token t of batch b belongs to document j when offsets[b, j] <= t < offsets[b, j + 1]
    (`document_offsets`); empty documents (length 0) get no tokens; tokens past the last
    document are padding with id -1. Documents are numbered 0, 1, ... per batch row.
    Raises HelperError for negative lengths, a total_len that is not a non-negative int, or
    lengths of one batch row summing past total_len.

    Note: with the mask `causal & doc[b, q] == doc[b, k]` padding tokens (id -1) still see
    earlier padding tokens; add `& doc[b, q] >= 0` to a spec so that padding attends nothing.
    """
    if not _is_int(total_len) or total_len < 0:
        raise HelperError(f"total_len must be a non-negative int, got {total_len!r}")
    offsets = document_offsets(lengths).to(torch.int64)
    total = offsets[:, -1]
    if bool((total > total_len).any()):
        b = int((total > total_len).nonzero()[0])
        raise HelperError(f"lengths[{b}] sum to {int(total[b])}, more than total_len={total_len}")
    t = torch.arange(total_len, device=offsets.device, dtype=torch.int64)
    # Number of document ends at or before t = index of t's document.
    ids = torch.searchsorted(offsets[:, 1:].contiguous(), t.expand(offsets.shape[0], -1).contiguous(),
                             right=True)
    ids = torch.where(t[None] < total[:, None], ids, torch.full_like(ids, -1))
    return ids.to(torch.int32)


def check_document_ids(doc: torch.Tensor, *, batch: int, length: int, name: str = "doc") -> None:
    """Validate document ids passed to a pattern: an integer tensor [batch, length] whose
    values are -1 (padding) or non-negative ids. Raises HelperError naming `name`."""
    if not isinstance(doc, torch.Tensor):
        raise HelperError(f"{name} must be a torch.Tensor, got {type(doc).__name__}")
    if doc.dtype.is_floating_point or doc.dtype == torch.bool or doc.is_complex():
        raise HelperError(f"{name} must be an integer tensor, got "
                          f"{str(doc.dtype).replace('torch.', '')}")
    if tuple(doc.shape) != (batch, length):
        raise HelperError(f"{name} has shape {list(doc.shape)}, expected [{batch}, {length}]")
    if doc.numel() and bool((doc < -1).any()):
        b, t = (int(i) for i in (doc < -1).nonzero()[0])
        raise HelperError(f"{name}[{b}, {t}] = {int(doc[b, t])} is out of range "
                          "(ids are >= 0, or -1 for padding)")


def cluster_ids(x: torch.Tensor, centroids: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Routing Transformer cluster assignment (specs/routing.attn: qc[b, h, q], kc[b, h, k]).

    x [B, H, L, D] (queries or keys), centroids [H, C, D] (per-head k-means centroids) →
    int64 [B, H, L]: the index of the nearest centroid of each token. With `normalize` (the
    paper's choice) both are L2-normalised and the nearest centroid is the one of largest dot
    product; otherwise the smallest Euclidean distance (ties to the lower index)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise HelperError(f"x must be a float tensor [B, H, L, D], got "
                          f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if not isinstance(centroids, torch.Tensor) or centroids.dim() != 3 \
            or centroids.shape[0] != x.shape[1] or centroids.shape[2] != x.shape[3] \
            or centroids.shape[1] < 1:
        got = tuple(centroids.shape) if isinstance(centroids, torch.Tensor) else type(centroids).__name__
        raise HelperError(f"centroids must be a tensor [H, C, D] = [{x.shape[1]}, C >= 1, "
                          f"{x.shape[3]}] matching x, got {got}")
    c = centroids.to(device=x.device, dtype=x.dtype)
    if normalize:
        xs = torch.nn.functional.normalize(x, dim=-1)
        cs = torch.nn.functional.normalize(c, dim=-1)
        return torch.einsum("bhld,hcd->bhlc", xs, cs).argmax(-1)
    d = (x.unsqueeze(-2) - c[None, :, None]).pow(2).sum(-1)      # [B, H, L, C]
    return d.argmin(-1)


def moba_blocks(q: torch.Tensor, k: torch.Tensor, block: int, topk: int) -> torch.Tensor:
    """MoBA block selection as indices: chosen[b, h, q, topk] (the blocks that
    `route(region = block, topk = topk, query_region = 1, causal = true)` keeps, in
    specs/moba.attn, for inspection or for masks written with explicit block lists).

    q [B, Hq, Lq, D], k [B, Hkv, Lkv, D] (Hq % Hkv == 0; query head h reads key head
    h // (Hq // Hkv); queries aligned to the last Lq key positions) → int64 [B, Hq, Lq, topk]:
    for each query token the key blocks of `block` tokens ranked by q · mean(k over the block)
    in float64 (the last block averages its real tokens), blocks after the query's own
    excluded, its own block always first; ties to the lower block index; slots beyond the
    available blocks are -1."""
    if not (_is_int(block) and block >= 1 and _is_int(topk) and topk >= 1):
        raise HelperError(f"block and topk must be positive integers, got {block!r}, {topk!r}")
    if not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and q.dim() == 4
            and k.dim() == 4 and q.shape[0] == k.shape[0] and q.shape[3] == k.shape[3]
            and k.shape[1] >= 1 and q.shape[1] % k.shape[1] == 0):
        raise HelperError("q and k must be tensors [B, Hq, Lq, D] and [B, Hkv, Lkv, D] with "
                          "Hq % Hkv == 0")
    B, Hq, Lq, D = q.shape
    Lkv = k.shape[2]
    nb = -(-Lkv // block)
    kf = torch.nn.functional.pad(k.to(torch.float64), (0, 0, 0, nb * block - Lkv))
    counts = torch.full((nb,), float(block), dtype=torch.float64, device=k.device)
    counts[-1] = Lkv - (nb - 1) * block
    means = kf.view(B, k.shape[1], nb, block, D).sum(3) / counts[:, None]
    means = means.repeat_interleave(Hq // k.shape[1], 1)
    gate = q.to(torch.float64) @ means.transpose(-1, -2)             # [B, Hq, Lq, nb]
    own = (torch.arange(Lq, device=q.device) + (Lkv - Lq)).div(block, rounding_mode="floor")
    blocks = torch.arange(nb, device=q.device)
    gate = gate.masked_fill(blocks[None, :] > own[:, None], float("-inf"))
    gate = torch.where(blocks[None, :] == own[:, None], float("inf"), gate)
    order = torch.sort(gate, dim=-1, descending=True, stable=True).indices[..., :topk]
    valid = torch.gather(gate, -1, order) > float("-inf")
    out = torch.where(valid, order, -1)
    if out.shape[-1] < topk:
        out = torch.nn.functional.pad(out, (0, topk - out.shape[-1]), value=-1)
    return out


def combiner_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment: int,
                scale=None, pool: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of Combiner-Fixed (Ren et al. 2021; specs/combiner.attn): the tokens
    followed by one summary per segment of `segment` tokens, as in google-research/combiner
    `sqrt_fixed_full`.

    q [B, Hq, L, D], k [B, Hkv, L, D], v [B, Hkv, L, Dv] (Hq % Hkv == 0) →
    (keys [B, Hq, L + n, D], values [B, Hq, L + n, Dv]) in k's / v's dtype, n = ⌈L / segment⌉,
    with the key heads repeated to the Hq query heads (a summary value depends on the query
    head). Segment r holds tokens r·segment .. min(L, (r + 1)·segment) − 1 (the last may be
    shorter); with `pool` "mean" (or "max", elementwise over the segment's tokens):

        keys[L + r]   = k̄_r = pool(K_r)
        values[L + r] = v̄_r = Σ_{j ∈ r} softmax_j(q̄_r · k_j · scale) · v_j,   q̄_r = pool(Q_r)

    `scale` defaults to 1/sqrt(D), the scale the kernel's call uses (pass the same). Computed
    in float32 (float64 for float64 inputs); differentiable in q, k and v. Call the pattern
    with q and these keys and values: KV_LEN = L + n."""
    if not (_is_int(segment) and segment >= 1):
        raise HelperError(f"segment must be a positive integer, got {segment!r}")
    if pool not in ("mean", "max"):
        raise HelperError(f"pool must be 'mean' or 'max', got {pool!r}")
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 and t.is_floating_point()
               for t in (q, k, v)) or k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0] \
            or q.shape[2] != k.shape[2] or q.shape[3] != k.shape[3] or k.shape[1] < 1 \
            or q.shape[1] % k.shape[1]:
        raise HelperError("q, k, v must be float tensors [B, Hq, L, D], [B, Hkv, L, D], "
                          "[B, Hkv, L, Dv] with Hq % Hkv == 0")
    B, Hq, L, D = q.shape
    g = Hq // k.shape[1]
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = D ** -0.5 if scale is None else float(scale)
    n = -(-L // segment)
    pad = n * segment - L
    kk = k.to(dt).repeat_interleave(g, 1)
    vv = v.to(dt).repeat_interleave(g, 1)
    real = torch.arange(n * segment, device=q.device) < L                   # [n·segment]

    def segs(x, fill):
        x = torch.nn.functional.pad(x, (0, 0, 0, pad), value=fill)
        return x.view(B, Hq, n, segment, x.shape[-1])

    counts = real.view(n, segment).sum(-1).to(dt)[:, None]                  # [n, 1]
    if pool == "mean":
        qbar = segs(q.to(dt), 0.0).sum(3) / counts
        kbar = segs(kk, 0.0).sum(3) / counts
    else:
        qbar = segs(q.to(dt), float("-inf")).amax(3)
        kbar = segs(kk, float("-inf")).amax(3)
    logits = (segs(kk, 0.0) @ qbar[..., None])[..., 0] * scale              # [B, H, n, segment]
    logits = logits.masked_fill(~real.view(n, segment), float("-inf"))
    vbar = (torch.softmax(logits, -1)[..., None] * segs(vv, 0.0)).sum(3)    # [B, H, n, Dv]
    keys = torch.cat([kk, kbar], 2).to(k.dtype)
    values = torch.cat([vv, vbar], 2).to(v.dtype)
    return keys, values


def hilo_kv(k: torch.Tensor, v: torch.Tensor, *, height: int, width: int,
            pool: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of `specs/hilo.attn` (HiLo, LITv2): the full-resolution map followed by
    its average pooling over non-overlapping pool × pool windows.

    k [B, Hkv, height·width, D], v [B, Hkv, height·width, Dv] (tokens row-major over the
    height × width map) → (k', v') [B, Hkv, height·width + ⌊height/pool⌋·⌊width/pool⌋, D(v)]
    in the inputs' dtype. Pooled token (i, j) (row-major over the pooled map) is the mean of
    map rows pool·i .. pool·i + pool − 1 and columns pool·j .. pool·j + pool − 1; rows and
    columns beyond the last whole window are left out, as `torch.nn.AvgPool2d(pool)` does.
    Pooling k and v equals pooling the features before a linear projection (LITv2 pools x)."""
    for name, t in (("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise HelperError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise HelperError(f"{name} must be 4-D [batch, heads, height*width, dim], got shape "
                              f"{list(t.shape)}")
        if not t.dtype.is_floating_point:
            raise HelperError(f"{name} must be a floating-point tensor, got "
                              f"{str(t.dtype).replace('torch.', '')}")
    for name, x in (("height", height), ("width", width), ("pool", pool)):
        if not _is_int(x) or x < 1:
            raise HelperError(f"{name} must be a positive int, got {x!r}")
    if pool > min(height, width):
        raise HelperError(f"pool {pool} exceeds the map {height} x {width}")
    if k.shape[2] != height * width or v.shape[2] != height * width:
        raise HelperError(f"k and v must hold height*width = {height * width} tokens, got "
                          f"{k.shape[2]} and {v.shape[2]}")
    if k.shape[:2] != v.shape[:2]:
        raise HelperError(f"k {list(k.shape)} and v {list(v.shape)} differ in batch or heads")
    out = []
    for t in (k, v):
        B, H, _, D = t.shape
        hp, wp = height // pool, width // pool
        grid = t.reshape(B, H, height, width, D)[:, :, :hp * pool, :wp * pool]
        pooled = grid.reshape(B, H, hp, pool, wp, pool, D).to(torch.float32).mean((3, 5))
        out.append(torch.cat([t, pooled.reshape(B, H, hp * wp, D).to(t.dtype)], 2))
    return out[0], out[1]
