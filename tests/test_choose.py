"""The default CPU backend: the cost rule (unit tests against the formula written here) and
the Kernel's per-call choice (results checked against the reference)."""
import pytest
import torch

import attncc
from attncc.runtime import choose as ch
from attncc.runtime.options import CompileOptions
from attncc.schedule.build import build_schedule


def modelled(backend, Lq, Lkv, H, visited, grid=False):
    pairs = H * Lq * Lkv
    if backend == "dense":
        return ch.DENSE_NS * pairs * 1e-6
    per_pair = ch.FLEX_GRID_NS if grid else ch.FLEX_NS
    return ch.FLEX_FIXED_MS + per_pair * pairs * visited * 1e-6


@pytest.mark.parametrize("L", [64, 256, 1024, 2048, 4096, 8192])
@pytest.mark.parametrize("visited", [0.02, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("grid", [False, True])
def test_cost_rule_picks_the_cheaper_model(L, visited, grid):
    c = ch.cost_rule(q_len=L, kv_len=L, heads=4, visited=visited, grid=grid)
    flex, dense = modelled("flex", L, L, 4, visited, grid), modelled("dense", L, L, 4, visited)
    assert c.backend == ("flex" if flex < dense else "dense"), c


def test_cost_rule_extremes():
    assert ch.cost_rule(q_len=256, kv_len=256, heads=2, visited=0.01).backend == "dense"
    assert ch.cost_rule(q_len=8192, kv_len=8192, heads=8, visited=0.06).backend == "flex"
    big = ch.cost_rule(q_len=1 << 14, kv_len=1 << 13, heads=1, visited=1.0)
    assert big.backend == "flex" and "dense limit" in big.reason
    assert ch.cost_rule(q_len=4096, kv_len=4096, heads=4, visited=None).backend == "dense"
    # what was measured (bench/bench_choose.py): windows and long causal on flex, small
    # shapes and 2-D neighborhoods on dense
    assert ch.cost_rule(q_len=4096, kv_len=4096, heads=4, visited=0.09).backend == "flex"
    assert ch.cost_rule(q_len=2048, kv_len=2048, heads=4, visited=0.18).backend == "flex"
    assert ch.cost_rule(q_len=2048, kv_len=2048, heads=4, visited=0.53).backend == "dense"
    assert ch.cost_rule(q_len=256, kv_len=256, heads=4, visited=1.0, grid=True).backend == "dense"
    assert ch.cost_rule(q_len=4096, kv_len=4096, heads=4, visited=0.15, grid=True).backend \
        == "dense"


def modelled_train(backend, Lq, Lkv, H, visited):
    pairs = H * Lq * Lkv
    if backend == "dense":
        return ch.DENSE_TRAIN_NS * pairs * 1e-6
    return ch.TORCH_TRAIN_FIXED_MS + ch.TORCH_TRAIN_NS * pairs * visited * 1e-6


@pytest.mark.parametrize("L", [64, 512, 1024, 2048, 8192])
@pytest.mark.parametrize("visited", [0.02, 0.1, 0.5, 1.0])
def test_train_rule_picks_the_cheaper_model(L, visited):
    c = ch.train_cost_rule(q_len=L, kv_len=L, heads=4, visited=visited)
    if 4 * L * L > ch.DENSE_TRAIN_MAX_ELEMS:
        assert c.backend == "torch" and "dense training limit" in c.reason
        return
    t, d = modelled_train("torch", L, L, 4, visited), modelled_train("dense", L, L, 4, visited)
    assert c.backend == ("torch" if t < d else "dense"), c


def test_train_rule_on_what_was_measured():
    # bench/bench_choose.py --train: dense wins small and dense-ish steps, torch sparse and
    # long ones; runtime lists (documents) and the memory limit go to torch
    rule = ch.train_cost_rule
    assert rule(q_len=1024, kv_len=1024, heads=4, visited=0.53).backend == "dense"
    assert rule(q_len=256, kv_len=256, heads=4, visited=0.63).backend == "dense"
    assert rule(q_len=2048, kv_len=2048, heads=4, visited=0.15).backend == "torch"
    assert rule(q_len=2048, kv_len=2048, heads=4, visited=None).backend == "torch"
    big = rule(q_len=1024, kv_len=1024, heads=4, visited=1.0, batch=8)
    assert 4 * 1024 * 1024 <= ch.DENSE_TRAIN_MAX_ELEMS < 8 * 4 * 1024 * 1024
    assert big.backend == "torch" and "limit" in big.reason


def test_dense_training_matches_reference_with_empty_rows_and_gqa():
    p = attncc.parse("pattern t\nmask causal & q >= 3\nscore softcap(s, 5)\n")
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, 20, 8, generator=g, requires_grad=True)
    k, v = (torch.randn(2, 2, 20, 8, generator=g, requires_grad=True) for _ in range(2))
    for spec in (p, attncc.parse("pattern e\nmask k < q - 3\n")):
        out = attncc.compile(spec, backend="dense")(q, k, v)
        got = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
        ref = attncc.reference(spec, *leaves)
        want = torch.autograd.grad(ref, leaves, torch.ones_like(ref))
        for a, b in zip(got, want):
            assert torch.isfinite(a).all()
            assert (a.double() - b).abs().max() < 1e-5


def test_call_properties_override_the_rule():
    kw = dict(q_len=8192, kv_len=8192, heads=8, visited=0.05)
    assert ch.choose_cpu_backend(**kw).backend == "flex"
    assert ch.choose_cpu_backend(grad=True, **kw).backend == "torch"
    assert ch.choose_cpu_backend(float64=True, **kw).backend == "dense"
    assert ch.choose_cpu_backend(need_lse=True, **kw).backend == "dense"


def test_visited_fraction_of_a_causal_schedule():
    p = attncc.load("specs/causal.attn")
    s = build_schedule(p, 256, 256, heads=3, options=CompileOptions(block_m=64, block_n=64))
    assert ch.visited_fraction(s) == 10 / 16  # 4 + 3 + 2 + 1 of 4 × 4 tiles


def test_kernel_chooses_per_call_and_keeps_explicit_backends():
    p = attncc.load("specs/sliding_window.attn", window=16)
    kern = attncc.compile(p)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 48, 8, generator=g) for _ in range(3))
    ref, ref_lse = attncc.reference(p, q, k, v, return_lse=True)
    out = kern(q, k, v)
    assert kern.last_backend == "dense" and kern.last_choice.backend == "dense"
    assert (out.double() - ref).abs().max() < 1e-5
    out, lse = kern(q, k, v, return_lse=True)
    assert kern.last_backend == "dense" and (lse.double() - ref_lse).abs().max() < 1e-5
    qg = q.clone().requires_grad_()
    kern(qg, k, v).sum().backward()      # a small training step: dense autograd
    assert kern.last_backend == "dense" and kern.last_choice.reason.startswith(
        "gradients needed") and qg.grad is not None
    # A long sparse training step goes to the block-sparse torch backend (its tile fraction
    # from the schedule, nothing run).
    long = attncc.compile(attncc.load("specs/sliding_window.attn", window=256))
    choice = long.choose(2048, 2048, 2, grad=True)
    assert choice.backend == "torch" and "visits" in choice.reason
    explicit = attncc.compile(p, backend="reference")
    explicit(q, k, v)
    assert explicit.last_backend == "reference" and explicit.last_choice is None
    # A large sparse shape chooses flex (decided from the schedule, nothing run).
    choice = attncc.compile(attncc.load("specs/sliding_window.attn", window=256)).choose(
        8192, 8192, 4)
    assert choice.backend == "flex" and "visits" in choice.reason


