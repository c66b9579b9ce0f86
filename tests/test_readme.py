"""The README's Python example runs verbatim in a plain `python3` on a CPU machine with a clean
environment (no TRITON_INTERPRET), and a process that imported triton first still runs."""
import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _clean_env(tmp_path) -> dict:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path),
           "PYTHONPATH": ROOT}
    return env


def readme_python_blocks() -> list[str]:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return re.findall(r"```python\n(.*?)```", f.read(), re.S)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only first run")
def test_readme_example_runs_verbatim_in_clean_env(tmp_path):
    blocks = readme_python_blocks()
    assert blocks, "README.md has no python example"
    script = tmp_path / "readme_example.py"
    # The snippet as written, then a check of its results against the reference it computed.
    script.write_text(blocks[0] + "\nimport os\n"
                      "assert os.environ.get('TRITON_INTERPRET') == '1'\n"
                      "assert (out.double() - ref).abs().max() < 1e-4\n"
                      "assert mask.shape == (1, 1, 256, 256)\n"
                      "print('README-OK')\n")
    res = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=_clean_env(tmp_path),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "README-OK" in res.stdout
    assert "Traceback" not in res.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only first run")
def test_triton_imported_first_still_runs_by_default(tmp_path):
    """The interpreter cannot be switched on once triton is imported; CPU calls without a
    backend do not need it (they pick dense / flex / torch per call), and say nothing."""
    script = tmp_path / "late.py"
    script.write_text(
        "import warnings, triton, attncc, torch\n"
        "kern = attncc.compile('specs/causal.attn')\n"
        "q = torch.randn(1, 2, 40, 8, requires_grad=True)\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    out = kern(q, q, q)\n"
        "    assert kern.last_backend == 'dense', kern.last_choice\n"
        "    win = attncc.compile(attncc.load('specs/sliding_window.attn', window=64))\n"
        "    x = torch.randn(1, 1, 4200, 8, requires_grad=True)\n"
        "    win(x, x, x).sum().backward()\n"
        "    assert win.last_backend == 'torch', win.last_choice\n"
        "    with torch.no_grad():\n"
        "        out2 = kern(q, q, q)\n"
        "    assert kern.last_backend == 'dense', kern.last_choice\n"
        "ours = [str(x.message) for x in w if 'attncc' in str(x.message)]\n"
        "assert ours == [], ours\n"
        "assert not attncc.INTERPRETER_ARRANGED\n"
        "ref = attncc.reference(kern.pattern, q, q, q)\n"
        "assert (out.double() - ref).abs().max() < 1e-5\n"
        "assert (out2.double() - ref).abs().max() < 1e-5\n"
        "out.sum().backward()\n"
        "print('LATE-OK')\n")
    res = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=_clean_env(tmp_path),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "LATE-OK" in res.stdout
