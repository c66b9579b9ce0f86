"""Ahead-of-time compilation of generated Triton kernels for GPU targets, without a GPU.

Triton compiles for a CUDA target on a CPU-only machine: `triton.compile(ASTSource(...),
target=GPUTarget("cuda", cc, 32))` runs the whole pipeline (ttir → ttgir → PTX) and the
`ptxas` shipped in the Triton wheel produces the cubin. This module compiles a kernel with
exactly the specialization a real launch would get and reports what matters for speed:

    launches = capture_launches(fn, *args, **kwargs)   # run a launch path, record launches
    report = compile_launch(launches[0], arch=90)       # AOTReport: regs, spills, smem, SASS

`capture_launches` runs any Python callable that launches `@triton.jit` kernels (e.g. the
runtime's own `run_forward` on CPU tensors) with `JITFunction.run` replaced by a recorder, so
argument dtypes, constexprs, 16-byte alignment / divisibility hints, num_warps and num_stages
are those the runtime passes; `specialize` derives the signature with Triton's own binder
(`create_function_from_signature` + `JITFunction._pack_args`, as `JITFunction.run` does).

The Triton interpreter (TRITON_INTERPRET=1, on in the CPU test suite) replaces every
`@triton.jit` function, Triton's own helpers included, at import; such a process cannot
compile. `run_jobs` therefore runs jobs in worker processes with the interpreter off and a
fresh Triton cache (cold compile times): a job names an entry point `"module:function"` and
its keyword arguments; the worker captures the launches the entry makes and compiles each.
`forward_case` is the entry for attncc forward kernels; backward / decode launch paths can
add their own entries.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from .sass import LoopInfo, sass_loops

__all__ = ["Launch", "LoopInfo", "AOTReport", "AOTError", "SHARED_LIMIT", "tool_path",
           "ptxas_missing", "capture_launches", "specialize", "compile_launch", "sass_loops",
           "forward_case", "run_jobs"]

# Opt-in shared memory per block (bytes): sm_90 227 KB, sm_80 163 KB.
SHARED_LIMIT = {90: 232448, 80: 166912}

_CAPTURE_LOCK = threading.Lock()


class AOTError(RuntimeError):
    """The kernel cannot be compiled ahead of time in this process / environment."""


@dataclass
class Launch:
    """One recorded kernel launch: the @triton.jit function, grid, positional arguments and
    keyword arguments (constexprs by name, num_warps, num_stages), as the caller passed them."""
    fn: Any
    grid: Any
    args: tuple
    kwargs: dict

    @property
    def name(self) -> str:
        return self.fn.__name__


@dataclass
class AOTReport:
    """Result of compiling one launch for one target (`compile_s` wall seconds, `cpu_s` CPU
    seconds of the compile including ptxas: stable on a loaded machine)."""
    name: str
    arch: int
    ok: bool
    error: str = ""
    num_warps: int = 0
    num_stages: int = 0
    registers: int = -1
    spill_stores: int = -1
    spill_loads: int = -1
    shared: int = -1
    shared_limit: int = 0
    wgmma: bool = False
    mma_sync: bool = False
    n_dots: int = 0
    sass_instructions: int = 0
    loops: list = field(default_factory=list)
    compile_s: float = 0.0
    cpu_s: float = 0.0
    ptxas_log: str = ""

    @property
    def spill_bytes(self) -> int:
        return max(self.spill_stores, 0) + max(self.spill_loads, 0)

    @property
    def shared_ok(self) -> bool:
        return 0 <= self.shared <= self.shared_limit

    def iteration(self, kind: str) -> Optional[int]:
        """SASS instructions of one `kind` ("full"/"partial") key-tile iteration: the largest
        such loop kept as a SASS loop, else the largest unrolled one; None if the kernel has
        no loop of that kind."""
        loops = [lp for lp in self.loops if lp.kind == kind]
        kept = [lp.instructions for lp in loops if lp.sass_loop]
        if kept:
            return max(kept)
        return max((lp.instructions for lp in loops), default=None)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["spill_bytes"] = self.spill_bytes
        d["full_iter"] = self.iteration("full")
        d["partial_iter"] = self.iteration("partial")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "AOTReport":
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["loops"] = [LoopInfo(**lp) for lp in kw.get("loops", [])]
        return cls(**kw)


# ---- tools --------------------------------------------------------------------------------

def tool_path(name: str) -> Optional[str]:
    """Path of a CUDA tool (`ptxas`, `nvdisasm`, `cuobjdump`) shipped in the Triton wheel
    (triton/backends/nvidia/bin), else on PATH, else None."""
    try:
        import triton
        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    except ImportError:
        pass
    return shutil.which(name)


def ptxas_missing() -> Optional[str]:
    """A reason string when AOT compilation cannot run here (no Triton NVIDIA backend or no
    ptxas), else None."""
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except ImportError as e:
        return f"triton's NVIDIA backend is not importable: {e}"
    if tool_path("ptxas") is None:
        return "the Triton wheel has no ptxas (triton/backends/nvidia/bin) and none is on PATH"
    return None


# ---- capture ------------------------------------------------------------------------------

def capture_launches(call: Callable, *args, **kwargs) -> list:
    """Run `call(*args, **kwargs)` with every `@triton.jit` launch recorded instead of run;
    returns the list of `Launch`es in order. The call must not need the kernels' outputs
    (launch paths that only allocate, launch and return are fine on CPU tensors).

    Raises AOTError when Triton's interpreter is on in this process (kernels are then
    interpreted functions that cannot be compiled): use `run_jobs` instead."""
    from triton.runtime.jit import JITFunction
    launches: list = []

    def record(self, *a, grid, warmup, **kw):
        launches.append(Launch(self, grid, a, dict(kw)))
        return None

    with _CAPTURE_LOCK:
        original = JITFunction.run
        JITFunction.run = record
        try:
            call(*args, **kwargs)
        finally:
            JITFunction.run = original
    if not launches:
        from . import compile as _c
        if _c.interpreter_enabled():
            raise AOTError("Triton's interpreter is on in this process (TRITON_INTERPRET=1): "
                           "kernels cannot be compiled here; use aot.run_jobs (worker processes)")
    return launches


def specialize(launch: Launch, arch: int):
    """(signature, constexprs, attrs, options dict) of `launch` for target sm_`arch`, computed
    by Triton's own launch binder: int arguments equal to 1 become constexprs, ints divisible by
    16 and 16-byte aligned pointers get `tt.divisibility` 16 (except `do_not_specialize`
    arguments), as `JITFunction.run` specializes a real launch."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    fn = launch.fn
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(launch.kwargs)
    bound, spec, opts = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
    return signature, constexprs, attrs, dict(options.__dict__)


