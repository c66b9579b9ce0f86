"""Decode against a KV cache (`Kernel.decode`): equals the last Lq rows of the square problem.

The oracle is built here, independently of attncc's decode code: the first L cached tokens of
each sequence (L = cache_seqlens[b]) in logical order, the new queries at positions
L − Lq … L − 1 (earlier rows zero), inputs sliced to the square problem, then the dense
float64 `attncc.reference` (or the full-sequence `kern(...)` of the "torch" backend), last
Lq rows. Caches are contiguous or paged with shuffled page tables.
"""
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attncc
from attncc.ir.inputs import InputError, InputTypeError
from attncc.runtime.decode import append_kv
from attncc.schedule.decode import DecodeError, decode_schedule, key_ranges, merge_ranges

SPECS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "specs")
PAGE = 16

LIBRARY = {
    "causal": {},
    "sliding_window": {"window": 20},
    "streaming_sinks": {"sinks": 3, "window": 12},
    "chunked": {"chunk": 24},
    "document": {},
    "moa": {"sink": 2, "short": 6, "long": 30, "split": 2},
    "alibi": {},
    "softcap": {"cap": 5.0},
    "seer_gate": {"block": 16, "keep": 0.4},
    "moh": {},
    "prefix_lm": {"prefix": 9},
}


def load(name):
    return attncc.load(os.path.join(SPECS, f"{name}.attn"), **LIBRARY[name])


def make_inputs(p, B, Hq, Lq, Lmax, gen):
    """Inputs as decode takes them: `k` dims over cache positions, `q` dims for new rows,
    block dims over cache blocks."""
    out = {}
    for d in p.inputs:
        if d.name == "doc":
            out["doc"] = torch.cumsum((torch.rand(B, Lmax, generator=gen) < 0.08).long(), 1)
        elif d.name == "weight":
            w = torch.rand(B, Lq, Hq, generator=gen)
            out["weight"] = w * (torch.rand(B, Lq, Hq, generator=gen) < 0.7)
        elif d.name == "gate":
            nb = -(-Lmax // p.param_dict["block"])
            out["gate"] = torch.randn(B, Hq, nb, nb, generator=gen)
    return out


def square_inputs(p, inputs, b, L, Lq):
    out = {}
    for name, t in inputs.items():
        if name == "doc":
            out[name] = t[b:b + 1, :L]
        elif name == "weight":
            out[name] = torch.cat([t.new_zeros(1, L - Lq, t.shape[2]), t[b:b + 1]], 1)
        elif name == "gate":
            nb = -(-L // p.param_dict["block"])
            out[name] = t[b:b + 1, :, :nb, :nb]
    return out


def oracle(p, q, K, V, seqlens, inputs, run=None):
    """Last Lq rows of the square problem per sequence, float64 (K, V contiguous logical)."""
    B, Hq, Lq, D = q.shape
    outs = []
    for b in range(B):
        L = int(seqlens[b])
        qf = torch.zeros(1, Hq, L, D, dtype=q.dtype)
        qf[:, :, L - Lq:] = q[b:b + 1]
        ins = square_inputs(p, inputs, b, L, Lq)
        if run is None:
            o = attncc.reference(p, qf, K[b:b + 1, :, :L], V[b:b + 1, :, :L], **ins)
        else:
            o = run(qf, K[b:b + 1, :, :L], V[b:b + 1, :, :L], **ins)
        outs.append(o[0, :, L - Lq:].to(torch.float64))
    return torch.stack(outs)


def paginate(K, V, gen, extra=3):
    """A paged copy of contiguous caches with a shuffled page table (and spare pages)."""
    B, Hkv, Lmax, D = K.shape
    n = Lmax // PAGE
    pages = B * n + extra
    perm = torch.randperm(pages, generator=gen)[:B * n]
    table = perm.view(B, n).to(torch.int32)
    kp = torch.randn(pages, Hkv, PAGE, D, generator=gen)
    vp = torch.randn(pages, Hkv, PAGE, V.shape[3], generator=gen)
    for b in range(B):
        for j in range(n):
            kp[table[b, j]] = K[b, :, j * PAGE:(j + 1) * PAGE]
            vp[table[b, j]] = V[b, :, j * PAGE:(j + 1) * PAGE]
    return kp, vp, table


def case(name, B, Hkv, G, Lq, Lmax, lens, seed, D=16):
    p = load(name)
    gen = torch.Generator().manual_seed(seed)
    Hq = Hkv * G
    q = torch.randn(B, Hq, Lq, D, generator=gen)
    K = torch.randn(B, Hkv, Lmax, D, generator=gen)
    V = torch.randn(B, Hkv, Lmax, D, generator=gen)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    return p, q, K, V, seqlens, make_inputs(p, B, Hq, Lq, Lmax, gen), gen


@st.composite
def decode_cases(draw):
    name = draw(st.sampled_from(sorted(LIBRARY)))
    B = draw(st.integers(1, 3))
    Hkv, G = draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2, 3]))
    Lq = draw(st.sampled_from([1, 2, 7]))
    Lmax = PAGE * draw(st.integers(2, 5))
    lens = [draw(st.sampled_from([1 if Lq == 1 else Lq, Lq, Lmax])
                 | st.integers(Lq, Lmax)) for _ in range(B)]
    paged = draw(st.booleans())
    return name, B, Hkv, G, Lq, Lmax, lens, paged, draw(st.integers(0, 2 ** 16))


