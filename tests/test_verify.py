"""verify(): random data against the float64 reference; PASS for correct kernels, FAIL for a
deliberately wrong one; the library sweep through the Triton interpreter."""
import os

import pytest
import torch

import attncc
from attncc.ir.nodes import Blocks, Route, walk
from attncc.runtime import compile as rc
from attncc.runtime.verify import TOLERANCES, compare, random_inputs, verify

SPECS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "specs")

# Small parameters so the interpreter runs each spec in about a second (1-D specs: 100 tokens).
SMALL = {
    "alibi": {}, "causal": {}, "chunked": {"chunk": 24}, "dilated_1d": {"width": 12, "dilation": 3},
    "document": {}, "longformer": {"radius": 8, "globals": 2},
    "bigbird": {"block": 16, "globals": 1}, "moa": {"sink": 2, "short": 8, "long": 40, "split": 1},
    "moh": {}, "natten1d": {"kernel": 5, "dilation": 2}, "prefix_lm": {"prefix": 10},
    "sliding_window": {"window": 9}, "softcap": {}, "streaming_sinks": {"sinks": 2, "window": 9},
    "natten2d": {"height": 8, "width": 10, "kernel": 3},
    "natten3d": {"depth": 3, "height": 4, "width": 5, "kernel_t": 3, "kernel": 3},
    "gna": {"height": 8, "width": 8, "kernel": 4, "stride": 2},
    "maxvit_block": {"height": 8, "width": 8, "window": 4},
    "maxvit_grid": {"height": 8, "width": 8, "grid": 4},
    "biformer": {"height": 8, "width": 8, "region": 4, "topk": 2},
    "seer_gate": {"block": 16, "keep": 0.3},
    "mmdit_natten": {"text": 5, "frames": 3, "height": 4, "width": 4, "kernel_t": 3, "kernel": 3},
    "vit_cls_natten": {"registers": 2, "height": 5, "width": 5, "kernel": 3},
    "hilo": {"height": 4, "width": 6, "pool": 2, "hifi_heads": 1, "heads": 2},
    # issue 12
    "lightning": {"heads": 2}, "music_transformer": {}, "t5_bias": {},
    "s2_attention": {"block": 16, "local_blocks": 2, "vert_stride": 4, "heads": 2},
    "swin": {"height": 8, "width": 8, "window": 4},
    "swin_shifted": {"height": 8, "width": 8, "window": 4, "shift": 2},
    "routing": {"causal_mask": True}, "moba": {"block": 16}, "combiner": {"segment": 16},
}
DEFAULT_RUN = ("causal", "document", "moh", "natten2d", "softcap")
TILES = dict(block_m=16, block_n=16)


def _spec_names():
    return sorted(f[:-5] for f in os.listdir(SPECS) if f.endswith(".attn"))


def _load(name):
    return attncc.load(os.path.join(SPECS, name + ".attn"), **SMALL[name])


def _has_selector(p):
    return any(isinstance(n, (Route, Blocks)) for n in walk(p.mask))


def test_every_library_spec_has_small_parameters():
    assert sorted(SMALL) == _spec_names()


def test_reference_backend_passes_and_report_format():
    r = verify(_load("document"), backend="reference", q_len=33, kv_len=33, heads=2, kv_heads=1)
    assert r.ok and r.passed
    text = str(r)
    assert text.splitlines()[-1] == "PASS"
    assert text.splitlines()[0].split() == ["pattern", "document"]
    assert "B=2 Hq=2 Hkv=1 Lq=33 Lkv=33 D=32" in text
    assert r.max_abs_err < 1e-6 and r.atol == TOLERANCES[torch.float32][0]


def test_wrong_kernel_fails(monkeypatch):
    real = rc.RUNNERS["reference"]

    def wrong(*args):                             # output 5% too large
        out, lse = real(*args)
        return out * 1.05, lse

    monkeypatch.setitem(rc.RUNNERS, "reference", wrong)
    r = verify(_load("causal"), backend="reference", q_len=20)
    assert not r.ok
    assert str(r).splitlines()[-1] == "FAIL"
    assert r.max_abs_err > r.atol


