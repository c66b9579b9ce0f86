"""Public entry points from spec text to `Pattern`: `load`, `parse`, `load_ast`.

    p = attncc.load("specs/natten2d.attn", kernel=7)
    p = attncc.parse("pattern w(width = 8)\\nmask causal & q - k < width", width=16)

The prelude (`grammar/prelude.attn`, installed as `attncc.grammar`) is parsed once per
process and its `def`s are in scope in every spec.
"""
from __future__ import annotations

import functools
from importlib import resources

from .frontend import ast
from .ir.pattern import Pattern

PRELUDE_NAME = "prelude.attn"


@functools.lru_cache(maxsize=1)
def prelude_defs() -> tuple[ast.Def, ...]:
    """The library `def`s of `grammar/prelude.attn` (parsed once, cached)."""
    from .frontend.parser import parse_spec
    text = (resources.files("attncc.grammar") / PRELUDE_NAME).read_text(encoding="utf-8")
    spec = parse_spec(text, filename=PRELUDE_NAME)
    return tuple(d for d in spec.decls if isinstance(d, ast.Def))


def load_ast(path) -> tuple[ast.Spec, str]:
    """Parse the spec file at `path`; returns (AST, source text). Errors name `path` as given."""
    from .frontend.parser import parse_spec
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return parse_spec(text, filename=str(path)), text


def parse(text: str, /, filename: str = "<spec>", **params) -> Pattern:
    """Parse and elaborate spec `text`; keyword arguments override header parameters.
    Raises `attncc.SpecError` (all errors, with `filename:line:col` and a caret)."""
    from .frontend.parser import parse_spec
    from .passes.elaborate import elaborate
    spec = parse_spec(text, filename=filename)
    return elaborate(spec, params, source=text, filename=filename, prelude=list(prelude_defs()))


def load(path, /, **params) -> Pattern:
    """Load the spec file at `path` (keyword arguments override its parameters).
    The resulting `Pattern.dense_mask(...)` is `torch.bool [B, H, Lq, Lkv]`."""
    from .passes.elaborate import elaborate
    spec, text = load_ast(path)
    return elaborate(spec, params, source=text, filename=str(path), prelude=list(prelude_defs()))
