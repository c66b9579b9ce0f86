"""`attncc.compile`: from a pattern (or a spec path, or spec text) to a callable kernel.

    kern = attncc.compile("specs/natten2d.attn", params={"kernel": 7})
    out = kern(q, k, v)                       # q [B, Hq, L, D], k/v [B, Hkv, L, D(v)]
    out, lse = kern(q, k, v, return_lse=True)

A `Kernel` validates every call (shapes, dtypes, devices, GQA ratio, the pattern's runtime
inputs, grid lengths) before any work, then runs one backend:

    triton     the generated block-sparse Triton kernel, compiled for CUDA
    interpret  the same generated kernel through Triton's interpreter (CPU; needs
               TRITON_INTERPRET=1 in the environment before triton is imported)
               (patterns with runtime data in the schedule, `route`/`blocks`, document ids
               `doc[b, q] == doc[b, k]` or an `output scale`, run these kernels with
               per-(batch, head, query tile) lists from `runtime.prepass_kernel.kernel_forward`;
               `Kernel.last_stats` then reports visited and skipped tiles)
    flex       the pattern lowered to FlexAttention with attncc's analytic BlockMask
    torch      block-sparse attention in plain torch over the schedule's tile lists
               (`runtime.torch_backend`; any device, float16/bfloat16/float32/float64);
               differentiable with its own backward (P recomputed from the lse, O(kept tiles)
               memory), so it trains on CPU
    reference  `attncc.reference` (dense float64), cast to the dtype of q

    dense      SDPA over the dense mask (small shapes; `runtime.backends.dense`)

With no backend chosen, CUDA tensors use "triton"; CPU calls pick per call shape
(`Kernel.choose`, `attncc.runtime.choose`): "dense" for small shapes, "flex" for large sparse
ones, "torch" when gradients are needed; `Kernel.last_choice` says which and why. Nothing
global is changed by a call. (`import attncc` switches Triton's interpreter on when there is
no GPU and triton is not imported yet, so backend="interpret" works in a plain `python3`.)

Caching: schedules are built once per (q_len, kv_len, heads); generated source is keyed by
(IR hash, options, tile structure) and written to the on-disk cache (`attncc.runtime.cache`),
where a user can open it; loaded modules are shared process-wide by that key.
"""
from __future__ import annotations

import math
import os
import sys
from typing import Optional

import torch

from ..frontend.errors import suggest
from ..ir.inputs import InputError, InputTypeError, check_inputs, check_qkv
from ..ir.pattern import Pattern
from . import cache
from .options import BACKENDS, CompileOptions

# Default length of the representative schedule behind `Kernel.source` for 1-D patterns.
DEFAULT_1D_LEN = 1024

INTERPRETER_OFF = (
    "backend 'interpret' runs the generated Triton kernels on CPU through Triton's interpreter, "
    "which is off in this process: set TRITON_INTERPRET=1 in the environment before importing "
    "triton (e.g. `TRITON_INTERPRET=1 python train.py`), or use backend='flex' or "
    "backend='reference' for CPU tensors")

INTERPRETER_LATE = (
    "backend 'interpret' needs Triton's interpreter, but TRITON_INTERPRET=1 was set after "
    "triton had been imported, which is too late for this process: set it in the environment "
    "before the program starts (e.g. `TRITON_INTERPRET=1 python train.py`), or use "
    "backend='flex' or backend='reference' for CPU tensors")

# Process-wide loaded kernel modules: (cache key, interpreted) -> module.
_MODULES: dict[tuple[str, bool], object] = {}
# Kernels behind calls of `@attncc.pattern` functions, one per pattern.
_PATTERN_KERNELS: dict[Pattern, "Kernel"] = {}


class BackendError(RuntimeError):
    """The chosen backend cannot run the given tensors in this process."""


