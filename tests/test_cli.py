"""The `attncc` command line: stage dumps, exit codes, error reporting."""
import ast
import os
import subprocess
import sys

import pytest

from attncc.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECS = os.path.join(ROOT, "specs")


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_inspect_ast_prints_canonical_text(capsys):
    code, out, err = run(capsys, "inspect", os.path.join(SPECS, "natten2d.attn"), "--stage", "ast")
    assert code == 0 and err == ""
    assert out == ("pattern natten2d(height = 64, width = 64, kernel = 7, dilation = 1, stride = 1)\n"
                   "layout grid(y = height, x = width)\n"
                   "mask neighborhood(kernel, dilation = dilation, stride = stride)\n")


def test_inspect_ir_binds_parameters(capsys):
    code, out, _ = run(capsys, "inspect", os.path.join(SPECS, "sliding_window.attn"), "--stage", "ir",
                       "-p", "window=16")
    assert code == 0
    assert "16" in out and out.startswith("pattern sliding_window(window = 16)")


def test_inspect_schedule_draws_tiles(capsys):
    code, out, _ = run(capsys, "inspect", os.path.join(SPECS, "causal.attn"), "--stage", "schedule",
                       "--q-len", "256", "--block-m", "64", "--block-n", "64")
    assert code == 0
    rows = [line for line in out.splitlines() if set(line) <= set("█▒·")]
    assert rows == ["▒···", "█▒··", "██▒·", "███▒"]


def test_spec_error_exits_2_with_location_on_stderr(tmp_path, capsys):
    bad = tmp_path / "bad.attn"
    bad.write_text("pattern x\nmask casual & q < 3\n")
    code, out, err = run(capsys, "inspect", str(bad))
    assert code == 2 and out == ""
    assert err == (f"{bad}:2:6: error: unknown primitive 'casual' (did you mean 'causal'?)\n"
                   "  mask casual & q < 3\n"
                   "       ^~~~~~\n")


def test_unknown_parameter_is_a_spec_error(capsys):
    code, _, err = run(capsys, "inspect", os.path.join(SPECS, "sliding_window.attn"), "-p", "windw=3")
    assert code == 2
    assert "windw" in err and "did you mean 'window'?" in err


def test_missing_file_exits_1(capsys):
    code, out, err = run(capsys, "inspect", "no/such/spec.attn")
    assert code == 1 and out == ""
    assert err.strip() == "attncc: error: spec file not found: no/such/spec.attn"


def test_bad_parameter_syntax_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["inspect", os.path.join(SPECS, "causal.attn"), "-p", "window"])
    assert exc.value.code == 2
    assert "expected name=value, got 'window'" in capsys.readouterr().err


def test_compile_writes_source_and_dumps(tmp_path, capsys):
    out_dir = tmp_path / "out"
    code, out, _ = run(capsys, "compile", os.path.join(SPECS, "natten2d.attn"), "-p", "height=16",
                       "-p", "width=16", "-o", str(out_dir))
    assert code == 0
    names = sorted(os.listdir(out_dir))
    assert names == ["natten2d.ast.txt", "natten2d.ir.txt", "natten2d.opt.txt",
                     "natten2d.schedule.txt", "natten2d_bwd.py", "natten2d_fwd.py"]
    assert "KERNEL_DKV" in (out_dir / "natten2d_bwd.py").read_text()
    source = (out_dir / "natten2d_fwd.py").read_text()
    tree = ast.parse(source)
    assert any(isinstance(n, ast.FunctionDef) for n in tree.body)
    assert (out_dir / "natten2d.ir.txt").read_text().startswith("pattern natten2d(height = 16")


def test_console_script_entry_point_runs():
    """`python -m attncc` goes through the same main (a separate process: exit code and streams)."""
    proc = subprocess.run([sys.executable, "-m", "attncc", "inspect", os.path.join(SPECS, "causal.attn"),
                           "--stage", "ast"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("pattern causal")
