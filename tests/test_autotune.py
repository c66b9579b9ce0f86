"""Autotune logic on CPU: shape-class keys, candidate options and the choice with a fake timer
(the GPU path itself is exercised by tests/test_gpu.py)."""
import os

import torch

import attncc
from attncc import CompileOptions
from attncc.runtime import autotune
from attncc.runtime import compile as rc

CAUSAL = "pattern c\nmask causal\n"
SPECS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "specs")


def _t(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, dtype=dtype, device="meta")


def test_shape_class_buckets_lengths_by_log2():
    p = attncc.parse(CAUSAL)
    key = lambda lq, lk, d=64, dv=64, dtype=torch.bfloat16, b=1, h=8: autotune.shape_class(  # noqa: E731
        p, _t(b, h, lq, d, dtype=dtype), _t(b, h, lk, d, dtype=dtype), _t(b, h, lk, dv, dtype=dtype))
    assert key(1000, 1000) == key(1024, 1024) == key(513, 600)
    assert key(1024, 1024) != key(1025, 1025)              # next bucket: 2048
    assert key(1024, 1024) != key(1024, 2048)              # Lq != Lkv classes
    assert key(1024, 1024) == key(1024, 1024, b=4, h=16)   # batch / heads do not split classes
    assert key(1024, 1024) != key(1024, 1024, d=128, dv=128)
    assert key(1024, 1024) != key(1024, 1024, dv=128)
    assert key(1024, 1024) != key(1024, 1024, dtype=torch.float16)
    other = attncc.load(os.path.join(SPECS, "sliding_window.attn"))
    assert autotune.shape_class(other, _t(1, 8, 1024, 64), _t(1, 8, 1024, 64),
                                _t(1, 8, 1024, 64)) != key(1024, 1024)
    assert [autotune._bucket(n) for n in (1, 2, 3, 4, 5, 1024, 1025)] == [0, 1, 2, 2, 3, 10, 11]


def test_candidates_vary_tiles_warps_and_stages():
    p = attncc.parse(CAUSAL)
    base = CompileOptions(autotune=True)
    c64 = autotune.candidate_options(base, p, 64)
    assert c64[0] == base.replace(autotune=False)          # the untuned default first
    assert len(c64) == len(set(c64)) and all(not c.autotune for c in c64)
    tiles = {(c.block_m, c.block_n) for c in c64}
    assert tiles == {(64, 64), (128, 64), (128, 128)}
    assert all((c.num_warps, c.num_stages) in rc.AUTOTUNE_CONFIGS for c in c64)
    # 128x128 tiles only at head dim <= 64, and only with 8 warps and <= 3 stages
    big = [c for c in c64 if (c.block_m, c.block_n) == (128, 128)]
    assert big and all(c.num_warps == 8 and c.num_stages <= 3 for c in big)
    c128 = autotune.candidate_options(base, p, 128)
    assert {(c.block_m, c.block_n) for c in c128} == {(64, 64), (128, 64)}
    assert len(c128) <= 12


def test_candidates_on_grid_layouts_keep_tiles():
    p = attncc.load(os.path.join(SPECS, "natten2d.attn"))
    base = CompileOptions(autotune=True)
    cands = autotune.candidate_options(base, p, 64)
    assert {(c.block_m, c.block_n, c.q_tile, c.kv_tile) for c in cands} == {(64, 64, None, None)}
    assert {(c.num_warps, c.num_stages) for c in cands} == set(rc.AUTOTUNE_CONFIGS)
    flat = autotune.candidate_options(base.replace(tile_1d=True), p, 64)
    assert len({(c.block_m, c.block_n) for c in flat}) == 3


def test_choose_times_once_per_key_and_skips_failures():
    cands = ["a", "boom", "b", "c"]
    times = {"a": 3.0, "b": 1.0, "c": 2.0}
    calls = []

    def run(c):
        calls.append(c)
        if c == "boom":
            raise RuntimeError("out of resources: shared memory")
        return c

    timer = lambda fn: times[fn()]  # noqa: E731
    cache = {}
    assert autotune.choose(cache, "k1", cands, run, timer) == "b"
    assert calls == cands
    assert autotune.choose(cache, "k1", cands, run, timer) == "b"
    assert calls == cands                                   # cached: no more timing
    times["c"] = 0.5
    assert autotune.choose(cache, "k2", cands, run, timer) == "c"
    assert cache == {"k1": "b", "k2": "c"}


def test_tuned_forward_keeps_fastest_options_per_shape_class(monkeypatch):
    """tuned_forward with a fake runner and timer: the fastest candidate (by tile sizes) is kept
    in Kernel._tuned under the shape class, and a second call of another length of the same
    class reuses it without timing."""
    kern = attncc.compile(CAUSAL, autotune=True)
    ran = []

    def fake_run(k, q, kk, v, inputs, scale, need_lse):
        ran.append(k.options)
        return ("out", k.options)

    monkeypatch.setattr(rc, "_run_triton", fake_run)
    cost = lambda o: (1.0 if (o.block_m, o.block_n) == (128, 64) else 2.0) + o.num_stages / 100  # noqa: E731
    timed = []

    def timer(fn):
        out = fn()
        timed.append(out[1])
        return cost(out[1])

    q = _t(1, 4, 1000, 64)
    out = autotune.tuned_forward(kern, q, q, q, {}, 0.125, True, timer=timer)
    best = out[1]
    assert (best.block_m, best.block_n, best.num_stages) == (128, 64, 2)
    assert list(kern._tuned.values()) == [best]
    n_timed = len(timed)
    assert n_timed == len(autotune.candidate_options(kern.options, kern.pattern, 64))
    q2 = _t(2, 4, 700, 64)                                   # same class (bucket 10)
    assert autotune.tuned_forward(kern, q2, q2, q2, {}, 0.125, True, timer=timer)[1] == best
    assert len(timed) == n_timed and len(kern._tuned) == 1
    q3 = _t(1, 4, 4096, 64)                                  # new class: tuned again
    autotune.tuned_forward(kern, q3, q3, q3, {}, 0.125, True, timer=timer)
    assert len(kern._tuned) == 2