def test_masks_reading_runtime_data_are_not_judged_by_a_static_schedule():
    kern = attncc.compile(attncc.load("specs/document.attn"))
    choice = kern.choose(2048, 2048, 4)
    assert choice.backend == "dense" and "decided at run time" in choice.reason
    assert kern._flex_visited == {}


def test_bench_shows_the_choice():
    from attncc.runtime.bench import bench_forward
    p = attncc.load("specs/sliding_window.attn", window=16)
    res = bench_forward(p, heads=2, q_len=64, head_dim=8, reps=1, warmup=0, baselines=())
    assert res.backend == "dense"
    assert res.timings[0].note.startswith("backend dense, chosen: small: modelled")


def test_dense_backend_matches_reference_with_score_gqa_and_empty_rows():
    p = attncc.parse("pattern t\nmask causal & q >= 3\nscore softcap(s, 5)\n")
    kern = attncc.compile(p, backend="dense")
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 20, 8, generator=g)
    k, v = (torch.randn(2, 2, 20, 8, generator=g) for _ in range(2))
    out, lse = kern(q, k, v, return_lse=True)
    ref, ref_lse = attncc.reference(p, q, k, v, return_lse=True)
    assert (out.double() - ref).abs().max() < 1e-5
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    assert bool((out[:, :, :3] == 0).all())
    q64, k64, v64 = q.double(), k.double(), v.double()
    assert (kern(q64, k64, v64) - ref).abs().max() < 1e-12
