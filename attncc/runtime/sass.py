"""SASS loop analysis of a compiled kernel: instructions per iteration of each tile loop.

`sass_loops(cubin, path, source, kernel, nvdisasm)` disassembles a cubin compiled with line
info, finds its loops (back-edges) and maps each to the Python `for` of the kernel source that
owns most of its lines; `python_loops` classifies the source's loops as FULL / PARTIAL tile
loops from the comments the templates write above them. Used by `attncc.runtime.aot`.
"""
from __future__ import annotations

import ast
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Optional

__all__ = ["LoopInfo", "python_loops", "sass_loops"]


@dataclass(frozen=True)
class LoopInfo:
    """A loop of the kernel source (`for` statement at `line`, classified `kind` "full",
    "partial" or "" from the comment above it / its header) with the SASS instructions of one
    iteration: `sass_loop` True when ptxas kept it as a loop (count = instructions between the
    back-edge target and the back-edge, NOPs excluded), False when it was unrolled or has a
    single iteration (count = all instructions attributed to its lines)."""
    line: int
    kind: str
    header: str
    instructions: int
    sass_loop: bool



# ---- SASS loops ---------------------------------------------------------------------------

_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_FILE = re.compile(r'//## File "([^"]+)", line (\d+)')
_LABEL = re.compile(r"^(\.L_x_\d+):")
_BRA = re.compile(r"\bBRA\b.*?`\((\.L_x_\d+)\)")


def _kind_of(text: str) -> str:
    if "PARTIAL" in text:
        return "partial"
    if "FULL" in text:
        return "full"
    return ""


def python_loops(source: str, kernel: str) -> list:
    """(first line, last line, kind, header) of each `for` statement in function `kernel`.
    kind: "full" / "partial" from the comment lines directly above the loop (words FULL /
    PARTIAL, as the forward template writes them) or its header; a loop with neither that
    directly follows a sibling loop inherits the sibling's kind (one tile class split into
    several ranges)."""
    tree = ast.parse(source)
    lines = source.splitlines()
    fns = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == kernel]
    found: dict = {}

    def visit(body):
        prev = None
        for node in body:
            if isinstance(node, ast.For):
                comments, i = [], node.lineno - 2
                while i >= 0 and (lines[i].strip().startswith("#") or not lines[i].strip()):
                    comments.append(lines[i].strip())
                    i -= 1
                header = lines[node.lineno - 1].strip()
                kind = _kind_of(" ".join(comments)) or _kind_of(header.upper())
                if not kind and not comments and isinstance(prev, ast.For):
                    kind = found[prev.lineno][2]
                found[node.lineno] = (node.lineno, node.end_lineno, kind, header)
            for name in ("body", "orelse", "finalbody"):
                sub = getattr(node, name, None)
                if isinstance(sub, list):
                    visit(sub)
            prev = node

    visit(fns[0].body if fns else tree.body)
    return [found[k] for k in sorted(found)]


def sass_loops(cubin: bytes, path: str, source: str, kernel: str, nvdisasm: Optional[str]):
    """(total SASS instructions, [LoopInfo]) of `cubin` (compiled with line info from the
    kernel file `path` whose text is `source`), disassembled by the `nvdisasm` binary. Each
    SASS back-edge (a branch to an earlier label) is a loop; it belongs to the innermost
    Python `for` holding most of its kernel-file lines. Python loops with no SASS loop get the
    count of instructions attributed to them."""
    if nvdisasm is None:
        raise subprocess.SubprocessError("nvdisasm not found")
    with tempfile.TemporaryDirectory() as tmp:
        binf = os.path.join(tmp, "k.cubin")
        with open(binf, "wb") as f:
            f.write(cubin)
        text = subprocess.run([nvdisasm, "-c", "-g", binf], capture_output=True, text=True,
                              timeout=300, check=True).stdout
    real = os.path.realpath(path)
    instrs, labels, branches = [], {}, []  # instrs: (opcode text, kernel line or None)
    line = None
    for raw in text.splitlines():
        m = _FILE.search(raw)
        if m:
            if os.path.realpath(m.group(1)) == real:
                line = int(m.group(2))
            continue
        m = _LABEL.match(raw.strip())
        if m:
            labels[m.group(1)] = len(instrs)
            continue
        m = _INSTR.search(raw)
        if m:
            op = m.group(2)
            b = _BRA.search(op)
            if b:
                branches.append((len(instrs), b.group(1)))
            instrs.append((op, line))
    pyloops = python_loops(source, kernel)

    def owner(ln):  # innermost python loop containing line ln
        best = None
        for i, (lo, hi, _, _) in enumerate(pyloops):
            if ln is not None and lo <= ln <= hi and (best is None or lo >= pyloops[best][0]):
                best = i
        return best

    def counted(op):
        return not re.match(r"(@!?U?P\w+\s+)?NOP\b", op)

    sass = []  # (start, end) of back-edges
    for at, label in branches:
        target = labels.get(label)
        if target is not None and target <= at:
            sass.append((target, at))
    per_loop: dict = {}
    in_sass = [False] * len(instrs)
    for start, end in sass:
        inner = not any(s > start and e <= end and (s, e) != (start, end) for s, e in sass)
        votes: dict = {}
        for op, ln in instrs[start:end + 1]:
            o = owner(ln)
            if o is not None:
                votes[o] = votes.get(o, 0) + 1
        n = sum(1 for op, _ in instrs[start:end + 1] if counted(op))
        for i in range(start, end + 1):
            in_sass[i] = True
        if votes and inner:
            o = max(votes, key=votes.get)
            per_loop[o] = max(per_loop.get(o, 0), n)
    loops = []
    for i, (lo, hi, kind, header) in enumerate(pyloops):
        if i in per_loop:
            loops.append(LoopInfo(lo, kind, header, per_loop[i], True))
        else:
            n = sum(1 for j, (op, ln) in enumerate(instrs)
                    if not in_sass[j] and owner(ln) == i and counted(op))
            loops.append(LoopInfo(lo, kind, header, n, False))
    total = sum(1 for op, _ in instrs if counted(op))
    return total, loops
