"""User mistakes on the command line are one-line errors with exact messages and exit codes,
never "internal error"."""
import os
import subprocess
import sys

import pytest
import torch

from attncc import cli
from attncc.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECS = os.path.join(ROOT, "specs")


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the mistake is asking for CUDA without one")
@pytest.mark.parametrize("command", ["verify", "bench"])
def test_backend_triton_without_cuda(capsys, command):
    code, out, err = run(capsys, command, os.path.join(SPECS, "causal.attn"), "--backend", "triton")
    assert (code, out) == (1, "")
    assert err == ("attncc: error: --backend triton needs a CUDA device, and none is available "
                   "here; use --backend interpret (the same kernels through Triton's "
                   "interpreter), flex or reference\n")


def test_show_png_without_matplotlib(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    png = tmp_path / "x.png"
    code, out, err = run(capsys, "show", os.path.join(SPECS, "causal.attn"), "--q-len", "128",
                         "-o", str(png))
    assert (code, out) == (1, "")
    assert err == ("attncc: error: show -o writes a PNG with matplotlib, which is not installed: "
                   "pip install 'attncc[plot]' (or omit -o for the text map)\n")
    assert not png.exists()


def test_float64_on_flex_is_attnccs_own_error(capsys):
    code, out, err = run(capsys, "verify", os.path.join(SPECS, "causal.attn"), "--backend", "flex",
                         "--dtype", "float64", "--q-len", "64")
    assert (code, out) == (1, "")
    assert err == ("attncc: error: q has dtype float64; backend 'flex' supports float16, "
                   "bfloat16 and float32 (backend='reference' takes float64)\n")


def test_float64_on_reference_verifies(capsys):
    code, out, err = run(capsys, "verify", os.path.join(SPECS, "causal.attn"), "--backend",
                         "reference", "--dtype", "float64", "--q-len", "64")
    assert code == 0 and err == "" and "PASS" in out


def test_broken_pipe_exits_quietly():
    """`attncc inspect ... | head`: the reader has gone before attncc writes (the same handler
    serves every command; `inspect --stage ast` needs no torch, so this runs fast)."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "attncc", "inspect",
                             os.path.join(SPECS, "natten2d.attn"), "--stage", "ast"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # like `head` exiting: every write now fails with EPIPE
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == cli.BROKEN_PIPE == 141
    assert err.decode() == ""
