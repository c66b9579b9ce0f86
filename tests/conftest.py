"""Test configuration: Triton interpreter on CPU, hypothesis profiles, golden files, GPU marker.

Hypothesis profiles (select with HYPOTHESIS_PROFILE):
  ci     derandomized, bounded examples: deterministic and well inside CI's time (default in CI)
  dev    the default locally: a moderate random search
  local  a harder search (many more examples), for before a release
Failures print a reproducer (`@reproduce_failure` blob and the falsifying example).
"""
import os

import pytest

try:
    import torch
    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover - torch is a hard dependency
    _HAS_CUDA = False

if not _HAS_CUDA:
    # Generated kernels run on CPU through Triton's interpreter; must be set before import.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

_common = dict(deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", derandomize=True, max_examples=25, **_common)
settings.register_profile("dev", max_examples=40, **_common)
settings.register_profile("local", max_examples=500, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true",
                     help="rewrite golden files in tests/golden instead of comparing")


@pytest.fixture
def golden(request):
    """`golden("name.txt", text)`: compare `text` with tests/golden/name.txt (or rewrite it
    with --update-golden)."""
    root = os.path.join(os.path.dirname(__file__), "golden")

    def check(name: str, text: str) -> None:
        path = os.path.join(root, name)
        if request.config.getoption("--update-golden"):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(text)
            return
        assert os.path.exists(path), f"missing golden file {path}; run pytest --update-golden"
        with open(path) as f:
            expected = f.read()
        assert text == expected, f"{name} differs from golden (run pytest --update-golden to accept)"

    return check


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; CPU runs use the Triton interpreter tests")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
