"""One kernel per pattern for every sequence length: closed-form bounds keep Q_LEN / KV_LEN as
kernel arguments, so schedules of different lengths share one generated source, one cache
entry and one loaded module; the shared kernel is checked against an independent dense
formula at lengths it was not generated for (tails, Lq != Lkv)."""
import os

import pytest
import torch

import attncc
from attncc.runtime import compile as rc

from test_runtime import dense_attention, qkv

SPECS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "specs")
# 10 distinct (q_len, kv_len): tile multiples and not, Lq == Lkv and not.
LENGTHS = [(1024, 1024), (1000, 1000), (777, 777), (2048, 2048), (2048 + 17, 2048 + 17),
           (300, 300), (512, 1024), (1000, 1300), (129, 129), (64, 64)]
BAND_1D = {"causal": {}, "sliding_window": {}, "prefix_lm": {}, "streaming_sinks": {},
           "chunked": {}, "natten1d": {}, "moa": {}}


@pytest.mark.parametrize("spec", sorted(BAND_1D))
def test_one_source_for_ten_lengths(spec):
    kern = attncc.compile(os.path.join(SPECS, f"{spec}.attn"), **BAND_1D[spec])
    heads = kern.default_shape()[2]
    lengths = LENGTHS if spec not in ("natten1d", "chunked") else \
        [(n, n) for n, _ in LENGTHS]  # these bands need Lq <= Lkv / equal lengths
    sources, keys = set(), set()
    for lq, lk in lengths:
        sched = kern.schedule(lq, lk, heads)
        assert all(c.bounds is not None for c in sched.classes), (spec, lq, lk)
        sources.add(kern.source_for(sched))
        keys.add(rc.structure_key(sched))
    assert len(sources) == 1 and len(keys) == 1, spec
    assert "'closed_form': True" in sources.pop()


def test_one_module_serves_every_length(tmp_path, monkeypatch):
    """Calls at three lengths load one module and write one cache entry, and match the
    dense formula at each length."""
    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(tmp_path))
    p = attncc.load(os.path.join(SPECS, "sliding_window.attn"), window=20)
    kern = attncc.compile(p, backend="interpret", block_m=16, block_n=16)
    before = len(rc._MODULES)
    for lq, lk in ((48, 48), (37, 37), (30, 45)):
        q, k, v = qkv(B=1, Hq=2, Hkv=1, Lq=lq, Lkv=lk, seed=lq)
        out, lse = kern(q, k, v, return_lse=True)
        mask = kern.pattern.dense_mask(lq, lk, heads=2, batch=1)
        ref, ref_lse = dense_attention(mask, q, k, v)
        torch.testing.assert_close(out.double(), ref, atol=2e-4, rtol=2e-4)
        live = ~torch.isneginf(ref_lse)
        torch.testing.assert_close(lse.double()[live], ref_lse[live], atol=2e-4, rtol=2e-4)
    assert len(rc._MODULES) == before + 1
    entries = [p for p in tmp_path.glob("*/*") if p.is_dir()]
    assert len(entries) == 1
