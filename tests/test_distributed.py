"""Context parallelism (attncc.distributed): plans, layouts and multi-process runs on CPU.

Multi-process checks run W ranks with torch.multiprocessing (gloo over 127.0.0.1). Each
launch runs a batch of cases; every rank writes its shards of out, dq, dk, dv and its
communication counters to a file, and the parent compares them with `attncc.reference`
(float64 dense attention and its autograd gradients) and with the single-process call.
"""
from __future__ import annotations

import functools
import os
import socket

import pytest
import torch

import attncc
from attncc.distributed import ContextParallel, make_plan
from attncc.distributed import layout as lay
from attncc.distributed.plan import PlanError
from attncc.ir.inputs import InputError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECS = os.path.join(ROOT, "specs")
TILE = dict(block_m=16, block_n=16)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: intra-op threads only add contention on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def spec(name: str) -> str:
    return os.path.join(SPECS, name + ".attn")


def kernel(name: str, **params):
    return attncc.compile(spec(name), params=params or None, backend="reference", **TILE)


# name, params, L, inputs(L) -> dict
def _doc(L: int) -> dict:
    ids = torch.zeros(2, L, dtype=torch.int64)
    for row, cuts in enumerate(([L // 5, L // 5 + 7, L // 2 + 3], [L // 3])):
        for c in cuts:
            ids[row, c:] += 1
    return {"doc": ids}


CASES = {
    "causal": ("causal", {}, 70, None),
    "sliding_window": ("sliding_window", {"window": 16}, 67, None),
    "chunked": ("chunked", {"chunk": 24}, 61, None),
    "document": ("document", {}, 66, _doc),
    "natten2d": ("natten2d", {"height": 7, "width": 9, "kernel": 3}, 63, None),
    "softcap": ("softcap", {"cap": 2.0}, 45, None),
    "alibi": ("alibi", {}, 38, None),
}


def _tensors(L: int, seed: int, B=2, Hq=2, Hkv=1, D=8):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, L, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, L, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, L, D, generator=g, dtype=torch.float64)
    dout = torch.randn(B, Hq, L, D, generator=g, dtype=torch.float64)
    return q, k, v, dout


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# A rank stuck in a collective prints its stack and exits (the test fails, never hangs).
RANK_TIMEOUT_S = 240


def _worker(rank: int, world: int, port: int, jobs: list, outdir: str) -> None:
    import faulthandler
    import torch.distributed as dist
    faulthandler.dump_traceback_later(RANK_TIMEOUT_S, exit=True)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = {}
    try:
        for job in jobs:
            results[job["id"]] = _run_job(job)
    finally:
        torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
        dist.barrier()
        dist.destroy_process_group()


def _run_job(job: dict) -> dict:
    name, params, L, make_inputs = CASES[job["case"]]
    kern = kernel(name, **params)
    cp = ContextParallel(kern, balance=job["balance"])
    if job.get("kind") == "errors":
        return _errors(cp, L)
    q, k, v, dout = _tensors(L, job["seed"])
    inputs = make_inputs(L) if make_inputs else {}
    q_l, k_l, v_l = (cp.shard(t, **inputs).requires_grad_() for t in (q, k, v))
    call_inputs = {n: (cp.shard(t) if job.get("sharded_inputs") else t) for n, t in inputs.items()}
    cp.traffic.reset()
    out_l = cp(q_l, k_l, v_l, **call_inputs)
    out_l.backward(cp.shard(dout))
    plan = cp.last_plan
    me = plan.ranks[cp.rank]
    return {"out": out_l.detach(), "dq": q_l.grad, "dk": k_l.grad, "dv": v_l.grad,
            "owned": cp.layout(L).owned[cp.rank], "balance": plan.balance,
            "traffic": (cp.traffic.forward_sent, cp.traffic.forward_received,
                        cp.traffic.backward_sent, cp.traffic.backward_received),
            "plan": (me.send_bytes, me.recv_bytes), "recv_tokens": me.fetch(),
            "unshard": cp.unshard(out_l.detach())}


def _errors(cp, L: int) -> dict:
    """Bad input on every rank at once: each must raise (and none hang)."""
    q, k, v, _ = _tensors(L, 0)
    q_l, k_l, v_l = cp.shard(q), cp.shard(k), cp.shard(v)
    msgs = {}
    try:
        cp.shard(q_l)
    except InputError as e:
        msgs["twice"] = str(e)
    try:   # the global tensor where a shard is expected
        cp(q, k_l, v_l)
    except InputError as e:
        msgs["global"] = str(e)
    try:   # heads differ between ranks
        cp(q_l[:, : 1 + cp.rank % 2], k_l, v_l)
    except InputError as e:
        msgs["heads"] = str(e)
    return msgs


def _launch(world: int, jobs: list, tmp_path) -> list[dict]:
    import torch.multiprocessing as mp
    outdir = str(tmp_path)
    mp.start_processes(_worker, args=(world, _free_port(), jobs, outdir), nprocs=world,
                       join=True, start_method="spawn")
    return [torch.load(os.path.join(outdir, f"rank{r}.pt")) for r in range(world)]


def _reference(job: dict):
    return _reference_of(job["case"], job["seed"])


@functools.lru_cache(maxsize=None)
def _reference_of(case: str, seed: int):
    name, params, L, make_inputs = CASES[case]
    kern = kernel(name, **params)
    q, k, v, dout = _tensors(L, seed)
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    inputs = make_inputs(L) if make_inputs else {}
    out = attncc.reference(kern.pattern, q, k, v, **inputs)
    out.backward(dout)
    # the single-process kernel (block-sparse torch backend) and ContextParallel without a
    # process group (one rank, the same local path as every rank)
    torch_kern = attncc.compile(spec(name), params=params or None, backend="torch", **TILE)
    single = torch_kern(q.detach(), k.detach(), v.detach(), **inputs)
    torch.testing.assert_close(single, out.detach(), rtol=1e-9, atol=1e-9)
    single = ContextParallel(kern)(q.detach(), k.detach(), v.detach(), **inputs)
    return out.detach(), q.grad, k.grad, v.grad, single, kern, L, inputs


def _check(world: int, jobs: list, results: list[dict]) -> None:
    for job in jobs:
        out, dq, dk, dv, single, kern, L, inputs = _reference(job)
        torch.testing.assert_close(single, out, rtol=1e-9, atol=1e-9)
        owned_all = []
        sent = recv = 0
        for rank, res in enumerate(results):
            r = res[job["id"]]
            idx = r["owned"]
            owned_all.append(idx)
            msg = f"{job} rank {rank}"
            torch.testing.assert_close(r["out"], out[:, :, idx], rtol=1e-9, atol=1e-9, msg=msg)
            torch.testing.assert_close(r["dq"], dq[:, :, idx], rtol=1e-9, atol=1e-9, msg=msg)
            torch.testing.assert_close(r["dk"], dk[:, :, idx], rtol=1e-9, atol=1e-9, msg=msg)
            torch.testing.assert_close(r["dv"], dv[:, :, idx], rtol=1e-9, atol=1e-9, msg=msg)
            torch.testing.assert_close(r["unshard"], out, rtol=1e-9, atol=1e-9, msg=msg)
            fs, fr, bs, br = r["traffic"]
            ps, pr = r["plan"]
            # bytes counted at isend/irecv equal the plan's, forward and backward
            assert (fs, fr) == (ps, pr), msg
            assert (bs, br) == (pr, ps), msg
            sent += fs
            recv += fr
            if job["balance"] != "auto":
                assert r["balance"] == job["balance"]
        assert sent == recv
        # the shards partition the sequence
        assert torch.equal(torch.sort(torch.cat(owned_all)).values, torch.arange(L))
        # the plan in the parent (no processes) agrees with what the ranks did
        plan = make_plan(kern, L, world=world, balance=results[0][job["id"]]["balance"],
                         heads=2, kv_heads=1, batch=2, head_dim=8, dtype=torch.float64,
                         inputs=inputs or None, exact=True)
        assert plan.total_bytes == sent
        for rank, res in enumerate(results):
            assert plan.ranks[rank].fetch() == res[job["id"]]["recv_tokens"]


def test_two_ranks_outputs_gradients_and_bytes(tmp_path):
    jobs = []
    for i, case in enumerate(CASES):
        for balance in ("contiguous", "auto"):
            jobs.append({"id": f"{case}-{balance}", "case": case, "balance": balance, "seed": i})
    # document ids passed to the call as this rank's shard instead of globally
    jobs.append({"id": "document-sharded", "case": "document", "balance": "document", "seed": 9,
                 "sharded_inputs": True})
    results = _launch(2, jobs, tmp_path)
    _check(2, jobs, results)


@pytest.mark.slow
def test_eight_ranks(tmp_path):
    jobs = [{"id": f"{case}-auto", "case": case, "balance": "auto", "seed": i}
            for i, case in enumerate(("causal", "sliding_window", "document", "natten2d"))]
    results = _launch(8, jobs, tmp_path)
    _check(8, jobs, results)


def test_four_ranks_balanced(tmp_path):
    jobs = [{"id": "causal-ht", "case": "causal", "balance": "headtail", "seed": 1},
            {"id": "sw-cont", "case": "sliding_window", "balance": "contiguous", "seed": 2},
            {"id": "doc-doc", "case": "document", "balance": "document", "seed": 3},
            {"id": "natten-grid", "case": "natten2d", "balance": "grid", "seed": 4},
            {"id": "chunked-auto", "case": "chunked", "balance": "auto", "seed": 5},
            {"id": "alibi-ht", "case": "alibi", "balance": "headtail", "seed": 6},
            {"id": "errors", "case": "causal", "balance": "contiguous", "seed": 0,
             "kind": "errors"}]
    results = _launch(4, jobs, tmp_path)
    _check(4, jobs[:-1], results)
    for rank, res in enumerate(results):
        msgs = res["errors"]
        assert "already a shard" in msgs["twice"]
        assert "q_l: the ranks hold [70, 70, 70, 70] queries" in msgs["global"]
        assert "query heads differ across the group's ranks: [1, 2, 1, 2]" in msgs["heads"]


# ---- plans without processes -----------------------------------------------------------------

def _brute_needed(kern, L, world, balance, inputs=None):
    """Per rank, the foreign keys its rows keep, from the dense mask (independent of tiles)."""
    B = inputs["doc"].shape[0] if inputs else 1
    mask = kern.pattern.dense_mask(q_len=L, kv_len=L, heads=1, batch=B,
                                   inputs=inputs or {}).any(0)[0]
    layout = lay.make_layout(balance, L, world, doc=(inputs or {}).get("doc"),
                             grid_shape=kern.pattern.layout.shape if kern.pattern.layout else None)
    out = []
    for r in range(world):
        need = mask[layout.owned[r]].any(0)
        need[layout.owned[r]] = False
        out.append(int(need.sum()))
    return out


@pytest.mark.parametrize("case,balance,world", [
    ("sliding_window", "contiguous", 4), ("causal", "headtail", 3), ("chunked", "contiguous", 5),
    ("document", "document", 3), ("natten2d", "grid", 4), ("natten2d", "contiguous", 3)])
def test_plan_fetches_exactly_the_kept_foreign_keys(case, balance, world):
    name, params, L, make_inputs = CASES[case]
    kern = kernel(name, **params)
    inputs = make_inputs(L) if make_inputs else None
    B = 2 if inputs else 1
    plan = make_plan(kern, L, world=world, balance=balance, head_dim=4, dtype=torch.float32,
                     inputs=inputs, exact=True, batch=B)
    want = _brute_needed(kern, L, world, balance, inputs)
    assert [r.recv_tokens for r in plan.ranks] == want
    assert all(r.recv_bytes == r.recv_tokens * B * 2 * 4 * 4 for r in plan.ranks)
    mask = kern.pattern.dense_mask(q_len=L, kv_len=L, batch=B, inputs=inputs or {})[:, 0]
    assert [r.kept_pairs for r in plan.ranks] == [
        int(mask[:, o].sum()) for o in plan.q_layout.owned]


def test_sliding_window_receives_at_most_window_tokens():
    W = 96
    kern = attncc.compile(spec("sliding_window"), params={"window": W}, backend="reference")
    for world, L in ((8, 4096), (5, 1001), (16, 8192 + 7)):
        plan = make_plan(kern, L, world=world, balance="contiguous", exact=True)
        for r in plan.ranks:
            fetch = r.fetch()
            assert set(fetch) <= {r.rank - 1}            # only from the left neighbour
            assert r.recv_tokens == (W - 1 if r.rank else 0)
        assert plan.total_bytes == (world - 1) * (W - 1) * plan.bytes_per_token
        assert plan.allgather_bytes() == (world - 1) * L * plan.bytes_per_token


def test_auto_balance_choices():
    causal = attncc.compile(spec("causal"), backend="reference")
    p = make_plan(causal, 8192, world=8)
    assert p.balance == "headtail" and p.imbalance < 1.01
    assert p.candidates["contiguous"][0] > 1.7
    sw = attncc.compile(spec("sliding_window"), params={"window": 128}, backend="reference")
    assert make_plan(sw, 8192, world=8).balance == "contiguous"
    nat = attncc.compile(spec("natten2d"), params={"height": 64, "width": 64, "kernel": 7},
                         backend="reference")
    p = make_plan(nat, world=16, q_len=4096)
    assert p.balance == "grid"
    assert p.total_bytes < p.candidates["contiguous"][1]


def test_layouts_are_partitions_and_shard_inverts():
    doc = torch.tensor([[0] * 40 + [1] * 3 + [2] * 17 + [3] * 29])
    for world in (1, 2, 3, 7):
        for L in (1, 5, 89):
            layouts = [lay.contiguous(L, world), lay.headtail(L, world),
                       lay.document(L, world, doc[:, :L])]
            for layout in layouts:
                allpos = torch.sort(torch.cat(layout.owned)).values
                assert torch.equal(allpos, torch.arange(L)), layout.kind
                assert torch.equal(layout.owner[layout.owned[world - 1]],
                                   torch.full_like(layout.owned[world - 1], world - 1))
    g = lay.grid((6, 10), 4)
    assert g.sizes() == [15] * 4
    assert lay.grid_factors((6, 10), 4) == (2, 2)
    kern = kernel("causal")
    cp = ContextParallel(kern)
    x = torch.randn(2, 3, 11, 4)
    assert torch.equal(cp.unshard(cp.shard(x)), x)


def test_plan_errors():
    doc_kern = kernel("document")
    with pytest.raises(PlanError, match="reads runtime input"):
        make_plan(doc_kern, 64, world=2)
    with pytest.raises(PlanError, match="balance='grid' needs a grid layout"):
        make_plan(kernel("causal"), 64, world=2, balance="grid")
    with pytest.raises(ValueError, match="balance must be 'auto' or one of"):
        ContextParallel(kernel("causal"), balance="zigzag")
    with pytest.raises(ValueError, match="world size must be a positive int"):
        make_plan(kernel("causal"), 64, world=0)
    bf = attncc.compile(spec("biformer"), params={"height": 8, "width": 8, "region": 4,
                                                 "topk": 1}, backend="reference")
    with pytest.raises(PlanError, match="route/blocks"):
        make_plan(bf, world=2)