@given(decode_cases())
def test_decode_torch_path_equals_square_reference(c):
    name, B, Hkv, G, Lq, Lmax, lens, paged, seed = c
    p, q, K, V, seqlens, inputs, gen = case(name, B, Hkv, G, Lq, Lmax, lens, seed)
    want = oracle(p, q, K, V, seqlens, inputs)
    kc, vc, table = paginate(K, V, gen) if paged else (K, V, None)
    got, lse = attncc.compile(p).decode(q, kc, vc, seqlens, table, return_lse=True, **inputs)
    assert got.shape == (B, Hkv * G, Lq, V.shape[3]) and lse.shape == (B, Hkv * G, Lq)
    torch.testing.assert_close(got.to(torch.float64), want, atol=2e-5, rtol=1e-4)
    ref = attncc.compile(p, backend="reference").decode(q, kc, vc, seqlens, table, **inputs)
    torch.testing.assert_close(ref.to(torch.float64), want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["sliding_window", "document", "seer_gate"])
def test_decode_equals_full_sequence_kernel(name):
    """Decode vs the last rows of `kern(q, k, v)` over the whole sequence (torch backend)."""
    p, q, K, V, seqlens, inputs, gen = case(name, 2, 2, 2, 2, 64, [64, 37], 5)
    full = attncc.compile(p, backend="torch")
    want = oracle(p, q, K, V, seqlens, inputs, run=full)
    kc, vc, table = paginate(K, V, gen)
    got = attncc.compile(p).decode(q, kc, vc, seqlens, table, **inputs)
    torch.testing.assert_close(got.to(torch.float64), want, atol=2e-5, rtol=1e-4)


# The generated kernel through Triton's interpreter: few, small cases (the interpreter is slow).
INTERPRET = [
    ("sliding_window", 2, 2, 2, 2, 64, [64, 23], True, torch.float32),
    ("streaming_sinks", 1, 1, 3, 7, 48, [45], False, torch.float16),
    ("seer_gate", 2, 1, 2, 7, 48, [48, 7], True, torch.float32),
    ("moh", 2, 2, 1, 1, 32, [1, 30], False, torch.float32),
]


