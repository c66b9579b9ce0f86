"""Call-time validation of attention tensors and of a pattern's declared runtime inputs.

`check_qkv(q, k, v)` checks PyTorch SDPA shapes (DESIGN §4); `check_inputs(pattern, inputs, ...)`
checks every `input name: dtype[dims]` declaration of a pattern against the tensors passed
at call time. Both raise `InputError` (a `ValueError`) or `InputTypeError` (also a `TypeError`)
with a message naming the offending argument and what was expected.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch

from ..frontend.errors import suggest
from .nodes import Blocks, walk

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Names the dense evaluator accepts besides declared inputs when the mask uses `route`.
ROUTE_INPUTS = ("query", "key")


class InputError(ValueError):
    """A tensor passed at call time does not match what the pattern or SDPA expects."""


class InputTypeError(InputError, TypeError):
    """A call-time argument has the wrong kind (not a tensor) or the wrong dtype class."""


def same_device(a: torch.device, b: torch.device) -> bool:
    """Equal devices, where a device without an index ('cuda') matches any index."""
    a, b = torch.device(a), torch.device(b)
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_qkv(q, k, v) -> tuple[int, int, int, int, int, int, int]:
    """Validate SDPA-shaped attention tensors.

    q [B, Hq, Lq, D], k [B, Hkv, Lkv, D], v [B, Hkv, Lkv, Dv] with Hq % Hkv == 0 (grouped-query
    attention: query head h reads key/value head h // (Hq // Hkv)); one floating dtype among
    float16/bfloat16/float32/float64 and one device for all three.

    Returns (B, Hq, Hkv, Lq, Lkv, D, Dv).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise InputTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise InputError(f"{name} must be 4-D [batch, heads, seq_len, head_dim], "
                             f"got shape {_shape(t)}")
    B, Hq, Lq, D = q.shape
    _, Hkv, Lkv, _ = k.shape
    Dv = v.shape[3]
    for name, t in (("k", k), ("v", v)):
        if t.shape[0] != B:
            raise InputError(f"{name} has batch size {t.shape[0]}, expected {B} (the batch size of q)")
    if v.shape[1] != Hkv:
        raise InputError(f"v has {v.shape[1]} heads, expected {Hkv} (the heads of k)")
    if Hkv == 0 or Hq % Hkv != 0:
        raise InputError(f"q has {Hq} heads, not a multiple of the {Hkv} heads of k "
                         f"(grouped-query attention needs an integer ratio Hq / Hkv, got {Hq}/{Hkv})")
    if v.shape[2] != Lkv:
        raise InputError(f"v has sequence length {v.shape[2]}, expected {Lkv} (the length of k)")
    if k.shape[3] != D:
        raise InputError(f"k has head dim {k.shape[3]}, expected {D} (the head dim of q)")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype not in FLOAT_DTYPES:
            raise InputTypeError(f"{name} has dtype {_dtype_name(t.dtype)}; supported: "
                                 "float16, bfloat16, float32, float64")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise InputTypeError(f"{name} has dtype {_dtype_name(t.dtype)}, expected "
                                 f"{_dtype_name(q.dtype)} (the dtype of q)")
        if not same_device(t.device, q.device):
            raise InputError(f"{name} is on {t.device}, expected {q.device} (the device of q)")
    return B, Hq, Hkv, Lq, Lkv, D, Dv


def block_sizes(pattern) -> dict[str, int]:
    """Block size β of every `blocks(input, block=β, ...)` selector in the mask, by input."""
    out: dict[str, int] = {}
    for node in walk(pattern.mask):
        if isinstance(node, Blocks):
            out.setdefault(node.input, node.block)
    return out


def expected_shape(pattern, decl, *, batch: int, heads: int, q_len: int,
                   kv_len: int) -> tuple[int, ...]:
    """Concrete shape of input declaration `decl` for the given call sizes (DESIGN §4)."""
    sizes = {"b": batch, "h": heads, "q": q_len, "k": kv_len}
    blocks = block_sizes(pattern)
    out = []
    for dim in decl.dims:
        if isinstance(dim, int):
            out.append(dim)
        elif dim in sizes:
            out.append(sizes[dim])
        elif dim in ("q_blocks", "k_blocks"):
            beta = blocks.get(decl.name)
            if beta is None and len(set(blocks.values())) == 1:
                beta = next(iter(blocks.values()))
            if beta is None:
                raise InputError(f"input '{decl.name}' uses {dim}, but the mask has no "
                                 "blocks(...) selector that fixes the block size")
            out.append(math.ceil((q_len if dim == "q_blocks" else kv_len) / beta))
        else:
            raise InputError(f"input '{decl.name}' has an unknown dimension {dim!r}")
    return tuple(out)


def _describe(decl, shape) -> str:
    return (f"{decl.dtype}[{', '.join(map(str, decl.dims))}] = "
            f"[{', '.join(map(str, shape))}]")


_DTYPE_CLASS = {
    "int": (lambda d: not d.is_floating_point and not d.is_complex and d != torch.bool,
            "an integer"),
    "float": (lambda d: d.is_floating_point, "a floating-point"),
    "bool": (lambda d: d == torch.bool, "a bool"),
}


def check_inputs(pattern, inputs: Mapping[str, object], *, batch: int, heads: int, q_len: int,
                 kv_len: int, device=None, allow: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Validate the runtime inputs of `pattern` for one call.

    Every declared input must be present, be a tensor of the declared dtype class (int: any
    integer dtype, float: any floating dtype, bool: bool), have exactly the declared shape
    (dims b/h/q/k/q_blocks/k_blocks resolved from batch, heads, q_len, kv_len and the `blocks`
    block size) and live on `device` (when given; normally q's device). Names not declared
    are rejected, except those listed in `allow`.

    Returns the declared inputs in declaration order.
    """
    declared = {d.name: d for d in pattern.inputs}
    for name in inputs:
        if name not in declared and name not in allow:
            hint = suggest(name, declared)
            known = ", ".join(f"'{n}'" for n in declared) or "none"
            msg = f"unknown input '{name}' for pattern '{pattern.name}' (declared: {known})"
            raise InputError(msg + (f"; {hint}" if hint else ""))
    out: dict[str, torch.Tensor] = {}
    dev = torch.device(device) if device is not None else None
    for decl in pattern.inputs:
        shape = expected_shape(pattern, decl, batch=batch, heads=heads, q_len=q_len, kv_len=kv_len)
        want = _describe(decl, shape)
        if decl.name not in inputs:
            raise InputError(f"missing input '{decl.name}': expected {want}")
        t = inputs[decl.name]
        if not isinstance(t, torch.Tensor):
            raise InputTypeError(f"input '{decl.name}' must be a torch.Tensor, got "
                                 f"{type(t).__name__}; expected {want}")
        ok, label = _DTYPE_CLASS[decl.dtype]
        if not ok(t.dtype):
            raise InputTypeError(f"input '{decl.name}' has dtype {_dtype_name(t.dtype)}, "
                                 f"expected {label} tensor: {want}")
        if tuple(t.shape) != shape:
            raise InputError(f"input '{decl.name}' has shape {_shape(t)}, expected {want}")
        if dev is not None and not same_device(t.device, dev):
            raise InputError(f"input '{decl.name}' is on {t.device}, expected {dev} "
                             "(the device of q)")
        out[decl.name] = t
    return out
