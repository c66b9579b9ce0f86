"""`attncc` command line: a thin layer over the library.

    attncc inspect SPEC --stage ast|ir|opt|schedule|triton|triton-bwd [-p name=value ...]
    attncc compile SPEC [-p name=value ...] [-o DIR]
    attncc verify  SPEC [-p name=value ...] [--backend B] [--dtype float32] ...
    attncc show    SPEC [-p name=value ...] [-o tiles.png]
    attncc bench   SPEC [-p name=value ...] ...

Exit status: 0 success, 2 spec error (message on stderr), 1 any other error (user mistakes
such as --backend triton without CUDA are one line on stderr; "internal error" is reserved
for bugs), 141 when the reader of stdout went away (`attncc show ... | head`).
"""
from __future__ import annotations

import argparse
import os
import sys

from .pipeline import STAGE_NAMES, Shape


def _value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    raise argparse.ArgumentTypeError(f"parameter value {text!r} is not a number or true/false")


def _param(text: str) -> tuple[str, object]:
    name, eq, value = text.partition("=")
    name = name.strip()
    if not eq or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"expected name=value, got {text!r}")
    return name, _value(value.strip())


BACKEND_CHOICES = ("triton", "interpret", "flex", "torch", "dense", "reference")

# `verify`'s default length for patterns without a layout: long enough for windows of a few
# hundred tokens, and not a multiple of any tile size, so sequence tails are checked too.
VERIFY_1D_LEN = 1000


def _common(sub: argparse.ArgumentParser, shape: bool = True, default_len: int = 1024) -> None:
    sub.add_argument("spec", help="path to a .attn spec file")
    sub.add_argument("-p", "--param", action="append", type=_param, default=[], metavar="NAME=VALUE",
                     help="bind a pattern parameter (repeatable)")
    if shape:
        sub.add_argument("--q-len", type=int,
                         help=f"query length (default: the layout size, or {default_len})")
        sub.add_argument("--kv-len", type=int, help="key length (default: the query length)")
        sub.add_argument("--heads", type=int, default=None, help="query heads")
        sub.add_argument("--block-m", type=int, default=64, help="query tile (1-D tiles)")
        sub.add_argument("--block-n", type=int, default=64, help="key tile (1-D tiles)")
        sub.add_argument("--tile-1d", action="store_true", help="use 1-D tiles on grid layouts")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="attncc", description="declarative attention compiler")
    ap.add_argument("--version", action="version", version=f"attncc {_version()}")
    subs = ap.add_subparsers(dest="command", required=True)

    s = subs.add_parser("inspect", help="print the spec after a pipeline stage")
    _common(s)
    s.add_argument("--stage", choices=STAGE_NAMES, default="ir")

    s = subs.add_parser("compile", help="generate the kernel and write source and dumps")
    _common(s)
    s.add_argument("-o", "--out", default=None, help="output directory (default: print the source)")

    s = subs.add_parser("verify", help="run the kernel against the float64 reference")
    _common(s, default_len=VERIFY_1D_LEN)
    s.add_argument("--backend", choices=BACKEND_CHOICES)
    s.add_argument("--dtype", choices=("float32", "float16", "bfloat16", "float64"),
                   default="float32", help="q/k/v dtype (float64: backend reference only)")
    s.add_argument("--batch", type=int, default=2)
    s.add_argument("--head-dim", type=int, default=32)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--grad", action=argparse.BooleanOptionalAction, default=None,
                   help="check gradients too (default: on for patterns with float inputs)")

    s = subs.add_parser("show", help="draw the tile map (text, or PNG with -o)")
    _common(s)
    s.add_argument("-o", "--out", default=None, help="write a PNG of mask and tiles here")
    s.add_argument("--head", type=int, default=0)

    s = subs.add_parser("bench", help="time the kernel against SDPA and FlexAttention")
    _common(s)
    s.add_argument("--backend", choices=BACKEND_CHOICES)
    s.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None)
    s.add_argument("--batch", type=int, default=1)
    s.add_argument("--head-dim", type=int, default=64)
    s.add_argument("--backward", action="store_true",
                   help="time a training step: forward, then backward into q, k and v")
    s.add_argument("--decode", action="store_true",
                   help="time one decode step against a KV cache of --kv-len tokens (default "
                        "4096) with --q-len new tokens per sequence (default 1)")
    s.add_argument("--kv-heads", type=int, default=None, help="key/value heads for --decode")
    s.add_argument("--page-size", type=int, default=None, help="paged cache for --decode")
    s.add_argument("--no-flex", action="store_true",
                   help="--decode without the FlexAttention baseline (compiling it takes "
                        "tens of seconds on CPU)")
    return ap


def _version() -> str:
    from . import __version__
    return __version__


def _shape(args) -> Shape:
    return Shape(q_len=args.q_len, kv_len=args.kv_len, heads=args.heads or 1)


def _options(args, **extra):
    from .runtime.options import CompileOptions
    return CompileOptions(block_m=args.block_m, block_n=args.block_n, tile_1d=args.tile_1d, **extra)


class UsageError(Exception):
    """A user mistake the CLI reports in one line (exit 1), without a traceback."""


NO_CUDA = ("--backend triton needs a CUDA device, and none is available here; use --backend "
           "interpret (the same kernels through Triton's interpreter), flex or reference")
NO_MATPLOTLIB = ("show -o writes a PNG with matplotlib, which is not installed: "
                 "pip install 'attncc[plot]' (or omit -o for the text map)")


