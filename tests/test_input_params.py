"""Input signatures may use parameters, and an input read in `score` needs to be in range only
at the pairs the mask keeps (every backend agrees with an independent formula there)."""
import math

import pytest
import torch

import attncc
from attncc.ir.dense import MaskEvalError

REL = ("pattern rel(maxdist = 2)\n"
       "input table: float[h, 2 * maxdist + 1]\n"
       "mask abs(q - k) <= maxdist\n"
       "score s + table[h, q - k + maxdist]\n")


def test_signature_uses_parameters():
    assert attncc.parse(REL).inputs[0].dims == ("h", 5)
    assert attncc.parse(REL, maxdist=6).inputs[0].dims == ("h", 13)
    text = attncc.parse(REL).ir_text()
    assert "input table: float[h, 5]" in text


@pytest.mark.parametrize("dim, message", [
    ("0", "bad input dimension: expected one of b, h, q, k, q_blocks, k_blocks or a positive "
          "integer, got 0"),
    ("2.5", "bad input dimension: expected one of b, h, q, k, q_blocks, k_blocks or a positive "
            "integer, got 2.5"),
    ("q + 1", "'q' is not a constant (parameter defaults, layout sizes and primitive options "
              "must be constant)"),
    ("maxdist - 2", "bad input dimension: expected one of b, h, q, k, q_blocks, k_blocks or a "
                    "positive integer, got 0"),
])
def test_bad_dimensions_are_located_errors(dim, message):
    text = f"pattern x(maxdist = 2)\ninput t: float[h, {dim}]\nmask true\n"
    with pytest.raises(attncc.SpecError) as e:
        attncc.parse(text, filename="x.attn")
    assert str(e.value).splitlines()[0] == f"x.attn:2:19: error: {message}"


def expected(q, k, v, table, maxdist):
    """Independent float64 formula: relative bias at kept pairs only."""
    L, D = q.shape[2], q.shape[3]
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    keep = (i - j).abs() <= maxdist
    idx = (i - j + maxdist).clamp(0, 2 * maxdist)   # only used where kept
    s = q.double() @ k.double().transpose(-1, -2) / math.sqrt(D)
    s = s + table.double()[:, idx][None]
    s = s.masked_fill(~keep, float("-inf"))
    return torch.softmax(s, -1) @ v.double()


@pytest.mark.parametrize("backend", ["reference", "dense", "torch", "interpret"])
def test_reads_out_of_range_at_dropped_pairs_are_fine(backend):
    p = attncc.parse(REL, maxdist=2)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 12, 8, generator=g) for _ in range(3))
    table = torch.randn(2, 5, generator=g)
    out = attncc.compile(p, backend=backend)(q, k, v, table=table)
    assert (out.double() - expected(q, k, v, table, 2)).abs().max() < 1e-5


def test_reads_out_of_range_at_kept_pairs_are_still_errors():
    p = attncc.parse("pattern rel\ninput table: float[h, 3]\nmask abs(q - k) <= 2\n"
                     "score s + table[h, q - k + 1]\n")
    q = torch.randn(1, 1, 6, 4)
    with pytest.raises(MaskEvalError, match=r"index -1 out of range \[0, 3\) in dimension 1 of "
                                            r"input 'table'"):
        attncc.reference(p, q, q, q, table=torch.randn(1, 3))