def _interpreter_env() -> bool:
    try:
        from triton import knobs
        return bool(knobs.runtime.interpret)
    except (ImportError, AttributeError):  # older Triton: the environment variable itself
        return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _interpreter_at_import() -> Optional[bool]:
    """Whether Triton's interpreter was on when triton.language was imported (its own
    @jit helpers are then interpreted functions), or None if it is not imported yet."""
    std = sys.modules.get("triton.language.standard")
    helper = getattr(std, "cdiv", None)
    if helper is None:
        return None
    return type(helper).__name__ == "InterpretedFunction"


def interpreter_enabled() -> bool:
    """True when generated kernels loaded now run in Triton's interpreter (CPU): the switch
    TRITON_INTERPRET=1 is on, and was already on when triton was first imported (Triton's
    own @jit helpers are bound to a mode at import; switching later leaves them compiled)."""
    return _interpreter_env() and _interpreter_at_import() is not False


# What `resolve_backend` returns for a CPU call without a backend: the Kernel then picks one
# per call shape (`attncc.runtime.choose`).
AUTO = "auto"


def resolve_backend(requested: Optional[str], device: torch.device) -> str:
    """The backend that runs tensors on `device`: `requested`, or "triton" on CUDA and AUTO
    elsewhere (the Kernel then chooses per call shape: `attncc.runtime.choose`). Raises
    BackendError when a requested backend cannot run here."""
    device = torch.device(device)
    if requested is None and device.type != "cuda":
        return AUTO
    backend = requested or "triton"
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend == "triton" and device.type != "cuda":
        raise BackendError(f"backend 'triton' needs CUDA tensors, but q is on {device}; use "
                           "backend='interpret' (Triton's interpreter), 'flex' or 'reference' "
                           "for CPU tensors")
    if backend == "interpret" and not interpreter_enabled():
        raise BackendError(INTERPRETER_LATE if _interpreter_env() else INTERPRETER_OFF)
    return backend


def structure_key(schedule) -> str:
    """The parts of a schedule that shape the generated source: tile shapes, layout rank,
    runtime selectors, head classes and their closed-form bounds (lengths enter kernels as
    arguments, so schedules of different lengths with this key share one kernel)."""
    bounds = tuple(None if c.bounds is None else str(c.bounds) for c in schedule.classes)
    parts = (schedule.q_grid.tile, schedule.kv_grid.tile, len(schedule.q_grid.shape),
             len(schedule.kv_grid.shape), tuple(schedule.runtime), schedule.head_class, bounds)
    return repr(parts)


def _make_options(options: Optional[CompileOptions], backend: Optional[str],
                  fields: dict) -> CompileOptions:
    if options is not None and not isinstance(options, CompileOptions):
        raise TypeError(f"options must be an attncc.CompileOptions, got {type(options).__name__}")
    options = options or CompileOptions()
    known = set(CompileOptions.__dataclass_fields__)
    for name in fields:
        if name not in known:
            hint = suggest(name, known)
            raise TypeError(f"unknown compile option '{name}'" + (f"; {hint}" if hint else "")
                            + f" (options: {', '.join(sorted(known))})")
    if backend is not None:
        fields = dict(fields, backend=backend)
    return options.replace(**fields) if fields else options


def _load_spec(spec, params: Optional[dict]) -> Pattern:
    inner = getattr(spec, "pattern", None)  # an @attncc.pattern function
    if isinstance(inner, Pattern) and not isinstance(spec, (str, os.PathLike)):
        spec = inner
    if isinstance(spec, Pattern):
        if params:
            raise TypeError("params= applies to spec paths and spec text; a Pattern already "
                            "has its parameters bound")
        return spec
    from .. import api
    params = dict(params or {})
    if isinstance(spec, str) and ("\n" in spec or spec.lstrip().startswith("pattern")):
        return api.parse(spec, **params)
    if isinstance(spec, (str, os.PathLike)):
        if not os.path.isfile(spec):
            raise FileNotFoundError(f"spec file not found: {os.fspath(spec)}")
        return api.load(spec, **params)
    raise TypeError(f"spec must be an attncc Pattern, a path to a .attn file or spec text, "
                    f"got {type(spec).__name__}")


