"""A small structured emitter for generated Python/Triton source.

`Emitter` collects lines with indentation managed by `block()`; `fill(template, holes)`
expands a template whose holes are written `{{name}}`. A hole alone on its line takes a
list of lines (re-indented to the hole's indentation); a hole inside a line takes one
line of text. Every hole must be filled and every filling must be used, so a template and
its generator cannot drift apart silently.
"""
from __future__ import annotations

import os
import re
from contextlib import contextmanager
from functools import lru_cache
from typing import Iterator, Mapping, Sequence, Union

_HOLE = re.compile(r"\{\{([A-Za-z_][A-Za-z0-9_]*)\}\}")

Filling = Union[str, Sequence[str]]


class Emitter:
    """Accumulates indented source lines. `with em.block("for i in range(n):"):` indents."""

    def __init__(self, indent: str = "    "):
        self._indent = indent
        self._depth = 0
        self.lines: list[str] = []

    def line(self, text: str = "") -> None:
        self.lines.append((self._indent * self._depth + text) if text else "")

    def extend(self, lines: Sequence[str]) -> None:
        for text in lines:
            self.line(text)

    def comment(self, text: str) -> None:
        for part in text.splitlines() or [""]:
            self.line("# " + part if part else "#")

    @contextmanager
    def block(self, header: str) -> Iterator[None]:
        self.line(header)
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


class TemplateError(ValueError):
    """A template hole was left unfilled, filled twice, or filled with the wrong kind of text."""


def fill(template: str, holes: Mapping[str, Filling]) -> list[str]:
    """Expand `template` with `holes` and return the resulting lines.

    A line consisting only of `{{name}}` (plus indentation) is replaced by the lines of
    `holes[name]` (a sequence of lines; a str is split on newlines), each prefixed with the
    hole's indentation; an empty filling removes the line. A `{{name}}` inside a longer line
    is replaced by `holes[name]`, which must then be one line of text.
    """
    used: set[str] = set()
    out: list[str] = []
    for raw in template.splitlines():
        stripped = raw.strip()
        m = _HOLE.fullmatch(stripped)
        if m:
            name = m.group(1)
            if name not in holes:
                raise TemplateError(f"template hole '{name}' is not filled")
            used.add(name)
            value = holes[name]
            lines = value.splitlines() if isinstance(value, str) else list(value)
            pad = raw[: len(raw) - len(raw.lstrip())]
            out.extend((pad + ln) if ln else "" for ln in lines)
            continue

        def inline(match: re.Match) -> str:
            name = match.group(1)
            if name not in holes:
                raise TemplateError(f"template hole '{name}' is not filled")
            value = holes[name]
            if not isinstance(value, str) or "\n" in value:
                raise TemplateError(f"inline hole '{name}' needs one line of text")
            used.add(name)
            return value

        out.append(_HOLE.sub(inline, raw))
    unused = set(holes) - used
    if unused:
        raise TemplateError(f"fillings without a hole: {', '.join(sorted(unused))}")
    return out


TEMPLATES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates")


@lru_cache(maxsize=None)
def template(name: str) -> str:
    """Text of `codegen/templates/<name>` (read once per process)."""
    with open(os.path.join(TEMPLATES, name), encoding="utf-8") as f:
        return f.read()
