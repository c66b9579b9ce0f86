"""docs/LANGUAGE.md: every code block is a test case.

```attn blocks are parsed and elaborated; `<!-- check Lq=.. Lkv=.. [H=..]: FORMULA -->` after a
block compares its dense mask with FORMULA, a Python expression over torch index tensors q, k,
h, b (and q_AXIS / k_AXIS for grid coordinates); `<!-- error: MESSAGE -->` requires exactly
that error message (first diagnostic). ```python blocks are run.
"""
import os
import re

import pytest
import torch

import attncc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "LANGUAGE.md")
BLOCK = re.compile(r"```(\w+)\n(.*?)```[ \t]*\n(?:[ \t]*\n)*(<!--(.*?)-->)?", re.S)


def blocks():
    text = open(DOC, encoding="utf-8").read()
    out = []
    for m in BLOCK.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        out.append((line, m.group(1), m.group(2), (m.group(4) or "").strip()))
    return out


def test_doc_has_blocks_of_every_kind():
    kinds = [(lang, note.split(":")[0].split()[0] if note else "") for _, lang, _, note in blocks()]
    assert all(lang in ("attn", "python") for lang, _ in kinds), kinds
    assert sum(1 for lang, n in kinds if n == "check") >= 20
    assert sum(1 for lang, n in kinds if n == "error") >= 15
    assert ("python", "") in kinds
    text = open(DOC, encoding="utf-8").read()
    assert "## 9. normalize none (linear attention)" in text


def _formula_env(pattern, Lq, Lkv, H):
    ar = torch.arange
    env = {"q": ar(Lq).view(1, 1, -1, 1), "k": ar(Lkv).view(1, 1, 1, -1),
           "h": ar(H).view(1, -1, 1, 1), "b": ar(1).view(-1, 1, 1, 1),
           "Lq": Lq, "Lkv": Lkv, "H": H, "torch": torch,
           "clamp": lambda x, lo, hi: torch.clamp(torch.as_tensor(x), lo, hi),
           "minimum": torch.minimum, "maximum": torch.maximum}
    if pattern.layout is not None and hasattr(pattern.layout, "strides"):  # one grid
        for side, n in (("q", Lq), ("k", Lkv)):
            idx = env[side]
            for axis, stride, size in zip(pattern.layout.axes, pattern.layout.strides,
                                          pattern.layout.shape):
                env[f"{side}_{axis.name}"] = (idx // stride) % size
    return env


CASES = [pytest.param(*b, id=f"L{b[0]}") for b in blocks()]


@pytest.mark.parametrize("line, lang, body, note", CASES)
def test_block(line, lang, body, note):
    if lang == "python":
        exec(compile(body, f"{DOC}:{line}", "exec"), {})
        return
    if note.startswith("error:"):
        with pytest.raises(attncc.SpecError) as e:
            attncc.parse(body, filename="doc.attn")
        first = str(e.value).splitlines()[0]
        assert first.split(": error: ", 1)[1] == note[len("error:"):].strip()
        return
    p = attncc.parse(body, filename="doc.attn")
    if not note:
        return
    m = re.fullmatch(r"check\s+Lq=(\d+)\s+Lkv=(\d+)(?:\s+H=(\d+))?\s*:\s*(.+)", note, re.S)
    assert m, f"bad check comment at line {line}: {note!r}"
    Lq, Lkv, H = int(m.group(1)), int(m.group(2)), int(m.group(3) or 1)
    want = eval(m.group(4), _formula_env(p, Lq, Lkv, H))
    want = torch.as_tensor(want).expand(1, H, Lq, Lkv)
    got = p.dense_mask(Lq, Lkv, heads=H)
    assert torch.equal(got, want), f"LANGUAGE.md line {line}: mask differs from the stated formula"