def compile(spec, *, backend: Optional[str] = None, options: Optional[CompileOptions] = None,
            params: Optional[dict] = None, **option_fields) -> "Kernel":
    """Compile an attention pattern into a callable `Kernel`.

    spec      a Pattern, a path to a `.attn` file, or spec text (a string containing a newline
              or starting with `pattern`); `params` overrides the spec's header parameters
    backend   "triton" | "interpret" | "flex" | "torch" | "reference" | None (by the tensors'
              device)
    options   a CompileOptions; keyword arguments (block_m=..., num_warps=...) replace fields

    Compilation is lazy: the schedule and the kernel for a shape are built at the first call
    with that shape (or by `Kernel.schedule` / `Kernel.source`).
    """
    pattern = _load_spec(spec, params)
    return Kernel(pattern, _make_options(options, backend, option_fields))


def kernel_for(pattern: Pattern) -> "Kernel":
    """The kernel behind a call of an `@attncc.pattern` function: compiled once per
    pattern, default options."""
    kern = _PATTERN_KERNELS.get(pattern)
    if kern is None:
        kern = _PATTERN_KERNELS[pattern] = Kernel(pattern, CompileOptions())
    return kern


class _Attention(torch.autograd.Function):
    """Forward by the chosen backend; backward by differentiating `attncc.reference` (dense
    float64) recomputed from the saved q, k, v and runtime inputs. Floating-point runtime
    inputs (head weights, score tables) are arguments too, so they receive gradients where
    the pattern's value depends on them smoothly; integer and bool inputs receive none."""

    @staticmethod
    def forward(ctx, kern, backend, scale, need_lse, names, q, k, v, *values):
        inputs = dict(zip(names, values))
        out, lse = kern._forward(backend, q, k, v, inputs, scale, need_lse)
        ctx.save_for_backward(q, k, v, *values)
        ctx.kern, ctx.scale, ctx.names = kern, scale, names
        if lse is not None:
            ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        from ..reference import reference
        saved = ctx.saved_tensors
        wanted = ctx.needs_input_grad[5:]
        with torch.enable_grad():
            leaves = [t.detach().to(torch.float64).requires_grad_(w) if t.is_floating_point()
                      else t for t, w in zip(saved, wanted)]
            q, k, v, *values = leaves
            out = reference(ctx.kern.pattern, q, k, v, scale=ctx.scale,
                            **dict(zip(ctx.names, values)))
            need = [t for t, w in zip(leaves, wanted) if w]
            grads = iter(torch.autograd.grad(out, need, dout.to(torch.float64), allow_unused=True))
        result = []
        for t, w in zip(saved, wanted):
            g = next(grads) if w else None
            result.append(None if g is None else g.to(t.dtype))
        return (None, None, None, None, None, *result)


def _autograd_function(backend: str):
    """The autograd Function of a differentiable call on `backend`: the generated dQ and
    dK/dV kernels (`runtime.autograd.GeneratedAttention`) on "triton" and "interpret",
    the dense float64 `_Attention` otherwise ("flex" on CPU, "reference"). Backends in
    `SELF_DIFFERENTIABLE`, and "flex" on CUDA (FlexAttention's own backward), need none."""
    if backend in ("triton", "interpret"):
        from .autograd import GeneratedAttention
        return GeneratedAttention
    return _Attention