@pytest.mark.parametrize("name,B,Hkv,G,Lq,Lmax,lens,paged,dtype", INTERPRET)
def test_decode_kernel_interpreter(name, B, Hkv, G, Lq, Lmax, lens, paged, dtype):
    p, q, K, V, seqlens, inputs, gen = case(name, B, Hkv, G, Lq, Lmax, lens, 11)
    q, K, V = q.to(dtype), K.to(dtype), V.to(dtype)
    want = oracle(p, q, K, V, seqlens, inputs)
    kc, vc, table = paginate(K.float(), V.float(), gen) if paged else (K, V, None)
    kc, vc = kc.to(dtype), vc.to(dtype)
    kern = attncc.compile(p, backend="interpret")
    got, lse = kern.decode(q, kc, vc, seqlens, table, return_lse=True, **inputs)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.to(torch.float64), want, atol=tol, rtol=tol)
    _, lse_t = attncc.compile(p).decode(q.float(), kc.float(), vc.float(), seqlens, table,
                                        return_lse=True, **inputs)
    torch.testing.assert_close(lse, lse_t, atol=tol, rtol=tol)
    assert kern.last_decode["tiles"] >= 1


def test_bounded_window_reads_bounded_key_tiles():
    """Window 256: the key tiles the decode kernel visits do not grow with the cache."""
    p = attncc.load(os.path.join(SPECS, "sliding_window.attn"), window=256)
    kern = attncc.compile(p, backend="interpret")
    tiles, keys = [], []
    for L in (4096, 65536):
        q = torch.randn(1, 2, 1, 16)
        kc = torch.randn(1, 1, L, 16)
        seqlens = torch.tensor([L], dtype=torch.int32)
        out = kern.decode(q, kc, kc, seqlens)
        assert torch.isfinite(out).all()
        tiles.append(kern.last_decode["tiles"])
        keys.append(kern.last_decode["keys_read"])
    assert tiles[0] == tiles[1] == 256 // kern.last_decode["block_n"]
    assert keys == [256, 256]
    # the schedule's closed form: one range [L - 256, L) per sequence, for any L
    sched = decode_schedule(p, 2)
    r = key_ranges(sched, torch.tensor([4096, 65536, 100]), 1, 1)
    assert r[:, 0, 0].tolist() == [[4096 - 256, 4096], [65536 - 256, 65536], [0, 100]]


def test_schedule_closed_forms():
    s = decode_schedule(load("streaming_sinks"), 1)
    r = key_ranges(s, torch.tensor([200]), 2, 1)
    assert r[0, 0].tolist() == [[0, 3], [200 - 13, 200]]
    s = decode_schedule(load("moa"), 4)        # heads 0,1 short span, 2,3 long span
    r = key_ranges(s, torch.tensor([100]), 1, 2)
    assert r[0, 0].tolist() == [[0, 2], [94, 100]] and r[0, 1].tolist() == [[0, 2], [70, 100]]
    s = decode_schedule(load("chunked"), 1)
    assert key_ranges(s, torch.tensor([50]), 1, 1)[0, 0].tolist() == [[48, 50]]
    assert s.closed_form and decode_schedule(load("document"), 1).documents == ("doc",)
    gate = decode_schedule(load("seer_gate"), 1)
    assert len(gate.blocks) == 1 and gate.blocks[0].input == "gate"


@settings(max_examples=40)
@given(st.lists(st.tuples(st.integers(0, 40), st.integers(0, 40)), min_size=1, max_size=6))
def test_merge_ranges_is_the_union(pairs):
    r = torch.tensor(pairs, dtype=torch.int64)[None]
    m = merge_ranges(r)[0].tolist()
    want = set()
    for lo, hi in pairs:
        want |= set(range(lo, hi))
    got = [k for lo, hi in m for k in range(lo, hi)]
    assert sorted(got) == sorted(want) and len(got) == len(set(got))
    nonempty = [x for x in m if x[1] > x[0]]
    assert nonempty == sorted(nonempty) and m[len(nonempty):] == [[0, 0]] * (len(m) - len(nonempty))


