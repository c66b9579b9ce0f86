"""attncc: a declarative attention compiler.

Public API (DESIGN §9):

    p = attncc.load("specs/natten2d.attn", kernel=7)   # or attncc.parse(text, **params)
    p.dense_mask(q_len, kv_len, heads, batch, inputs)   # torch.bool [B, H, Lq, Lkv]
    attncc.reference(p, q, k, v, **inputs)              # float64 dense attention
    kern = attncc.compile(p)                            # kernel object
    @attncc.pattern(layout=attncc.grid(y=64, x=64))     # decorator frontend

Names are imported lazily so `import attncc` stays cheap (no torch/triton import until used).
"""
from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

_EXPORTS = {
    "SpecError": "attncc.frontend.errors",
    "Pattern": "attncc.ir.pattern",
    "Layout": "attncc.ir.pattern",
    "load": "attncc.api",
    "parse": "attncc.api",
    "pattern": "attncc.decorator",
    "grid": "attncc.decorator",
    "tokens": "attncc.decorator",
    "where": "attncc.decorator",
    "min": "attncc.decorator",
    "max": "attncc.decorator",
    "abs": "attncc.decorator",
    "causal": "attncc.decorator",
    "window": "attncc.decorator",
    "chunked": "attncc.decorator",
    "prefix": "attncc.decorator",
    "sinks": "attncc.decorator",
    "dilated": "attncc.decorator",
    "blocked": "attncc.decorator",
    "neighborhood": "attncc.decorator",
    "softcap": "attncc.decorator",
    "alibi": "attncc.decorator",
    "clamp": "attncc.decorator",
    "reference": "attncc.reference",
    "compile": "attncc.runtime.compile",
    "CompileOptions": "attncc.runtime.options",
    "Schedule": "attncc.schedule.schedule",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'attncc' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__


class _Package(types.ModuleType):
    """`attncc.reference` is both a submodule and the function it defines. Importing the
    submodule rebinds the package attribute to the module; keep the exported function."""

    def __setattr__(self, name, value):
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == value.__name__:
            value = getattr(value, name, value)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def _map_source_tree() -> None:
    """In a source checkout (no install), grammar/ and codegen/ sit beside attncc/; make
    them importable as attncc.grammar / attncc.codegen, as an install lays them out."""
    import os
    here = os.path.dirname(os.path.abspath(__file__))
    top = os.path.dirname(here)
    if os.path.isfile(os.path.join(top, "pyproject.toml")) and not os.path.isdir(os.path.join(here, "grammar")):
        if top not in __path__:
            __path__.append(top)


_map_source_tree()


# Device nodes that mean a GPU Triton could compile for is present (NVIDIA, ROCm, WSL).
_GPU_NODES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg")


def _gpu_present() -> bool:
    """Whether this machine appears to have a GPU, decided without importing torch (an
    already-imported torch is asked; otherwise the driver's device nodes are looked for)."""
    import os
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "cuda"):
        try:
            return bool(torch.cuda.is_available())
        except Exception:  # noqa: BLE001 - a broken CUDA setup counts as no device
            return False
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return any(os.path.exists(p) for p in _GPU_NODES)


def _arrange_interpreter() -> None:
    """Generated Triton kernels run on CPU through Triton's interpreter, which Triton reads
    from TRITON_INTERPRET once, when it is first imported. On a machine without a GPU, and
    only if triton is not imported yet and the user has not set the variable either way,
    switch it on here so `backend="interpret"` works in a plain `python3`. Otherwise nothing
    is changed (calls then use a backend that needs no interpreter; see runtime.compile)."""
    import os
    if "TRITON_INTERPRET" in os.environ or "triton" in sys.modules:
        return
    if not _gpu_present():
        os.environ["TRITON_INTERPRET"] = "1"
        global INTERPRETER_ARRANGED
        INTERPRETER_ARRANGED = True


# True when `import attncc` switched Triton's interpreter on (no GPU, triton not yet imported).
INTERPRETER_ARRANGED = False
_arrange_interpreter()