class Kernel:
    """A compiled attention pattern; call it like SDPA.

    `kern(q, k, v, *, scale=None, return_lse=False, **inputs)` with q [B, Hq, Lq, D],
    k [B, Hkv, Lkv, D], v [B, Hkv, Lkv, Dv] (Hq % Hkv == 0) in float16/bfloat16/float32 on one
    device, plus the pattern's declared runtime inputs by name. Returns out [B, Hq, Lq, Dv] in
    q's dtype, and with `return_lse=True` also the log-sum-exp float32 [B, Hq, Lq] (natural
    log; -inf for a query that sees no key, whose output row is 0). With
    `return_block_scores=β` (`block_scores_pool="max"` or `"mean"`) the call also returns the
    pooled softmax probabilities float32 [B, Hq, ⌈Lq/β⌉, ⌈Lkv/β⌉] last (SeerAttention gate
    targets, no gradient; `runtime.block_scores`; `last_block_scores` says how they were made).

    Autograd: on "triton" and "interpret" the generated backward kernels run
    (`runtime.autograd`: dQ over the forward's key-tile loops, dK/dV over the transposed
    schedule, P recomputed from the saved log-sum-exp; gradients of float inputs read in
    `score` or `output scale` are deterministic); other backends differentiate themselves
    ("torch": `runtime.torch_backend`, P recomputed per slab of kept tiles, O(kept tiles)
    memory — the CPU training path) or the dense float64 `attncc.reference`. Selections (`route`, `blocks` top-k) are piecewise
    constant: no gradient flows through them.

    Attributes: `pattern`, `options`, `backend` (the requested backend; None = by device),
    `source` (generated source for the default shape), `schedule(q_len, kv_len, heads)`.
    """

    def __init__(self, pattern: Pattern, options: CompileOptions):
        if not isinstance(pattern, Pattern):
            raise TypeError(f"expected an attncc Pattern, got {type(pattern).__name__}")
        self.pattern = pattern
        self.options = options
        self._schedules: dict[tuple[int, int, int], object] = {}
        self._sources: dict[str, tuple[str, str]] = {}  # structure -> (cache key, source)
        self._tuned: dict[tuple, CompileOptions] = {}  # shape class -> autotuned options
        # Work counts of the last call that ran a runtime pre-pass (`prepass.PrepassStats`).
        self.last_stats: Optional[dict] = None
        # The backend of the last call, and the cost-rule choice behind it when the backend
        # was picked per call (CPU, no backend given; `attncc.runtime.choose.Choice`).
        self.last_backend: Optional[str] = None
        self.last_choice = None
        self._flex_visited: dict[tuple[int, int, int], Optional[float]] = {}
        self._variants: dict[CompileOptions, "Kernel"] = {}
        # How the last `return_block_scores` call pooled them: "kernel" (the forward kernel's
        # own pass), "tiles" (second pass over the torch tile lists) or "dense" (reference).
        self.last_block_scores: Optional[str] = None

    def choose(self, q_len: int, kv_len: int, heads: int, *, grad: bool = False,
               need_lse: bool = False, float64: bool = False, block_scores: bool = False,
               batch: int = 1):
        """The `Choice` of backend for a CPU call of this shape without an explicit backend
        (`attncc.runtime.choose`): "torch" when block scores are needed; with gradients
        "dense" or "torch" by the training rule over the schedule's visited tile fraction;
        else "dense" or "flex" by the cost rule over FlexAttention's visited block fraction."""
        from .choose import choose_cpu_backend, cost_rule, visited_fraction
        visited, grid = None, self.pattern.layout is not None
        if block_scores:
            return choose_cpu_backend(q_len=q_len, kv_len=kv_len, heads=heads, grid=grid,
                                      grad=grad, block_scores=True)
        from ..ir.nodes import Blocks, Load, Route, walk
        runtime = any(isinstance(n, (Load, Route, Blocks)) for n in walk(self.pattern.mask))
        if grad and not runtime:  # (lists from runtime data: visited stays unknown)
            visited = visited_fraction(self.schedule(q_len, kv_len, heads))
        if not (grad or float64 or need_lse):
            best = cost_rule(q_len=q_len, kv_len=kv_len, heads=heads, visited=0.0, grid=grid)
            if best.backend == "flex" and not runtime:
                # (A mask reading runtime data gets a per-call block mask from the pre-pass:
                # its blocks are decided at run time, so only the size can favour flex.)
                # Only when flex could win at all: the fraction of FlexAttention's blocks
                # visited, from the schedule it uses (built once per shape).
                key = (q_len, kv_len, heads)
                if key not in self._flex_visited:
                    from ..schedule.blockmask import DEFAULT_BLOCK
                    from ..schedule.build import build_schedule
                    opts = CompileOptions(block_m=DEFAULT_BLOCK, block_n=DEFAULT_BLOCK,
                                          tile_1d=True)
                    self._flex_visited[key] = visited_fraction(
                        build_schedule(self.pattern, q_len, kv_len, heads, options=opts))
                visited = self._flex_visited[key]
        return choose_cpu_backend(q_len=q_len, kv_len=kv_len, heads=heads, visited=visited,
                                  grid=grid, grad=grad, need_lse=need_lse, float64=float64,
                                  batch=batch)

    def __repr__(self) -> str:
        return (f"Kernel({self.pattern.name}, backend={self.backend!r}, "
                f"ir_hash={self.pattern.ir_hash()})")

    @property
    def backend(self) -> Optional[str]:
        return self.options.backend

    # ---- schedules and source ------------------------------------------------------------
    def schedule(self, q_len: Optional[int] = None, kv_len: Optional[int] = None,
                 heads: int = 1):
        """The Schedule for `q_len` queries, `kv_len` keys and `heads` query heads (lengths
        default to the layout's size on grid patterns; kv_len defaults to q_len). Built once
        per shape."""
        fixed_q, fixed_kv = self.pattern.fixed_length, self.pattern.fixed_kv_length
        if q_len is None:
            q_len = fixed_q if fixed_q is not None else kv_len
        if q_len is None:
            raise ValueError(f"pattern '{self.pattern.name}' has no layout: pass q_len")
        if kv_len is None:
            kv_len = fixed_kv if fixed_kv is not None else q_len
        key = (int(q_len), int(kv_len), int(heads))
        sched = self._schedules.get(key)
        if sched is None:
            from ..schedule.build import build_schedule
            sched = build_schedule(self.pattern, key[0], key[1], key[2], options=self.options)
            self._schedules[key] = sched
        return sched

    def decode(self, q, k_cache, v_cache, cache_seqlens, block_table=None, *,
               scale: Optional[float] = None, return_lse: bool = False, **inputs):
        """Decode the Lq new queries q [B, Hq, Lq, D] against a KV cache: the last Lq rows of
        the square pattern over the first cache_seqlens[b] cached tokens (new ones included).
        Contiguous k_cache/v_cache [B, Hkv, Lmax, D(v)], or paged [pages, Hkv, page_size, D(v)]
        with block_table int32 [B, max_pages]; cache_seqlens int32 [B]. Returns out
        [B, Hq, Lq, Dv] (and lse float32 [B, Hq, Lq]). See `attncc.runtime.decode`."""
        if self.pattern.normalize == "none":
            raise InputError(f"pattern '{self.pattern.name}' has `normalize none`: decode runs "
                             "softmax attention over a KV cache; use Kernel.step(state, q, k, v) "
                             "(the recurrent form of a separable spec) or call the kernel on the "
                             "whole sequence")
        from .decode import decode
        return decode(self, q, k_cache, v_cache, cache_seqlens, block_table, scale=scale,
                      return_lse=return_lse, **inputs)

    def decode_schedule(self, heads: int = 1):
        """Symbolic key ranges of decode rows (`attncc.schedule.decode.DecodeSchedule`)."""
        from .decode import schedule_for
        return schedule_for(self, heads)

    def default_shape(self) -> tuple[int, int, int]:
        """(q_len, kv_len, heads) behind `source`: the layout's size on grid patterns, else
        DEFAULT_1D_LEN tokens; heads = the pattern's `heads` parameter if it has one, else 1."""
        n = self.pattern.fixed_length or DEFAULT_1D_LEN
        heads = self.pattern.param_dict.get("heads", 1)
        heads = heads if isinstance(heads, int) and not isinstance(heads, bool) and heads > 0 else 1
        return n, self.pattern.fixed_kv_length or n, heads

    def source_for(self, schedule) -> str:
        """Generated Triton source for `schedule` (shared by all shapes with its structure)."""
        return self._entry(schedule)[1]

    @property
    def source(self) -> str:
        """Generated Triton forward source for `default_shape()`. On grid layouts this is the
        kernel every call uses. On 1-D patterns it is the kernel of a representative
        DEFAULT_1D_LEN-token schedule, which other lengths share as long as their tile
        structure (`structure_key`: tiles, head classes, closed-form loop bounds, which keep
        Q_LEN / KV_LEN as variables) is the same; `source_for(kern.schedule(q_len, kv_len, heads))`
        gives the source a particular shape runs. Patterns that need the runtime pre-pass
        (`prepass_kernel.needs_prepass`: route, blocks, document ids, output scale) run a
        variant of this kernel generated per call structure (selections lowered to loads,
        per-(batch, head) tile rows), which is not written to the on-disk cache."""
        return self.source_for(self.schedule(*self.default_shape()))

    @property
    def backward_source(self) -> str:
        """Generated Triton backward source (the dQ and dK/dV kernels of
        `attncc.codegen.backward`) for `default_shape()`, as a differentiable call on
        "triton"/"interpret" runs it (see `runtime.autograd.kernel_backward_source`)."""
        from .autograd import kernel_backward_source
        return kernel_backward_source(self, self.schedule(*self.default_shape()))

    def _entry(self, schedule) -> tuple[str, str]:
        skey = structure_key(schedule)
        hit = self._sources.get(skey)
        if hit is None:
            from ..codegen.forward import generate_forward
            source = generate_forward(self.pattern, schedule, self.options)
            key = cache.cache_key(self.pattern.ir_hash(), self.options.key(), skey)
            hit = self._sources[skey] = (key, source)
        return hit

    def _module(self, schedule):
        from .launch import load_kernel
        key, source = self._entry(schedule)
        mkey = (key, interpreter_enabled())
        module = _MODULES.get(mkey)
        if module is None:
            header = (f"shape q_len={schedule.q_len} kv_len={schedule.kv_len} "
                      f"heads={schedule.heads}\n")
            path = cache.store_kernel(key, source, self.pattern.ir_text(), header + str(schedule))
            module = _MODULES[mkey] = load_kernel(source, None if path is None else str(path))
        return module

    # ---- calls -----------------------------------------------------------------------------
    def __call__(self, q, k, v, *, scale: Optional[float] = None, return_lse: bool = False,
                 return_block_scores: Optional[int] = None, block_scores_pool: str = "max",
                 **inputs):
        B, Hq, Hkv, Lq, Lkv, D, Dv = check_qkv(q, k, v)
        self._check_lengths(Lq, Lkv)
        if return_block_scores is not None:
            from .block_scores import check_args
            check_args(return_block_scores, block_scores_pool)
        inputs = check_inputs(self.pattern, inputs, batch=B, heads=Hq, q_len=Lq, kv_len=Lkv,
                              device=q.device)
        scale = self._scale(scale, D)
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, *inputs.values()))
        backend = resolve_backend(self.options.backend, q.device)
        if backend == AUTO:
            self.last_choice = self.choose(Lq, Lkv, Hq, grad=grad, need_lse=return_lse,
                                           float64=q.dtype == torch.float64, batch=B,
                                           block_scores=return_block_scores is not None)
            backend = self.last_choice.backend
        self.last_backend = backend
        if q.dtype == torch.float64 and backend in ("triton", "interpret", "flex"):
            raise InputTypeError(f"q has dtype float64; backend '{backend}' supports float16, "
                                 "bfloat16 and float32 (backend='reference' takes float64)")
        if return_block_scores is not None:
            # SeerAttention gate targets: pooled softmax probabilities (runtime/block_scores.py)
            from .block_scores import call_with_block_scores
            out, lse, scores = call_with_block_scores(self, backend, q, k, v, inputs, scale, grad,
                                                      return_block_scores, block_scores_pool)
            return (out, lse, scores) if return_lse else (out, scores)
        out, lse = self._call(backend, q, k, v, inputs, scale, grad, return_lse)
        return (out, lse) if return_lse else out

    def _call(self, backend: str, q, k, v, inputs: dict, scale: float, grad: bool,
              return_lse: bool):
        """(out, lse or None) of a validated call on `backend`, differentiable when `grad`."""
        B, Hq, Lq = q.shape[:3]
        Lkv, Dv = k.shape[2], v.shape[3]
        if Lq == 0 or Lkv == 0:
            out = q.new_zeros(B, Hq, Lq, Dv)
            lse = torch.full((B, Hq, Lq), float("-inf"), dtype=torch.float32, device=q.device)
            return out, lse
        if self.pattern.normalize == "none":
            # Linear attention (no softmax): `runtime.linear` picks the chunked linear-time
            # algorithm or the quadratic block-sparse path; both are differentiable.
            from .linear import run_none
            return run_none(self, backend, q, k, v, inputs, scale, return_lse, grad)
        # FlexAttention differentiates itself on CUDA (it has no CPU backward).
        own_grad = backend in SELF_DIFFERENTIABLE or (backend == "flex" and q.is_cuda)
        if grad and not own_grad:
            names = tuple(inputs)
            return _autograd_function(backend).apply(self, backend, scale, return_lse, names,
                                                     q, k, v, *inputs.values())
        return self._forward(backend, q, k, v, inputs, scale, return_lse)

    def variant(self, options: CompileOptions) -> "Kernel":
        """This pattern compiled with other `options` (e.g. tiles that divide a block-score
        block), made once per options and kept."""
        if options == self.options:
            return self
        hit = self._variants.get(options)
        if hit is None:
            hit = self._variants[options] = Kernel(self.pattern, options)
        return hit

    def step(self, state, q, k, v, *, scale: Optional[float] = None):
        """Recurrent (decode) form of a separable `normalize none` pattern: q [B, Hq, n, D],
        k [B, Hkv, n, D], v [B, Hkv, n, Dv] are the next n tokens, `state` None or the float32
        [B, Hq, D, Dv] returned by the previous call. Returns (out [B, Hq, n, Dv], new state).
        See `attncc.runtime.linear.step`."""
        from .linear import step
        return step(self, state, q, k, v, scale=scale)

    def _check_lengths(self, Lq: int, Lkv: int) -> None:
        layout = self.pattern.layout
        if layout is not None and not hasattr(layout, "q"):  # one grid (segmented: checks)
            for name, n in (("q", Lq), ("k", Lkv)):
                if n != layout.numel:
                    raise InputError(
                        f"pattern '{self.pattern.name}' has layout {layout} ({layout.numel} "
                        f"tokens), but {name} has sequence length {n}")
        if getattr(self.pattern, "checks", ()):
            self.pattern.check_lengths(Lq, Lkv)

    def _scale(self, scale, D: int) -> float:
        scale = self.options.scale if scale is None else scale
        if scale is None:
            return 1.0 / math.sqrt(D)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0 \
                or not math.isfinite(scale):
            raise InputError(f"scale must be a positive finite number, got {scale!r}")
        return float(scale)

    def _forward(self, backend: str, q, k, v, inputs: dict, scale: float, need_lse: bool = True):
        """(out in q.dtype [B, Hq, Lq, Dv], lse float32 [B, Hq, Lq] or None when not
        `need_lse` and the backend skips it) by `backend`; arguments already validated."""
        out, lse = RUNNERS[backend](self, q, k, v, inputs, scale, need_lse)
        return out.to(q.dtype), (None if lse is None else lse.to(torch.float32))


# Backend runners live in runtime/runners.py; re-exported here for callers and tests.
from .runners import (AUTOTUNE_CONFIGS, RUNNERS, SELF_DIFFERENTIABLE,  # noqa: E402,F401
                      _run_triton, pick_fastest)