@pytest.mark.parametrize("paged", [False, True])
def test_append_kv_serving_loop(paged):
    """Prefill 20 tokens, then decode 2 steps of 1 token, appending K/V each step."""
    p = load("streaming_sinks")
    kern = attncc.compile(p)
    gen = torch.Generator().manual_seed(3)
    B, Hkv, D, Lmax, total = 2, 2, 16, 48, 22
    K = torch.randn(B, Hkv, total, D, generator=gen)
    V = torch.randn(B, Hkv, total, D, generator=gen)
    Q = torch.randn(B, 4, total, D, generator=gen)
    if paged:
        table = torch.randperm(B * Lmax // PAGE, generator=gen).view(B, -1).to(torch.int32)
        kc = torch.zeros(B * Lmax // PAGE, Hkv, PAGE, D)
    else:
        table, kc = None, torch.zeros(B, Hkv, Lmax, D)
    vc = torch.zeros_like(kc)
    lens = append_kv(kc, vc, K[:, :, :20], V[:, :, :20], torch.zeros(B, dtype=torch.int32), table)
    assert lens.tolist() == [20, 20] and lens.dtype == torch.int32
    for t in (20, 21):
        lens = append_kv(kc, vc, K[:, :, t:t + 1], V[:, :, t:t + 1], lens, table)
        got = kern.decode(Q[:, :, t:t + 1], kc, vc, lens, table)
        want = attncc.reference(p, Q[:, :, :t + 1], K[:, :, :t + 1], V[:, :, :t + 1])[:, :, -1:]
        torch.testing.assert_close(got.to(torch.float64), want, atol=2e-5, rtol=1e-4)
    with pytest.raises(InputError, match="exceeds the cache capacity of 48"):
        append_kv(kc, vc, torch.zeros(B, Hkv, 27, D), torch.zeros(B, Hkv, 27, D), lens, table)


def _bad_call(**changes):
    p = load("sliding_window")
    args = dict(q=torch.randn(2, 4, 2, 16), k_cache=torch.randn(2, 2, 32, 16),
                v_cache=torch.randn(2, 2, 32, 16), cache_seqlens=torch.tensor([32, 5], dtype=torch.int32),
                block_table=None)
    args.update(changes)
    attncc.compile(p).decode(args.pop("q"), args.pop("k_cache"), args.pop("v_cache"),
                             args.pop("cache_seqlens"), args.pop("block_table"))


def test_bad_inputs_name_the_argument():
    with pytest.raises(InputError, match=r"cache_seqlens\[0\] = 33 exceeds the cache length 32 of k_cache"):
        _bad_call(cache_seqlens=torch.tensor([33, 5], dtype=torch.int32))
    with pytest.raises(InputError, match=r"cache_seqlens\[1\] = 1 is less than the 2 new tokens of q"):
        _bad_call(cache_seqlens=torch.tensor([32, 1], dtype=torch.int32))
    with pytest.raises(InputTypeError, match="cache_seqlens must have dtype int32, got int64"):
        _bad_call(cache_seqlens=torch.tensor([32, 5]))
    with pytest.raises(InputError, match="q has 3 heads, not a multiple of the 2 heads of k_cache"):
        _bad_call(q=torch.randn(2, 3, 2, 16))
    with pytest.raises(InputError, match=r"v_cache has shape \[2, 3, 32, 16\]"):
        _bad_call(v_cache=torch.randn(2, 3, 32, 16))
    pages = torch.randn(6, 2, 8, 16)
    table = torch.arange(6, dtype=torch.int32).view(2, 3)
    with pytest.raises(InputError, match=r"cache_seqlens\[0\] = 32 exceeds the 3 pages x 8 tokens of block_table"):
        _bad_call(k_cache=pages, v_cache=pages, block_table=table)
    with pytest.raises(InputTypeError, match="block_table must have dtype int32, got int64"):
        _bad_call(k_cache=pages, v_cache=pages, block_table=table.long(),
                  cache_seqlens=torch.tensor([20, 5], dtype=torch.int32))
    with pytest.raises(InputError, match=r"block_table\[1, 0\] = 9 is not a page of k_cache"):
        _bad_call(k_cache=pages, v_cache=pages, block_table=table + torch.tensor([[0], [6]], dtype=torch.int32),
                  cache_seqlens=torch.tensor([20, 5], dtype=torch.int32))
    with pytest.raises(InputError, match="k_cache has batch size 3, expected 2"):
        _bad_call(k_cache=torch.randn(3, 2, 32, 16), v_cache=torch.randn(3, 2, 32, 16))


def test_route_has_no_decode_form():
    p = attncc.parse("pattern r\nmask causal & route(region = 8, topk = 2)\n")
    with pytest.raises(DecodeError, match="route"):
        attncc.compile(p).decode(torch.randn(1, 1, 1, 16), torch.randn(1, 1, 16, 16),
                                 torch.randn(1, 1, 16, 16), torch.tensor([16], dtype=torch.int32))


class PageAllocator:
    """The README's page allocator (a free list plus the block table)."""

    def __init__(self, num_pages, page_size, batch, max_pages):
        self.free, self.page = list(range(num_pages)), page_size
        self.table = torch.zeros(batch, max_pages, dtype=torch.int32)

    def reserve(self, b, old_len, new_len):
        for j in range(-(-old_len // self.page), -(-new_len // self.page)):
            self.table[b, j] = self.free.pop()

    def release(self, b, length):
        self.free += self.table[b, : -(-length // self.page)].tolist()


def test_readme_page_allocator_with_ragged_sequences():
    p = load("chunked")
    kern = attncc.compile(p)
    gen = torch.Generator().manual_seed(4)
    B, Hkv, D = 2, 1, 16
    alloc = PageAllocator(num_pages=9, page_size=PAGE, batch=B, max_pages=4)
    kp = torch.zeros(9, Hkv, PAGE, D)
    vp = torch.zeros_like(kp)
    K, V = torch.randn(B, Hkv, 40, D, generator=gen), torch.randn(B, Hkv, 40, D, generator=gen)
    lens = torch.zeros(B, dtype=torch.int32)
    for b, n in ((0, 33), (1, 17)):       # prefill different lengths, one sequence at a time
        alloc.reserve(b, 0, n)
    for b, n in ((0, 33), (1, 17)):
        new = append_kv(kp, vp, K[b:b + 1, :, :n], V[b:b + 1, :, :n], lens[b:b + 1],
                        alloc.table[b:b + 1])
        lens[b] = new[0]
    for b in range(B):
        alloc.reserve(b, int(lens[b]), int(lens[b]) + 1)
    lens = append_kv(kp, vp, torch.stack([K[0, :, 33:34], K[1, :, 17:18]]),
                     torch.stack([V[0, :, 33:34], V[1, :, 17:18]]), lens, alloc.table)
    q = torch.randn(B, 2, 1, D, generator=gen)
    got = kern.decode(q, kp, vp, lens, alloc.table)
    for b, L in ((0, 34), (1, 18)):
        qf = torch.zeros(1, 2, L, D)
        qf[:, :, -1:] = q[b:b + 1]
        want = attncc.reference(p, qf, K[b:b + 1, :, :L], V[b:b + 1, :, :L])[:, :, -1:]
        torch.testing.assert_close(got[b:b + 1].to(torch.float64), want, atol=2e-5, rtol=1e-4)
    alloc.release(0, 34)
    assert len(alloc.free) == 9 - 2   # sequence 1 still holds its 2 pages


def test_cli_bench_decode(capsys):
    from attncc.cli import main
    rc = main(["bench", os.path.join(SPECS, "sliding_window.attn"), "-p", "window=64",
               "--decode", "--kv-len", "512", "--head-dim", "16", "--heads", "4",
               "--kv-heads", "2", "--no-flex"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "sliding_window decode: B=1 cache=512 Lq=1 Hq=4 Hkv=2 D=16" in out
    # attncc reads the 64 window keys: 64 keys x 2 heads x (16 + 16) x 4 bytes
    row = next(line for line in out.splitlines() if line.startswith("| attncc |"))
    assert row.split("|")[4].strip() == f"{64 * 2 * 32 * 4 / 2 ** 20:,.1f}"