def test_wrong_lse_and_nan_fail(monkeypatch):
    real = rc.RUNNERS["reference"]
    monkeypatch.setitem(rc.RUNNERS, "reference",
                        lambda *a: (real(*a)[0], real(*a)[1] + 0.1))
    r = verify(_load("causal"), backend="reference", q_len=20)
    assert not r.ok and abs(r.lse_err - 0.1) < 1e-6
    monkeypatch.setitem(rc.RUNNERS, "reference",
                        lambda *a: (real(*a)[0] * float("nan"), real(*a)[1]))
    r = verify(_load("causal"), backend="reference", q_len=20)
    assert not r.ok and r.has_nan and "NaN" in str(r)


def test_empty_rows_must_match():
    q_len = 4
    ref = torch.zeros(1, 1, q_len, 2, dtype=torch.float64)
    ref_lse = torch.tensor([[[float("-inf"), 0.0, 0.0, 0.0]]], dtype=torch.float64)
    ok = compare("x", "reference", (1, 1, 1, q_len, q_len, 2), torch.float32, ref.float(),
                 ref_lse.float(), ref, ref_lse)
    assert ok.ok and ok.empty_rows == 1
    bad = compare("x", "reference", (1, 1, 1, q_len, q_len, 2), torch.float32, ref.float(),
                  torch.zeros(1, 1, q_len), ref, ref_lse)
    assert not bad.ok and "MISMATCH" in str(bad)


def test_random_inputs_are_valid():
    gen = torch.Generator().manual_seed(0)
    doc = random_inputs(_load("document"), batch=2, heads=3, q_len=50, kv_len=50,
                        generator=gen)["doc"]
    assert doc.shape == (2, 50) and doc.dtype == torch.int64
    assert bool((doc[:, 1:] >= doc[:, :-1]).all()) and 0 <= int(doc.min()) <= int(doc.max()) < 4
    gate = random_inputs(_load("seer_gate"), batch=2, heads=3, q_len=50, kv_len=40,
                         generator=gen)["gate"]
    assert gate.shape == (2, 3, 4, 3) and gate.is_floating_point()
    w = random_inputs(_load("moh"), batch=2, heads=3, q_len=50, kv_len=50, generator=gen)["weight"]
    assert w.shape == (2, 50, 3) and float(w.min()) >= 0 and float(w.max()) < 1


# The cost model picks 4×4×1 tiles for the small natten3d map; tiles with an extent-1 axis
# do not run in the interpreter yet (codegen), so the sweep fixes a 2×2×4 tile there.
TILE_OVERRIDES = {"natten3d": {"q_tile": (2, 2, 4), "kv_tile": (2, 2, 4)}}


def _sweep(name):
    p = _load(name)
    opts = attncc.CompileOptions(**TILES, **TILE_OVERRIDES.get(name, {}))
    r = verify(p, backend="interpret", options=opts, heads=2, kv_heads=1, batch=2)
    assert r.ok, f"\n{r}"


@pytest.mark.parametrize("name", DEFAULT_RUN)
def test_library_spec_passes_verify_interpreted(name):
    assert not _has_selector(_load(name))
    _sweep(name)


# Specs without a runtime selector (route/blocks), beyond the default five.
STATIC_REST = [n for n in sorted(SMALL) if n not in DEFAULT_RUN and not _has_selector(_load(n))]


@pytest.mark.slow  # the whole library through the interpreter takes about a minute on 2 cores
@pytest.mark.parametrize("name", STATIC_REST)
def test_library_sweep_passes_verify_interpreted(name):
    _sweep(name)


@pytest.mark.parametrize("name", ["biformer", "seer_gate"])
def test_runtime_selector_specs_pass_verify(name):
    """route/blocks patterns: pre-pass tile lists + block-sparse path against the reference."""
    assert _has_selector(_load(name))
    _sweep(name)


def test_cli_verify_prints_pass_and_fail(capsys, monkeypatch):
    from attncc.cli import main
    spec = os.path.join(SPECS, "causal.attn")
    argv = ["verify", spec, "--q-len", "24", "--block-m", "16", "--block-n", "16"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == "PASS" and "backend        interpret" in out
    real = rc.RUNNERS["interpret"]
    monkeypatch.setitem(rc.RUNNERS, "interpret",
                        lambda *a: (real(*a)[0].roll(1, dims=2), real(*a)[1]))  # rows swapped
    assert main(argv) == 1
    assert capsys.readouterr().out.splitlines()[-1] == "FAIL"
