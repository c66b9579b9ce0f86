"""`SpecError`: the one error type for bad specs, with `file:line:col`, the line and a caret.

Errors are collected in a `Diagnostics` list during a pass and raised once:

    diags = Diagnostics(source, filename)
    diags.error(loc, "unknown primitive 'casual'", hint="did you mean 'causal'?")
    diags.raise_if_any()

renders as

    spec.attn:2:6: error: unknown primitive 'casual' (did you mean 'causal'?)
      mask casual & q - k < 4
           ^~~~~~
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Iterable, Optional

from .ast import Loc


@dataclass(frozen=True)
class Diagnostic:
    loc: Optional[Loc]
    message: str
    hint: Optional[str] = None

    def render(self, source: Optional[str]) -> str:
        msg = self.message + (f" ({self.hint})" if self.hint else "")
        if self.loc is None:
            return f"error: {msg}"
        out = f"{self.loc}: error: {msg}"
        lines = source.splitlines() if source else []
        if 1 <= self.loc.line <= len(lines):
            text = lines[self.loc.line - 1].rstrip("\n")
            col = max(self.loc.col, 1)
            width = 1
            if self.loc.end_line == self.loc.line and self.loc.end_col and self.loc.end_col > col:
                width = self.loc.end_col - col
            width = max(1, min(width, len(text) - col + 1))
            # Keep tabs so the caret lines up under the same characters.
            pad = "".join(c if c == "\t" else " " for c in text[: col - 1])
            out += f"\n  {text}\n  {pad}^" + "~" * (width - 1)
        return out


class SpecError(Exception):
    """A spec (or decorator-traced pattern) is malformed. `diagnostics` lists every error;
    `str(err)` renders all of them with source excerpts."""

    def __init__(self, diagnostics: Iterable[Diagnostic], source: Optional[str] = None):
        self.diagnostics = tuple(diagnostics)
        self.source = source
        super().__init__("\n".join(d.render(source) for d in self.diagnostics))

    @property
    def first(self) -> Diagnostic:
        return self.diagnostics[0]


class Diagnostics:
    """Collects errors of one pass over one source text."""

    def __init__(self, source: Optional[str], filename: str = "<spec>"):
        self.source = source
        self.filename = filename
        self.items: list[Diagnostic] = []

    def error(self, loc: Optional[Loc], message: str, hint: Optional[str] = None) -> None:
        self.items.append(Diagnostic(loc, message, hint))

    def __bool__(self) -> bool:
        return bool(self.items)

    def raise_if_any(self) -> None:
        if self.items:
            raise SpecError(self.items, self.source)


def suggest(name: str, candidates: Iterable[str]) -> Optional[str]:
    """'did you mean ...?' text for a misspelled name, or None."""
    close = difflib.get_close_matches(name, sorted(set(candidates)), n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else None