# ---- compile ------------------------------------------------------------------------------

_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (ptxas), user + system."""
    try:
        import resource
    except ImportError:  # not POSIX: this process only
        return time.process_time()
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _ptxas_log(ptx: str, arch: int, fp_fusion: bool) -> str:
    """ptxas -v on `ptx` with the flags Triton uses (for compiles served from Triton's cache,
    where Triton prints no log)."""
    ptxas = tool_path("ptxas")
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}", src,
               "-o", os.path.join(tmp, "k.o")] + ([] if fp_fusion else ["--fmad=false"])
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    return res.stderr + res.stdout


def compile_launch(launch: Launch, arch: int = 90, *, num_warps: Optional[int] = None,
                   num_stages: Optional[int] = None, sass: bool = True,
                   launch_options: Optional[dict] = None) -> AOTReport:
    """Compile `launch` (from `capture_launches`) for sm_`arch` (80, 90, ...) and report
    registers, spill bytes (ptxas -v), shared memory (Triton's allocation) against
    `SHARED_LIMIT`, whether the products lowered to wgmma (PTX `wgmma.mma_async`) or
    `mma.sync`, and with `sass` the SASS instruction count and the per-iteration counts of
    the kernel's loops (`sass_loops`). `num_warps` / `num_stages` override the launch's;
    `launch_options` adds other Triton compile options (e.g. {"maxnreg": 64}).
    A compile error gives `ok=False` with the message; a missing ptxas raises AOTError."""
    reason = ptxas_missing()
    if reason:
        raise AOTError(reason)
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    if num_warps is not None or num_stages is not None or launch_options:
        kw = dict(launch.kwargs, **(launch_options or {}))
        kw.update({k: v for k, v in (("num_warps", num_warps), ("num_stages", num_stages))
                   if v is not None})
        launch = Launch(launch.fn, launch.grid, launch.args, kw)
    signature, constexprs, attrs, options = specialize(launch, arch)
    report = AOTReport(name=launch.name, arch=arch, ok=False, num_warps=options["num_warps"],
                       num_stages=options["num_stages"], shared_limit=SHARED_LIMIT.get(arch, 0))
    buf = io.StringIO()
    t0, c0 = time.perf_counter(), _cpu_seconds()
    old = knobs.nvidia.dump_ptxas_log
    knobs.nvidia.dump_ptxas_log = True
    try:
        with contextlib.redirect_stdout(buf):
            kernel = triton.compile(ASTSource(launch.fn, signature, constexprs, attrs),
                                    target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as e:  # noqa: BLE001 - a failed compile is a result, not a crash
        report.error = f"{type(e).__name__}: {e}"[:4000]
        report.compile_s, report.cpu_s = time.perf_counter() - t0, _cpu_seconds() - c0
        return report
    finally:
        knobs.nvidia.dump_ptxas_log = old
    report.compile_s, report.cpu_s = time.perf_counter() - t0, _cpu_seconds() - c0
    asm = kernel.asm
    log = buf.getvalue()
    if not _SPILL.search(log):
        log = _ptxas_log(asm["ptx"], arch, options.get("enable_fp_fusion", True))
    report.ptxas_log = log.strip()[-2000:]
    m, r = _SPILL.search(log), _REGS.search(log)
    if m:
        report.spill_stores, report.spill_loads = int(m.group(1)), int(m.group(2))
    if r:
        report.registers = int(r.group(1))
    report.shared = int(getattr(kernel.metadata, "shared", -1))
    ptx = asm.get("ptx", "")
    report.wgmma = "wgmma.mma_async" in ptx
    report.mma_sync = re.search(r"\bmma\.sync", ptx) is not None
    report.n_dots = len(re.findall(r"\btt\.dot\b|warp_group_dot\b", asm.get("ttgir", "")))
    report.ok = True
    if sass and "cubin" in asm:
        path = launch.fn.fn.__code__.co_filename
        try:
            report.sass_instructions, report.loops = sass_loops(
                asm["cubin"], path, _kernel_text(launch.fn), launch.name, tool_path("nvdisasm"))
        except (OSError, subprocess.SubprocessError, SyntaxError) as e:
            report.error = f"SASS analysis failed: {e}"
    return report


def _kernel_text(fn) -> str:
    """The kernel's source as Triton read it (not the file now: a file can be rewritten by
    another process), placed at its line numbers in the file."""
    raw = getattr(fn, "raw_src", None)
    start = getattr(fn, "starting_line_number", None)
    if raw is None or start is None:
        with open(fn.fn.__code__.co_filename, encoding="utf-8") as f:
            return f.read()
    import textwrap
    return "\n" * (start - 1) + textwrap.dedent("".join(raw))


# ---- attncc forward entry -----------------------------------------------------------------

def forward_case(spec: str, *, params: Optional[dict] = None, head_dim: int = 64,
                 dtype: str = "bfloat16", batch: int = 2, q_len: Optional[int] = None,
                 heads: Optional[int] = None, variant: str = "runtime", options: Optional[dict] = None,
                 seed: int = 0) -> None:
    """Run attncc's CUDA forward launch path on CPU tensors (launches are captured by the
    caller): q/k/v [batch, heads, q_len, head_dim] of `dtype` (contiguous), the pattern's
    runtime inputs from `verify.random_inputs`, lengths / heads by `Kernel.default_shape()`
    unless given. `variant`: "runtime" (what the runtime launches: closed-form bounds, static
    CSR lists, or the pre-pass list kernel of data-dependent patterns) or "lists" (the static
    schedule with closed-form bounds dropped: CSR lists read at run time)."""
    import torch

    from .. import api
    from .compile import CompileOptions, Kernel, _run_triton
    from .verify import random_inputs
    pattern = api.load(spec, **(params or {})) if os.path.exists(str(spec)) \
        else api.parse(spec, **(params or {}))
    kern = Kernel(pattern, CompileOptions(**(options or {})))
    n, nk, h = kern.default_shape()
    kv_len = nk if q_len is None or pattern.fixed_kv_length is not None else q_len
    q_len, heads = q_len or n, heads or h
    dt = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, q_len, head_dim, generator=gen).to(dt)
    k = torch.randn(batch, heads, kv_len, head_dim, generator=gen).to(dt)
    v = torch.randn(batch, heads, kv_len, head_dim, generator=gen).to(dt)
    inputs = random_inputs(pattern, batch=batch, heads=heads, q_len=q_len, kv_len=kv_len,
                           generator=gen)
    scale = head_dim ** -0.5
    if variant == "runtime":
        if getattr(pattern, "normalize", "softmax") == "none":
            from .linear import run_none  # linear attention: its own kernels
            run_none(kern, "triton", q, k, v, inputs, scale, True)
        else:
            _run_triton(kern, q, k, v, inputs, scale, True)
        return
    if variant != "lists":
        raise ValueError(f"variant must be 'runtime' or 'lists', got {variant!r}")
    from ..codegen.forward import generate_forward
    from .launch import load_kernel, run_forward
    sched = kern.schedule(q_len, kv_len, heads)
    sched = dataclasses.replace(sched, classes=tuple(dataclasses.replace(c, bounds=None)
                                                     for c in sched.classes))
    module = load_kernel(generate_forward(pattern, sched, kern.options))
    run_forward(module, sched, q, k, v, inputs=inputs, scale=scale, options=kern.options)


# ---- worker processes ---------------------------------------------------------------------

def _resolve(entry: str) -> Callable:
    mod, _, name = entry.partition(":")
    return getattr(importlib.import_module(mod), name)


def _run_job(job: dict) -> list:
    """Reports (dicts) of every launch a job makes, compiled for job["arch"]."""
    entry = job.get("entry", "attncc.runtime.aot:forward_case")
    for d in reversed(job.get("sys_path", [])):
        if d not in sys.path:
            sys.path.insert(0, d)
    try:
        launches = capture_launches(_resolve(entry), **job.get("kwargs", {}))
    except Exception as e:  # noqa: BLE001 - reported per job
        return [AOTReport(name=entry, arch=job["arch"], ok=False,
                          error=f"launch path failed: {type(e).__name__}: {e}"[:4000]).as_dict()]
    out = []
    for la in launches:
        try:
            rep = compile_launch(la, job["arch"], num_warps=job.get("num_warps"),
                                 num_stages=job.get("num_stages"), sass=job.get("sass", True),
                                 launch_options=job.get("launch_options"))
        except Exception as e:  # noqa: BLE001 - reported per launch
            import traceback
            rep = AOTReport(name=la.name, arch=job["arch"], ok=False,
                            error=f"{type(e).__name__}: {e}\n{traceback.format_exc()}"[-4000:])
        out.append(rep.as_dict())
    return out


def run_jobs(jobs: list, *, workers: int = 1, timeout: float = 1200,
             on_result: Optional[Callable] = None) -> list:
    """Compile `jobs` in `workers` fresh Python processes (interpreter off, empty Triton cache)
    and return, per job, the list of report dicts (`AOTReport.as_dict()`; rebuild with
    `AOTReport.from_dict`). A job is a JSON-able dict: "arch" (80, 90), "entry"
    ("module:function", default `forward_case`), "kwargs" for the entry, optional "num_warps",
    "num_stages", "launch_options" (other Triton options, e.g. maxnreg), "sass", "sys_path"
    (folders to import the entry's module from). Workers take the next job when they finish
    one. `timeout` bounds each job; `on_result(index, reports)` is called as each job
    finishes (e.g. to save partial results). Raises AOTError if a worker dies."""
    jobs = list(jobs)
    if not jobs:
        return []
    workers = max(1, min(workers, len(jobs)))
    cache = tempfile.mkdtemp(prefix="attncc-aot-")
    # Own kernel-source and Triton caches: no interference with other processes' files.
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1",
               ATTNCC_CACHE_DIR=os.path.join(cache, "src"))
    results: list = [None] * len(jobs)
    pending = list(range(len(jobs)))
    lock = threading.Lock()
    errors: list = []
    procs: list = []

    def serve(w):  # one thread per worker process: send a job, read its answer, repeat
        wenv = dict(env, TRITON_CACHE_DIR=os.path.join(cache, str(w)))
        with tempfile.TemporaryFile(mode="w+") as err:
            p = subprocess.Popen([sys.executable, "-m", "attncc.runtime.aot"], env=wenv,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                 text=True, bufsize=1)
            with lock:
                procs.append(p)
            timer = None
            try:
                while not errors:
                    with lock:
                        if not pending:
                            break
                        i = pending.pop(0)
                    timer = threading.Timer(timeout, p.kill)
                    timer.start()
                    p.stdin.write(json.dumps(jobs[i]) + "\n")
                    p.stdin.flush()
                    line = p.stdout.readline()
                    timer.cancel()
                    if not line:
                        p.wait()
                        err.seek(0)
                        errors.append(f"AOT worker failed (exit {p.returncode}) on job {i}:\n"
                                      f"{err.read()[-3000:]}")
                        return
                    results[i] = json.loads(line)
                    if on_result is not None:
                        with lock:
                            on_result(i, results[i])
            except (OSError, ValueError) as e:
                errors.append(f"AOT worker failed: {e}")
            finally:
                if timer is not None:
                    timer.cancel()
                if p.poll() is None:
                    p.stdin.close()
                    try:
                        p.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        p.kill()

    try:
        threads = [threading.Thread(target=serve, args=(w,)) for w in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        shutil.rmtree(cache, ignore_errors=True)
    if errors:
        raise AOTError(errors[0])
    return results


def main() -> int:
    """Worker: read one JSON job per line on stdin, answer one JSON line of reports each."""
    real_stdout = sys.stdout
    sys.stdout = sys.stderr  # keep stray prints out of the answers
    for line in sys.stdin:
        if line.strip():
            real_stdout.write(json.dumps(_run_job(json.loads(line))) + "\n")
            real_stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
