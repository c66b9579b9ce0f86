"""`CompileOptions`: every knob that changes generated code or its launch, in one frozen,
hashable object. Its `key()` (with the IR hash and the attncc version) keys the kernel cache.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, replace
from typing import Optional

BACKENDS = ("triton", "interpret", "flex", "torch", "dense", "reference")


def _pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


@dataclass(frozen=True)
class CompileOptions:
    """Compile options.

    backend     "triton" (CUDA), "interpret" (the same Triton kernels on CPU through
                TRITON_INTERPRET), "flex" (FlexAttention with attncc's analytic BlockMask),
                "torch" (block-sparse torch ops, differentiable: the CPU training path),
                "dense" (SDPA over the dense mask: small shapes), "reference" (float64
                dense); None picks "triton" on CUDA tensors and, on CPU, per call shape by
                the cost rule of `attncc.runtime.choose` ("dense" or "flex"; "torch" when
                gradients are needed).
    block_m     query tile size in tokens (1-D tiles), a power of two
    block_n     key tile size in tokens (1-D tiles), a power of two
    q_tile      multi-dimensional query tile shape for grid layouts (powers of two), or None
                to let the cost model choose (or to use 1-D tiles when `tile_1d`)
    kv_tile     likewise for keys
    tile_1d     force 1-D tiles on grid layouts
    num_warps, num_stages   Triton launch parameters (GPU)
    scale       softmax scale; None means 1/sqrt(head_dim)
    autotune    try a small config space on GPU and keep the fastest per shape
    """
    backend: Optional[str] = None
    block_m: int = 64
    block_n: int = 64
    q_tile: Optional[tuple[int, ...]] = None
    kv_tile: Optional[tuple[int, ...]] = None
    tile_1d: bool = False
    num_warps: int = 4
    num_stages: int = 2
    scale: Optional[float] = None
    autotune: bool = False

    def __post_init__(self):
        if self.backend is not None and self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; expected one of {', '.join(BACKENDS)}")
        for name in ("block_m", "block_n"):
            v = getattr(self, name)
            if not isinstance(v, int) or not _pow2(v) or not 16 <= v <= 256:
                raise ValueError(f"{name} must be a power of two in [16, 256], got {v!r}")
        for name in ("q_tile", "kv_tile"):
            v = getattr(self, name)
            if v is not None:
                v = tuple(v)
                object.__setattr__(self, name, v)
                if not v or not all(isinstance(t, int) and _pow2(t) for t in v):
                    raise ValueError(f"{name} must be a tuple of powers of two, got {v!r}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps must be 1, 2, 4, 8 or 16, got {self.num_warps!r}")
        if not 1 <= self.num_stages <= 8:
            raise ValueError(f"num_stages must be in [1, 8], got {self.num_stages!r}")
        if self.scale is not None and not self.scale > 0:
            raise ValueError(f"scale must be positive, got {self.scale!r}")

    def replace(self, **changes) -> "CompileOptions":
        return replace(self, **changes)

    def key(self) -> str:
        """Stable digest of the options (part of the cache key)."""
        text = repr(sorted(asdict(self).items()))
        return hashlib.sha256(text.encode()).hexdigest()[:16]
