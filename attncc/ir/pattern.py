"""`Pattern`: an elaborated attention pattern (the mask IR plus its declarations).

A Pattern is what `attncc.load`, `attncc.parse` and `@attncc.pattern` return. It is frozen
and hashable; `ir_hash()` is a stable digest of its printed IR (used as a cache key).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Optional, Union

from .nodes import BOOL, FLOAT, Expr
from .printer import format_dag

Scalar = Union[int, float, bool]


@dataclass(frozen=True)
class Axis:
    name: str
    size: int


@dataclass(frozen=True)
class Layout:
    """`layout grid(y = H, x = W)`: tokens are a row-major flattening of this grid
    (last axis fastest). `Coord(side, i, name)` nodes refer to `axes[i]`."""
    axes: tuple[Axis, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(a.size for a in self.axes)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def strides(self) -> tuple[int, ...]:
        out, acc = [], 1
        for size in reversed(self.shape):
            out.append(acc)
            acc *= size
        return tuple(reversed(out))

    def axis_index(self, name: str) -> int:
        for i, a in enumerate(self.axes):
            if a.name == name:
                return i
        raise KeyError(name)

    def __str__(self) -> str:
        return "grid(" + ", ".join(f"{a.name} = {a.size}" for a in self.axes) + ")"


@dataclass(frozen=True)
class InputDecl:
    """`input name: dtype[dim, ...]`. A dim is one of the names b, h, q, k, q_blocks,
    k_blocks (resolved at call time, DESIGN §4) or a fixed integer size."""
    name: str
    dtype: str  # "int" | "float" | "bool"
    dims: tuple[Union[str, int], ...]

    def __str__(self) -> str:
        return f"input {self.name}: {self.dtype}[{', '.join(map(str, self.dims))}]"


@dataclass(frozen=True)
class Pattern:
    """An attention pattern: which keys each query sees, plus score/output modifiers.

    mask          bool IR over b, h, q, k, coordinates, lengths, inputs, selectors
    score         float IR over `s` (the scaled q·k score) or None
    output_scale  float IR (per b, q, h) multiplying each head's output rows, or None
    normalize     "softmax" (default) or "none": no softmax, out[q] = Σ_k keep · score · v[k]
                  (linear attention; `attncc.passes.linear` decides whether the chunked
                  linear-time algorithm applies)
    """
    name: str
    params: tuple[tuple[str, Scalar], ...]
    layout: Optional[Layout]   # or a segmented `attncc.ir.segmented.Segmented`
    inputs: tuple[InputDecl, ...]
    mask: Expr
    score: Optional[Expr] = None
    output_scale: Optional[Expr] = None
    normalize: str = "softmax"
    source: Optional[str] = field(default=None, compare=False, repr=False)
    filename: Optional[str] = field(default=None, compare=False, repr=False)
    # Call-time constraints recorded by elaboration (`Pattern.check_lengths`).
    checks: tuple = field(default=(), compare=False, repr=False)

    def __post_init__(self):
        if self.normalize not in ("softmax", "none"):
            raise ValueError(f"normalize must be 'softmax' or 'none', got {self.normalize!r}")
        if self.mask.dtype != BOOL:
            raise TypeError("mask must be boolean")
        for label, e in (("score", self.score), ("output scale", self.output_scale)):
            if e is not None and e.dtype != FLOAT:
                raise TypeError(f"{label} must be float")

    # ---- views --------------------------------------------------------------------------
    @property
    def param_dict(self) -> dict[str, Scalar]:
        return dict(self.params)

    def input(self, name: str) -> InputDecl:
        for d in self.inputs:
            if d.name == name:
                return d
        raise KeyError(name)

    def ir_text(self) -> str:
        """Stable text dump of the whole pattern (header, layout, inputs, IR)."""
        head = f"pattern {self.name}(" + ", ".join(f"{k} = {v!r}" for k, v in self.params) + ")"
        lines = [head]
        if self.layout is not None:
            lines.append(f"layout {self.layout}")
        lines += [str(d) for d in self.inputs]
        if self.normalize != "softmax":  # absent for softmax: existing hashes are unchanged
            lines.append(f"normalize {self.normalize}")
        lines.append(format_dag({"mask": self.mask, "score": self.score,
                                 "output_scale": self.output_scale}))
        return "\n".join(lines) + "\n"

    def ir_hash(self) -> str:
        return hashlib.sha256(self.ir_text().encode()).hexdigest()[:16]

    def __str__(self) -> str:
        return self.ir_text()

    @property
    def fixed_length(self) -> Optional[int]:
        """The query length every call must have, when the pattern fixes it: the layout's
        size (the query side's total for a segmented layout, `attncc.ir.segmented`); else
        None."""
        if self.layout is None:
            return None
        side = getattr(self.layout, "q", None)
        return side.numel if side is not None else self.layout.numel

    @property
    def fixed_kv_length(self) -> Optional[int]:
        """The key length every call must have, when the pattern fixes it (differs from
        `fixed_length` with separate query and key layouts); else None."""
        if self.layout is None:
            return None
        side = getattr(self.layout, "k", None)
        return side.numel if side is not None else self.layout.numel

    def check_lengths(self, q_len: int, kv_len: int) -> None:
        """Check call-time constraints for `q_len` queries and `kv_len` keys: NATTEN's
        kernel·dilation <= length for a `neighborhood` on a pattern without a layout.
        Raises `SpecError` pointing at the `neighborhood` call."""
        from ..frontend.errors import Diagnostic, SpecError
        diags = []
        for c in self.checks:
            if hasattr(c, "message"):  # e.g. passes.segments.SegmentLengthCheck
                msg = c.message(q_len, kv_len)
                if msg is not None:
                    diags.append(Diagnostic(c.loc, msg))
            elif c.kernel * c.dilation > q_len:
                diags.append(Diagnostic(c.loc, f"neighborhood kernel {c.kernel} x dilation "
                                               f"{c.dilation} = {c.kernel * c.dilation} exceeds "
                                               f"the sequence length {q_len}"))
        if diags:
            raise SpecError(diags, self.source)

    # ---- evaluation -----------------------------------------------------------------------
    def dense_mask(self, q_len: Optional[int] = None, kv_len: Optional[int] = None,
                   heads: int = 1, batch: int = 1, inputs: Optional[dict] = None,
                   device=None):
        """The exact mask as `torch.bool [batch, heads, q_len, kv_len]`.

        Lengths default to the layout's size for grid patterns. `inputs` maps each declared
        input name to its tensor; `route` also needs the query and key tensors, passed as
        `inputs={"query": q [B, Hq, Lq, D], "key": k [B, Hkv, Lkv, D]}`.
        """
        from .dense import dense_mask
        return dense_mask(self, q_len=q_len, kv_len=kv_len, heads=heads, batch=batch,
                          inputs=inputs or {}, device=device)