def _check_backend(args) -> None:
    if getattr(args, "backend", None) == "triton":
        import torch
        if not torch.cuda.is_available():
            raise UsageError(NO_CUDA)


def _use_interpreter_without_cuda() -> None:
    """Generated kernels run through Triton's interpreter when there is no GPU; the switch must
    be set before triton is first imported, which is why the CLI (a process entry point) does it."""
    if "TRITON_INTERPRET" in os.environ:
        return
    import torch
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


def _cmd_inspect(args) -> int:
    from .pipeline import dump
    sys.stdout.write(dump(args.stage, args.spec, dict(args.param), _shape(args), _options(args)))
    return 0


def _cmd_compile(args) -> int:
    from .pipeline import dump, load_pattern
    _use_interpreter_without_cuda()
    params, shape, options = dict(args.param), _shape(args), _options(args)
    pattern = load_pattern(args.spec, params)
    source = dump("triton", pattern, params, shape, options)
    if args.out is None:
        sys.stdout.write(source)
        return 0
    os.makedirs(args.out, exist_ok=True)
    files = {f"{pattern.name}.ast.txt": dump("ast", args.spec, params, shape, options),
             f"{pattern.name}.ir.txt": pattern.ir_text(),
             f"{pattern.name}.opt.txt": dump("opt", pattern, params, shape, options),
             f"{pattern.name}.schedule.txt": dump("schedule", pattern, params, shape, options),
             f"{pattern.name}_fwd.py": source}
    if pattern.normalize == "softmax":  # the generated backward (dQ, dK/dV kernels)
        files[f"{pattern.name}_bwd.py"] = dump("triton-bwd", pattern, params, shape, options)
    for name, text in files.items():
        path = os.path.join(args.out, name)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
        print(f"wrote {path}")
    return 0


def _cmd_verify(args) -> int:
    _use_interpreter_without_cuda()
    _check_backend(args)
    import torch
    from .pipeline import load_pattern, resolve_shape
    from .runtime.verify import verify
    pattern = load_pattern(args.spec, dict(args.param))
    q_len, kv_len, heads = resolve_shape(pattern, _shape(args))
    report = verify(pattern, backend=args.backend, batch=args.batch, heads=args.heads or 2,
                    q_len=q_len if (args.q_len or pattern.fixed_length) else VERIFY_1D_LEN,
                    kv_len=kv_len if (args.kv_len or pattern.fixed_length) else None,
                    head_dim=args.head_dim, dtype=getattr(torch, args.dtype), seed=args.seed,
                    options=_options(args), grad=args.grad)
    print(report)
    for w in report.warnings:
        print(f"attncc: warning: {w}", file=sys.stderr)
    return 0 if report.ok else 1


def _cmd_show(args) -> int:
    from .pipeline import load_pattern, resolve_shape
    from .schedule.build import build_schedule
    if args.out:
        try:
            import matplotlib  # noqa: F401 - checked before any work
        except ImportError:
            raise UsageError(NO_MATPLOTLIB) from None
    pattern = load_pattern(args.spec, dict(args.param))
    q_len, kv_len, heads = resolve_shape(pattern, _shape(args))
    if pattern.normalize == "none":
        from .passes.linear import algorithm_text, decide
        dec, values = decide(pattern, heads, q_len, kv_len)
        if dec.linear:  # what runs is the chunked linear algorithm, not a tile schedule
            from .schedule.draw_linear import draw_linear_png, linear_text
            print(linear_text(pattern, q_len, kv_len, heads, args.block_m, dec, values), end="")
            if args.out:
                draw_linear_png(pattern, args.out, q_len, kv_len, heads, args.block_m, dec,
                                head=args.head)
                print(f"wrote {args.out}")
            return 0
        print(algorithm_text(pattern, heads, q_len, kv_len, _options(args))[0], end="")
    sched = build_schedule(pattern, q_len, kv_len, heads, options=_options(args))
    print(sched)
    if args.out:
        from .schedule.draw import draw_png
        draw_png(sched, args.out, head=args.head)
        print(f"wrote {args.out}")
    return 0


def _cmd_bench(args) -> int:
    _use_interpreter_without_cuda()
    _check_backend(args)
    from .pipeline import load_pattern
    from .runtime.bench import bench_cli
    pattern = load_pattern(args.spec, dict(args.param))
    if args.decode:
        from .runtime.bench_decode import bench_decode_cli
        print(bench_decode_cli(pattern, args))
        return 0
    print(bench_cli(pattern, args))
    return 0


# Exit status when stdout is closed by its reader (128 + SIGPIPE, like `cat` or `git log`).
BROKEN_PIPE = 141

COMMANDS = {"inspect": _cmd_inspect, "compile": _cmd_compile, "verify": _cmd_verify,
            "show": _cmd_show, "bench": _cmd_bench}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .frontend.errors import SpecError
    try:
        return COMMANDS[args.command](args)
    except SpecError as err:
        print(err, file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, TypeError, UsageError) as err:
        # Bad arguments and bad input files: one line, no traceback.
        print(f"attncc: error: {err}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (`attncc show ... | head`): stop quietly, as `cat` would, with
        # the status of a process ended by SIGPIPE. Later flushes go to /dev/null.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return BROKEN_PIPE
    except KeyboardInterrupt:  # pragma: no cover
        return 130
    except Exception as err:  # noqa: BLE001 - the CLI's last resort: report, exit 1
        if os.environ.get("ATTNCC_DEBUG"):
            raise
        print(f"attncc: internal error: {type(err).__name__}: {err} "
              "(set ATTNCC_DEBUG=1 for a traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
