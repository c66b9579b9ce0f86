"""Exact error messages of call-time validation (q/k/v and declared inputs)."""
import pytest
import torch

from attncc.ir.inputs import InputError, InputTypeError, check_inputs, check_qkv
from attncc.ir.nodes import Binary, Blocks, Const, Load, Var
from attncc.ir.pattern import InputDecl, Pattern


def t(*shape, dtype=torch.float32, device="cpu"):
    return torch.zeros(*shape, dtype=dtype, device=device)


def qkv_error(q, k, v):
    with pytest.raises(InputError) as e:
        check_qkv(q, k, v)
    return str(e.value)


def test_check_qkv_accepts_gqa_and_returns_sizes():
    assert check_qkv(t(2, 6, 5, 8), t(2, 3, 7, 8), t(2, 3, 7, 4)) == (2, 6, 3, 5, 7, 8, 4)
    for dt in (torch.float16, torch.bfloat16, torch.float64):
        check_qkv(t(1, 1, 1, 2, dtype=dt), t(1, 1, 1, 2, dtype=dt), t(1, 1, 1, 2, dtype=dt))


@pytest.mark.parametrize("args, message", [
    ((t(2, 4, 5, 8), t(2, 4, 5, 8), [1]), "v must be a torch.Tensor, got list"),
    ((t(4, 5, 8), t(2, 4, 5, 8), t(2, 4, 5, 8)),
     "q must be 4-D [batch, heads, seq_len, head_dim], got shape [4, 5, 8]"),
    ((t(2, 4, 5, 8), t(3, 4, 5, 8), t(2, 4, 5, 8)),
     "k has batch size 3, expected 2 (the batch size of q)"),
    ((t(2, 4, 5, 8), t(2, 4, 5, 8), t(2, 2, 5, 8)), "v has 2 heads, expected 4 (the heads of k)"),
    ((t(2, 6, 5, 8), t(2, 4, 5, 8), t(2, 4, 5, 8)),
     "q has 6 heads, not a multiple of the 4 heads of k (grouped-query attention needs an "
     "integer ratio Hq / Hkv, got 6/4)"),
    ((t(2, 4, 5, 8), t(2, 4, 6, 8), t(2, 4, 5, 8)),
     "v has sequence length 5, expected 6 (the length of k)"),
    ((t(2, 4, 5, 8), t(2, 4, 6, 16), t(2, 4, 6, 8)),
     "k has head dim 16, expected 8 (the head dim of q)"),
    ((t(1, 1, 2, 2, dtype=torch.int64),) * 3,
     "q has dtype int64; supported: float16, bfloat16, float32, float64"),
    ((t(1, 1, 2, 2), t(1, 1, 2, 2, dtype=torch.float16), t(1, 1, 2, 2)),
     "k has dtype float16, expected float32 (the dtype of q)"),
    ((t(1, 1, 2, 2), t(1, 1, 2, 2), t(1, 1, 2, 2, device="meta")),
     "v is on meta, expected cpu (the device of q)"),
])
def test_check_qkv_messages(args, message):
    assert qkv_error(*args) == message


def test_dtype_errors_are_type_errors():
    with pytest.raises(TypeError):
        check_qkv(t(1, 1, 2, 2, dtype=torch.int32), t(1, 1, 2, 2), t(1, 1, 2, 2))
    with pytest.raises(TypeError):
        check_qkv("q", t(1, 1, 2, 2), t(1, 1, 2, 2))


DOC = Pattern("document", (), None, (InputDecl("doc", "int", ("b", "k")),),
              Binary("eq", Load("doc", (Var("b"), Var("q")), "int"),
                     Load("doc", (Var("b"), Var("k")), "int")))
SEER = Pattern("seer_gate", (), None,
               (InputDecl("gate", "float", ("b", "h", "q_blocks", "k_blocks")),
                InputDecl("flags", "bool", (3,))),
               Binary("and", Blocks("gate", 64, top=0.1),
                      Load("flags", (Const(0),), "bool")))
SIZES = dict(batch=2, heads=4, q_len=128, kv_len=130)


def input_error(pattern, inputs, **kw):
    with pytest.raises(InputError) as e:
        check_inputs(pattern, inputs, **{**SIZES, **kw})
    return str(e.value)


def test_check_inputs_accepts_and_resolves_blocks():
    doc = t(2, 130, dtype=torch.int32)
    assert check_inputs(DOC, {"doc": doc}, **SIZES)["doc"] is doc
    got = check_inputs(SEER, {"flags": t(3, dtype=torch.bool), "gate": t(2, 4, 2, 3)}, **SIZES)
    assert list(got) == ["gate", "flags"]  # declaration order


def test_check_inputs_messages():
    assert input_error(DOC, {}) == "missing input 'doc': expected int[b, k] = [2, 130]"
    assert input_error(DOC, {"doc": t(2, 130, dtype=torch.int64), "dco": 1}) == (
        "unknown input 'dco' for pattern 'document' (declared: 'doc'); did you mean 'doc'?")
    assert input_error(DOC, {"doc": t(2, 128, dtype=torch.int64)}) == (
        "input 'doc' has shape [2, 128], expected int[b, k] = [2, 130]")
    assert input_error(DOC, {"doc": t(2, 130)}) == (
        "input 'doc' has dtype float32, expected an integer tensor: int[b, k] = [2, 130]")
    assert input_error(DOC, {"doc": t(2, 130, dtype=torch.bool)}) == (
        "input 'doc' has dtype bool, expected an integer tensor: int[b, k] = [2, 130]")
    assert input_error(DOC, {"doc": [0, 1]}) == (
        "input 'doc' must be a torch.Tensor, got list; expected int[b, k] = [2, 130]")
    assert input_error(DOC, {"doc": t(2, 130, dtype=torch.int64, device="meta")},
                       device="cpu") == "input 'doc' is on meta, expected cpu (the device of q)"
    assert input_error(SEER, {"gate": t(2, 4, 2, 2), "flags": t(3, dtype=torch.bool)}) == (
        "input 'gate' has shape [2, 4, 2, 2], expected "
        "float[b, h, q_blocks, k_blocks] = [2, 4, 2, 3]")
    assert input_error(SEER, {"gate": t(2, 4, 2, 3), "flags": t(3, dtype=torch.uint8)}) == (
        "input 'flags' has dtype uint8, expected a bool tensor: bool[3] = [3]")
    with pytest.raises(TypeError):
        check_inputs(DOC, {"doc": t(2, 130)}, **SIZES)


def test_q_blocks_without_blocks_selector():
    p = Pattern("x", (), None, (InputDecl("g", "float", ("q_blocks",)),),
                Binary("gt", Load("g", (Const(0),), "float"), Const(0.0)))
    assert input_error(p, {"g": t(2)}) == (
        "input 'g' uses q_blocks, but the mask has no blocks(...) selector that fixes the "
        "block size")


def test_no_inputs_declared():
    p = Pattern("c", (), None, (), Binary("le", Var("k"), Var("q")))
    assert input_error(p, {"bias": t(1)}) == "unknown input 'bias' for pattern 'c' (declared: none)"
    assert check_inputs(p, {}, **SIZES) == {}
    assert isinstance(InputTypeError("x"), ValueError)
