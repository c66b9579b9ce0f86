"""Kernels with pre-pass lists drop the per-element selection where it is constant per tile:
a `blocks` / `route` conjunct whose groups contain whole tiles (every listed tile is
selected), and keep it otherwise (groups smaller than tiles, or a selector under `|`)."""
import math

import torch

import attncc
from attncc.codegen.forward import generate_forward
from attncc.runtime.prepass_kernel import lower_selectors, runtime_classes
from attncc.runtime.options import CompileOptions

SEER = "specs/seer_gate.attn"


def _lowered(p, L, block, tile):
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 1, L, 16, generator=g), torch.randn(1, 1, L, 16, generator=g)
    gate = torch.randn(1, 1, -(-L // block), -(-L // block), generator=g)
    opts = CompileOptions(block_m=tile, block_n=tile)
    sched, _, selections = runtime_classes(p, q, k, {"gate": gate}, options=opts)
    lowered, tensors = lower_selectors(p, selections, (sched.q_grid, sched.kv_grid))
    return lowered, tensors, sched, opts


def test_aligned_blocks_need_no_selection_load():
    p = attncc.load(SEER, block=32, keep=0.5)
    lowered, tensors, sched, opts = _lowered(p, 96, 32, 16)
    assert tensors == {} and lowered.inputs == ()
    assert str(lowered.mask) == str(attncc.parse("pattern c\nmask causal").mask)
    assert "attncc_sel" not in generate_forward(lowered, sched, opts)


def test_misaligned_or_disjunctive_selection_keeps_the_load():
    p = attncc.load(SEER, block=8, keep=0.5)  # groups of 8 tokens inside 16-token tiles
    lowered, tensors, _, _ = _lowered(p, 64, 8, 16)
    assert list(tensors) == ["attncc_sel0"]
    p = attncc.parse("pattern o(block = 32)\ninput gate: float[b, h, q_blocks, k_blocks]\n"
                     "mask window(8) | blocks(gate, block = block, top = 0.5)")
    lowered, tensors, _, _ = _lowered(p, 64, 32, 16)
    assert list(tensors) == ["attncc_sel0"]


def test_aligned_kernel_matches_reference_with_tails():
    """Lq != Lkv, lengths not tile multiples, GQA, through the generated kernel."""
    p = attncc.load(SEER, block=32, keep=0.4)
    kern = attncc.compile(p, backend="interpret", block_m=16, block_n=16)
    g = torch.Generator().manual_seed(3)
    Lq, Lkv = 45, 61
    q = torch.randn(1, 2, Lq, 16, generator=g)
    k, v = (torch.randn(1, 1, Lkv, 16, generator=g) for _ in range(2))
    gate = torch.randn(1, 2, math.ceil(Lq / 32), math.ceil(Lkv / 32), generator=g)
    out, lse = kern(q, k, v, return_lse=True, gate=gate)
    ref, ref_lse = attncc.reference(p, q, k, v, return_lse=True, gate=gate)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), fin)
    torch.testing.assert_close(lse.double()[fin], ref_lse[fin], atol=1e-4, rtol=1e-4)
