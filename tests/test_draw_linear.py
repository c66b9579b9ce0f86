"""`attncc show` of `normalize none` specs draws what runs: the chunked linear algorithm's
diagonal blocks and carried state for separable specs (golden text map), the quadratic
schedule with the reason for the others."""
import os

import torch

from attncc.cli import main
from attncc.schedule.draw_linear import DIAGONAL, NONE, STATE, chunk_map

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECS = os.path.join(ROOT, "specs")


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_show_lightning_draws_the_linear_algorithm(capsys, golden, tmp_path):
    code, out, err = run(capsys, "show", os.path.join(SPECS, "lightning.attn"), "--q-len", "200",
                         "--block-m", "32", "--heads", "2")
    assert (code, err) == (0, "")
    assert "key: ▒ diagonal block" in out and "carried by the running D×Dv state" in out
    golden("schedule/lightning_linear_200.txt", out)
    png = tmp_path / "lin.png"
    code, out, _ = run(capsys, "show", os.path.join(SPECS, "lightning.attn"), "--q-len", "100",
                       "--kv-len", "150", "--block-m", "32", "-o", str(png))
    assert code == 0 and out.endswith(f"wrote {png}\n") and png.stat().st_size > 1000


def test_show_of_a_non_separable_spec_says_why_and_draws_its_tiles(capsys, tmp_path):
    spec = tmp_path / "band.attn"
    spec.write_text("pattern band\nmask causal & q - k < 40\nnormalize none\n")
    code, out, err = run(capsys, "show", str(spec), "--q-len", "128", "--block-m", "32",
                         "--block-n", "32")
    assert (code, err) == (0, "")
    assert out.startswith("algorithm: quadratic block-sparse, no softmax (q_len=128 kv_len=128 "
                          "heads=1)\n  why: not separable: ")
    assert "schedule band: q_len=128" in out and "key: █ FULL" in out


def test_chunk_map_matches_the_algorithm():
    """Independent formula: position chunks i = 0..⌈n/C⌉−1 with n = max(Lkv, d + Lq); key
    chunk j is the diagonal block when j = i, comes from the state when j < i."""
    for lq, lkv, d, c in ((200, 200, 0, 32), (100, 150, 50, 32), (64, 64, 0, 16), (10, 70, 60, 16)):
        m = chunk_map(lq, lkv, d, c)
        n = max(lkv, d + lq)
        assert m.shape == (-(-n // c), -(-lkv // c))
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                assert int(m[i, j]) == (DIAGONAL if j == i else STATE if j < i else NONE)
    assert chunk_map(200, 200, 0, 32).dtype == torch.int8
