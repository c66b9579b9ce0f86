"""`attncc verify` uses the length its help states, and warns when the mask keeps nothing."""
import os

from attncc.cli import VERIFY_1D_LEN, build_parser, main
from attncc.runtime.verify import verify

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECS = os.path.join(ROOT, "specs")


def test_verify_help_states_the_length_it_uses(capsys):
    sub = build_parser()._subparsers._group_actions[0].choices["verify"]
    assert f"or {VERIFY_1D_LEN})" in " ".join(sub.format_help().split())
    assert VERIFY_1D_LEN >= 4 * 128 and VERIFY_1D_LEN % 16  # a window of 128 many times over; tails
    code = main(["verify", os.path.join(SPECS, "sliding_window.attn"), "-p", "window=128",
                 "--backend", "reference", "--batch", "1", "--heads", "1", "--head-dim", "8"])
    out, err = capsys.readouterr()
    assert code == 0 and err == ""
    assert f"Lq={VERIFY_1D_LEN} Lkv={VERIFY_1D_LEN}" in out


EMPTY = "pattern nothing\nmask k > q + KV_LEN\n"


def test_a_mask_that_keeps_nothing_warns(tmp_path, capsys):
    spec = tmp_path / "nothing.attn"
    spec.write_text(EMPTY)
    code = main(["verify", str(spec), "--backend", "reference", "--q-len", "40"])
    out, err = capsys.readouterr()
    warning = ("the mask keeps no (query, key) pair at this shape (Lq=40, Lkv=40): every output "
               "row is 0, so this checks nothing of the kernel's attention")
    assert code == 0
    assert out.splitlines()[-2:] == [f"warning: {warning}", "PASS"]
    assert err == f"attncc: warning: {warning}\n"


def test_a_mask_that_keeps_something_has_no_warning():
    report = verify("pattern some\nmask k == 0\n", backend="reference", q_len=20)
    assert report.ok and report.warnings == ()
    report = verify(EMPTY, backend="reference", q_len=20)
    assert report.ok and len(report.warnings) == 1
