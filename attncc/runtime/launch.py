"""Loading and launching generated forward kernels.

`load_kernel(source, path)` writes generated Triton source to a real file (Triton's `@jit`
reads the function's source from disk) and imports it as a module. `run_forward(...)`
builds the launch arguments of a `codegen.forward` kernel from a Schedule and tensors and
runs it. Schedule tensors (concatenated CSR lists of every head class and the head-class
table) are built once per (schedule, device) and cached.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
import threading
import weakref
from typing import Optional

import torch

_LOCK = threading.Lock()
_DEVICE_LISTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


# Floating-point contraction (a*b+c → fma) for generated kernels, set explicitly: Triton 3.9
# warns that its default changes in 3.10. The kernels' exp2(x * scale - m) relies on it.
FP_FUSION = True


class LaunchError(ValueError):
    """Arguments do not fit the generated kernel (shapes, missing inputs, wrong schedule)."""


def _cache_dir() -> str:
    root = os.environ.get("ATTNCC_CACHE_DIR") \
        or os.path.join(tempfile.gettempdir(), "attncc-kernels")
    os.makedirs(root, exist_ok=True)
    return root


def _atomic_write(path: str, text: str) -> None:
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".py", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_kernel(source: str, path: Optional[str] = None):
    """Import generated kernel `source` as a module and return it.

    The source is written to `path` (default: `<cache dir>/<sha256 prefix>.py`, the cache
    dir being $ATTNCC_CACHE_DIR or a temp folder) unless a file with identical contents is
    already there; the write is atomic (temp file + os.replace). The module exposes
    `KERNEL` (the @triton.jit function) and `META` (launch metadata).
    """
    digest = hashlib.sha256(source.encode()).hexdigest()[:20]
    if path is None:
        path = os.path.join(_cache_dir(), f"attncc_{digest}.py")
    path = os.path.abspath(path)
    current = None
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            current = f.read()
    if current != source:
        _atomic_write(path, source)
    name = f"attncc_generated_{digest}"
    with _LOCK:
        module = sys.modules.get(name)
        if module is not None and getattr(module, "__file__", None) == path:
            return module
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(name, None)
            raise
    if not hasattr(module, "KERNEL") or not hasattr(module, "META"):
        raise LaunchError(f"{path} is not an attncc forward kernel (no KERNEL/META)")
    return module


def schedule_tensors(schedule, device) -> dict:
    """int32 launch tensors of `schedule` on `device`, cached per (schedule, device).

    full_offsets, partial_offsets   [n_classes * n_q_tiles + 1]: CSR row r = class * n_q_tiles + m
    full_indices, partial_indices   [max(nnz, 1)] key-tile indices (padded to one element)
    head_class                      [heads]
    """
    device = torch.device(device)
    with _LOCK:
        per = _DEVICE_LISTS.setdefault(schedule, {})
        hit = per.get(str(device))
    if hit is not None:
        return hit
    n_q = schedule.n_q_tiles
    out = {}
    for kind in ("full", "partial"):
        offsets, indices, base = [torch.zeros(1, dtype=torch.int64)], [], 0
        for cls in schedule.classes:
            csr = getattr(cls, kind)
            if csr.n_rows != n_q:
                raise LaunchError(f"head class lists have {csr.n_rows} rows for {n_q} query tiles")
            offsets.append(csr.offsets[1:].to(torch.int64) + base)
            indices.append(csr.indices.to(torch.int64))
            base += csr.nnz
        idx = torch.cat(indices) if indices else torch.zeros(0, dtype=torch.int64)
        if idx.numel() == 0:
            idx = torch.zeros(1, dtype=torch.int64)
        if base >= 2 ** 31:
            raise LaunchError("schedule has more than 2**31 tile entries")
        out[f"{kind}_offsets"] = torch.cat(offsets).to(torch.int32).to(device)
        out[f"{kind}_indices"] = idx.to(torch.int32).to(device)
    out["head_class"] = torch.tensor(schedule.head_class, dtype=torch.int32, device=device)
    with _LOCK:
        _DEVICE_LISTS.setdefault(schedule, {})[str(device)] = out
    return out


def _interpreted(module) -> bool:
    """True when the kernel runs in Triton's CPU interpreter (TRITON_INTERPRET=1), whose
    tl.dot does not support bfloat16 operands."""
    return type(module.KERNEL).__name__ == "InterpretedFunction"


def _block_d(d: int) -> int:
    return max(16, 1 << max(0, (d - 1).bit_length()))


def run_forward(module, schedule, q, k, v, *, inputs: dict, scale: float, options=None,
                out: Optional[torch.Tensor] = None, lse: Optional[torch.Tensor] = None,
                lists: Optional[dict] = None, block_scores: Optional[dict] = None):
    """Run the generated forward kernel of `module` (from `load_kernel`).

    q [B, Hq, Lq, D], k [B, Hkv, Lkv, D], v [B, Hkv, Lkv, Dv] in float16/bfloat16/float32
    on one device (any strides); `inputs` maps each input the kernel reads (META["inputs"])
    to its tensor; `scale` is the softmax scale (> 0: the kernel takes row maxima of unscaled
    scores and folds the scale into the exp2 argument); `options` (CompileOptions) gives warps and
    stages on GPU (default: the values the kernel was generated with).

    Returns (out [B, Hq, Lq, Dv] in q.dtype, lse float32 [B, Hq, Lq], natural log; rows
    with no visible key have out 0 and lse -inf). `out` / `lse` may be given as
    preallocated tensors of those shapes and dtypes (any strides); every element is written.

    `lists` (hook for runtime pre-passes) replaces the schedule's static tile lists with
    per-program CSR lists: int32 tensors `full_offsets`, `partial_offsets` [B·Hq·n_q_tiles + 1]
    and `full_indices`, `partial_indices` on q's device, row (b·Hq + h)·n_q_tiles + m. Only
    kernels without closed-form loops (META["closed_form"] false) read lists.

    `block_scores` switches the kernel's block-score pass on: the keyword arguments BS,
    BS_ROWS, BS_COLS, BS_QDIV, BS_KDIV, BLOCK_SCORES of `runtime.block_scores.KernelScores`
    (BS a contiguous int32 (max) or float32 (sum) buffer on q's device; the kernel needs
    1-D tiles whose sizes divide the block).
    """
    meta = module.META
    if not float(scale) > 0:
        raise LaunchError(f"scale must be positive, got {scale!r}")
    B, Hq, Lq, D = q.shape
    Hkv, Lkv, Dv = k.shape[1], k.shape[2], v.shape[3]
    if Hkv == 0 or Hq % Hkv:
        raise LaunchError(f"q has {Hq} heads, not a multiple of the {Hkv} heads of k")
    if schedule.q_len != Lq or schedule.kv_len != Lkv or schedule.heads != Hq:
        raise LaunchError(f"schedule is for q_len={schedule.q_len}, kv_len={schedule.kv_len}, "
                          f"heads={schedule.heads}; got Lq={Lq}, Lkv={Lkv}, Hq={Hq}")
    if tuple(schedule.q_grid.tile) != tuple(meta["q_tile"]) \
            or tuple(schedule.kv_grid.tile) != tuple(meta["kv_tile"]):
        raise LaunchError(f"schedule tiles {schedule.q_grid.tile}/{schedule.kv_grid.tile} do not "
                          f"match the kernel's {meta['q_tile']}/{meta['kv_tile']}")
    if len(schedule.head_class) != Hq:
        raise LaunchError(f"schedule has {len(schedule.head_class)} heads, q has {Hq}")
    if out is None:
        out = torch.empty(B, Hq, Lq, Dv, dtype=q.dtype, device=q.device)
    if lse is None:
        lse = torch.empty(B, Hq, Lq, dtype=torch.float32, device=q.device)
    for label, t, shape, dtype in (("out", out, (B, Hq, Lq, Dv), q.dtype),
                                   ("lse", lse, (B, Hq, Lq), torch.float32)):
        if tuple(t.shape) != shape or t.dtype != dtype or t.device != q.device:
            raise LaunchError(f"{label} must be {dtype} {list(shape)} on {q.device}, got "
                              f"{t.dtype} {list(t.shape)} on {t.device}")
    if B * Hq * Lq == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    rows_per_batch = 0
    if lists is None:
        lists = schedule_tensors(schedule, q.device)
    else:
        if meta.get("closed_form"):
            raise LaunchError("this kernel has closed-form loop bounds and reads no tile lists")
        n_rows = B * Hq * schedule.n_q_tiles
        for key in ("full_offsets", "full_indices", "partial_offsets", "partial_indices"):
            t = lists.get(key)
            if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or t.dim() != 1 \
                    or t.device != q.device:
                raise LaunchError(f"lists['{key}'] must be a 1-D int32 tensor on {q.device}")
            if key.endswith("offsets") and t.numel() != n_rows + 1:
                raise LaunchError(f"lists['{key}'] must have B*Hq*n_q_tiles + 1 = {n_rows + 1} "
                                  f"entries, got {t.numel()}")
        lists = dict(lists, head_class=torch.arange(Hq, dtype=torch.int32, device=q.device))
        lists = {k: (t if t.numel() else torch.zeros(1, dtype=torch.int32, device=q.device))
                 for k, t in lists.items()}
        rows_per_batch = Hq
    in_args = []
    for name, nd in zip(meta["inputs"], meta["input_dims"]):
        t = inputs.get(name)
        if not isinstance(t, torch.Tensor):
            raise LaunchError(f"missing input '{name}' (a tensor with {nd} dimensions)")
        if t.dim() != nd:
            raise LaunchError(f"input '{name}' must have {nd} dimensions, "
                              f"got shape {list(t.shape)}")
        if t.device != q.device:
            raise LaunchError(f"input '{name}' is on {t.device}, q on {q.device}")
        in_args += [t, *t.stride(), *t.shape]
    extra = {}
    if block_scores is not None:
        buf = block_scores.get("BS")
        if not isinstance(buf, torch.Tensor) or buf.device != q.device or not buf.is_contiguous() \
                or buf.dtype not in (torch.int32, torch.float32) \
                or len(meta["q_tile"]) != 1 or len(meta["kv_tile"]) != 1:
            raise LaunchError("block_scores needs a contiguous int32/float32 buffer BS on "
                              f"{q.device} and a kernel with 1-D tiles")
        extra = dict(block_scores)
    warps = getattr(options, "num_warps", None) or meta["num_warps"]
    stages = getattr(options, "num_stages", None) or meta["num_stages"]
    grid = (schedule.n_q_tiles, B * Hq)
    module.KERNEL[grid](
        q, k, v, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(),
        lists["full_offsets"], lists["full_indices"], lists["partial_offsets"],
        lists["partial_indices"], lists["head_class"], rows_per_batch,
        *in_args,
        Lq, Lkv, Hq, Hq // Hkv, schedule.n_q_tiles, D, Dv, float(scale),
        BLOCK_M=meta["block_m"], BLOCK_N=meta["block_n"], BLOCK_D=_block_d(D),
        BLOCK_DV=_block_d(Dv), DOT_FP32=_interpreted(module) and q.dtype == torch.bfloat16,
        num_warps=warps, num_stages=stages, enable_fp_fusion=FP_FUSION, **extra)
    return out, lse
