"""The compiler pipeline as one flat list of named stages, each with a text dump.

    ast       parsed spec, printed canonically           attncc.frontend.format.format_spec
    ir        elaborated mask IR                         Pattern.ir_text
    opt       simplified IR                              attncc.passes.simplify.opt_text
    schedule  tile classification and loop bounds        attncc.schedule.build.schedule_text
    triton    generated Triton forward kernel            attncc.codegen.forward.generate_forward
    triton-bwd  generated Triton backward kernels (dQ, dK/dV)  attncc.codegen.backward.generate_backward

`attncc inspect SPEC --stage NAME` prints `dump(NAME, ...)`; `attncc compile -o DIR` writes
every stage's dump to DIR. Stages import their modules lazily, so dumping the AST never
imports torch or triton.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional

STAGE_NAMES = ("ast", "ir", "opt", "schedule", "triton", "triton-bwd")


@dataclass(frozen=True)
class Shape:
    """The problem shape for shape-dependent stages (None: the layout's size, or 1-D default)."""
    q_len: Optional[int] = None
    kv_len: Optional[int] = None
    heads: int = 1


DEFAULT_1D_LEN = 1024


def read_spec(spec: str) -> tuple[str, str]:
    """(source text, filename) of a spec given as a path or as text."""
    if "\n" in spec or spec.lstrip().startswith("pattern"):
        return spec, "<spec>"
    if not os.path.exists(spec):
        raise FileNotFoundError(f"spec file not found: {spec}")
    with open(spec, encoding="utf-8") as f:
        return f.read(), spec


def load_pattern(spec, params: dict):
    """A Pattern from a Pattern, a path or spec text."""
    from .ir.pattern import Pattern
    if isinstance(spec, Pattern):
        return spec
    from . import api
    text, filename = read_spec(spec)
    return api.parse(text, filename=filename, **params)


def resolve_shape(pattern, shape: Shape) -> tuple[int, int, int]:
    """Concrete (q_len, kv_len, heads): grid layouts default to their size, 1-D patterns to
    DEFAULT_1D_LEN tokens."""
    default = getattr(pattern, "fixed_length", None) or DEFAULT_1D_LEN
    q_len = shape.q_len or shape.kv_len or default
    kv_len = shape.kv_len or (getattr(pattern, "fixed_kv_length", None)
                              if not shape.q_len else None) or q_len
    return q_len, kv_len, shape.heads


def _ast(spec, params, shape, options):
    from .frontend.format import format_spec
    from .frontend.parser import parse_spec
    text, filename = read_spec(spec)
    return format_spec(parse_spec(text, filename)).rstrip("\n") + "\n"


def _ir(spec, params, shape, options):
    return load_pattern(spec, params).ir_text()


def _opt(spec, params, shape, options):
    from .passes.simplify import opt_text
    return opt_text(load_pattern(spec, params))


def _schedule(spec, params, shape, options):
    from .schedule.build import build_schedule
    p = load_pattern(spec, params)
    q_len, kv_len, heads = resolve_shape(p, shape)
    head = ""
    if p.normalize == "none":
        from .passes.linear import algorithm_text
        head, linear = algorithm_text(p, heads, q_len, kv_len, options)
        if linear:
            return head
    return head + str(build_schedule(p, q_len, kv_len, heads, options=options)).rstrip("\n") + "\n"


def _triton(spec, params, shape, options):
    from .codegen.forward import generate_forward
    from .schedule.build import build_schedule
    p = load_pattern(spec, params)
    q_len, kv_len, heads = resolve_shape(p, shape)
    if p.normalize == "none":
        from .passes.linear import decide
        if decide(p, heads, q_len, kv_len)[0].linear:
            from .codegen.linear import generate_linear_forward
            return generate_linear_forward(options)
    return generate_forward(p, build_schedule(p, q_len, kv_len, heads, options=options), options)


def _triton_bwd(spec, params, shape, options):
    from .runtime.autograd import kernel_backward_source
    from .runtime.compile import Kernel
    p = load_pattern(spec, params)
    if p.normalize != "softmax":
        raise ValueError(f"pattern '{p.name}' has `normalize {p.normalize}`: the generated "
                         "backward kernels are for softmax attention")
    q_len, kv_len, heads = resolve_shape(p, shape)
    kern = Kernel(p, options)
    return kernel_backward_source(kern, kern.schedule(q_len, kv_len, heads))


STAGES: dict[str, Callable] = {"ast": _ast, "ir": _ir, "opt": _opt, "schedule": _schedule,
                               "triton": _triton, "triton-bwd": _triton_bwd}


def dump(stage: str, spec, params: Optional[dict] = None, shape: Shape = Shape(), options=None) -> str:
    """Text dump of `spec` (path, text or Pattern) after `stage`."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {', '.join(STAGE_NAMES)}")
    from .runtime.options import CompileOptions
    return STAGES[stage](spec, params or {}, shape, options or CompileOptions())
