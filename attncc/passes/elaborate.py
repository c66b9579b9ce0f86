"""Elaboration: AST (`attncc.frontend.ast.Spec`) → `Pattern` (mask IR plus declarations).

Pre:  a syntactically valid spec AST with source locations, the prelude's `def`s, parameter
      overrides (name → int/float/bool).
Post: a `Pattern` whose `mask` is bool IR, `score`/`output_scale` float IR (or None); every
      name resolved, every `def` expanded by substitution, library primitives lowered to IR,
      layout coordinates turned into `Coord` leaves. All semantic errors of the spec are
      collected and raised together as one `SpecError`.

Typing (DESIGN §3): int, float, bool. Float arithmetic and int→float promotion only in the
score and output clauses (and in constant expressions); `/` only on floats; `&`/`|`/`!` only
on booleans; ordering comparisons not on booleans. Operation building is shared with the
decorator frontend (`attncc.passes.primitives`), so both produce identical IR nodes.

Neighborhood constraints K·d ≤ L that involve a sequence length known only at call time are
recorded on the pattern (`Pattern.checks`) and verified by `check_lengths`.
"""
from __future__ import annotations

from typing import Optional

from ..frontend import ast
from ..frontend.errors import Diagnostic, Diagnostics, suggest
from ..ir.nodes import (BOOL, FLOAT, INT, INDEX_VARS, LENGTH_VARS, SCORE_VAR, TRUE, Const, Coord,
                        Expr, Load, Var)
from ..ir.pattern import Axis, InputDecl, Layout, Pattern
from .neighborhood import (PY_PRIMITIVES, REQUIRED, LengthCheck, PythonPrimitives,  # noqa: F401
                           TupleValue, Value, _Ctx, _Failed)
from .primitives import BUILTINS, BuildError, binary, builtin, const, select, to_float, unary

DIM_NAMES = ("b", "h", "q", "k", "q_blocks", "k_blocks")
DTYPES = (INT, FLOAT, BOOL)
_BIN = {"+": "add", "-": "sub", "*": "mul", "/": "div", "//": "floordiv", "%": "mod",
        "&": "and", "|": "or", "and": "and", "or": "or"}
_CMP = {"<": "lt", "<=": "le", ">": "gt", ">=": "ge", "==": "eq", "!=": "ne"}


class Elaborator(PythonPrimitives):
    """One elaboration of one spec; use `elaborate()`."""

    def __init__(self, spec: ast.Spec, params: dict, source, filename, prelude):
        self.spec = spec
        self.diags = Diagnostics(source, filename)
        self.overrides = dict(params)
        self.params: dict[str, Const] = {}
        self.bad_params: set[str] = set()      # already reported; uses stay silent
        self.layout: Optional[Layout] = None
        self.segmented = None  # `ir.segmented.Segmented` of several layout lines
        self.inputs: dict[str, InputDecl] = {}
        self.checks: list[LengthCheck] = []
        self.defs: dict[str, tuple[ast.Def, bool]] = {}
        for d in prelude or ():
            self.defs[d.name] = (d, True)

    # ---- errors ---------------------------------------------------------------------------
    def error(self, loc, msg, hint=None, ctx: Optional[_Ctx] = None):
        if ctx is not None and ctx.site is not None:
            # Inside a prelude definition: point at the use and name the primitive.
            name = next((n for n in ctx.stack if self.defs[n][1]), None)
            loc, msg = ctx.site, (f"in '{name}': {msg}" if name else msg)
        if Diagnostic(loc, msg, hint) not in self.diags.items:   # a def expanded twice
            self.diags.error(loc, msg, hint)

    def fail(self, loc, msg, hint=None, ctx=None):
        self.error(loc, msg, hint, ctx)
        raise _Failed

    # ---- driver ---------------------------------------------------------------------------
    def run(self) -> Pattern:
        spec = self.spec
        header = spec.header
        if header is None:
            self.fail(spec.loc, "a spec must start with 'pattern NAME'")
        for d in spec.decls:
            if isinstance(d, ast.Def):
                self.add_def(d)
        self.bind_params(header)
        clauses = {}
        layouts = [d for d in spec.decls if isinstance(d, ast.LayoutDecl)]
        if len(layouts) == 1 and layouts[0].kind == "grid":
            self.bind_layout(layouts[0])
        elif layouts:
            # Token segments and a grid in one sequence, or separate query and key layouts
            # (`attncc.passes.segments`).
            from .segments_bind import bind_segments
            bind_segments(self, layouts)
        for d in spec.decls:
            if isinstance(d, ast.InputDecl):
                self.declare_input(d)
        for d in spec.decls:
            if isinstance(d, ast.MaskClause) and self.once(clauses, "mask", d):
                clauses["mask"] = self.clause(d.expr, "mask", BOOL)
            elif isinstance(d, ast.ScoreClause) and self.once(clauses, "score", d):
                clauses["score"] = self.clause(d.expr, "score", FLOAT)
            elif isinstance(d, ast.NormalizeClause) and self.once(clauses, "normalize", d):
                if d.kind not in ("softmax", "none"):
                    self.error(d.loc, f"unknown normalization '{d.kind}'",
                               suggest(d.kind, ["softmax", "none"]))
                else:
                    clauses["normalize"] = d.kind
            elif isinstance(d, ast.OutputClause) and self.once(clauses, "output", d):
                if d.kind != "scale":
                    self.error(d.loc, f"unknown output modifier '{d.kind}'", suggest(d.kind, ["scale"]))
                else:
                    clauses["output"] = self.clause(d.expr, "output", FLOAT)
        if self.segmented is not None:
            from .segments_bind import finish_clauses
            finish_clauses(self, clauses, spec)
        self.diags.raise_if_any()
        mask = clauses.get("mask")
        pat = Pattern(
            name=header.name,
            params=tuple((k, v.value) for k, v in self.params.items()),
            layout=self.layout, inputs=tuple(self.inputs.values()),
            mask=TRUE if not isinstance(mask, Expr) else mask,
            score=clauses.get("score") if isinstance(clauses.get("score"), Expr) else None,
            output_scale=clauses.get("output") if isinstance(clauses.get("output"), Expr) else None,
            normalize=clauses.get("normalize") or "softmax",
            source=self.diags.source, filename=self.diags.filename, checks=tuple(self.checks))
        return pat

    def once(self, seen: dict, key: str, d) -> bool:
        if key in seen:
            self.error(d.loc, f"duplicate {key} clause")
            return False
        seen[key] = None
        return True

    def clause(self, expr, clause: str, want: str):
        ctx = _Ctx(clause)
        try:
            v = self.expr(expr, ctx)
            v = self.scalar(v, expr.loc, ctx)
            if want == FLOAT and v.dtype == INT:
                v = to_float(v)
            if v.dtype != want:
                label = "output scale" if clause == "output" else clause
                kind = "a boolean" if want == BOOL else "a float"
                self.fail(expr.loc, f"{label} must be {kind} expression, got {v.dtype}")
            return v
        except _Failed:
            return None

    # ---- declarations ---------------------------------------------------------------------
    def add_def(self, d: ast.Def):
        if d.name in BUILTINS or d.name in PY_PRIMITIVES:
            self.error(d.loc, f"cannot redefine the builtin '{d.name}'")
        elif d.name in self.defs and not self.defs[d.name][1]:
            self.error(d.loc, f"'{d.name}' is defined twice")
        else:
            names = [p.name for p in d.params]
            for p in d.params:
                if p.name in INDEX_VARS + LENGTH_VARS + (SCORE_VAR,):
                    self.error(p.loc, f"def parameter '{p.name}' shadows the index variable")
                elif names.count(p.name) > 1:
                    self.error(p.loc, f"duplicate parameter '{p.name}'")
            self.defs[d.name] = (d, False)

    def bind_params(self, header: ast.Header):
        names = [p.name for p in header.params]
        for name in self.overrides:
            if name not in names:
                hint = suggest(name, names) or (
                    f"'{header.name}' has parameters {', '.join(names)}" if names else
                    f"'{header.name}' has no parameters")
                self.error(header.loc, f"unknown parameter '{name}'", hint)
        for p in header.params:
            if p.name in self.params:
                self.error(p.loc, f"duplicate parameter '{p.name}'")
                continue
            if p.name in INDEX_VARS + LENGTH_VARS + (SCORE_VAR,):
                self.error(p.loc, f"parameter '{p.name}' shadows the index variable")
                continue
            if p.name in self.overrides:
                value = self.overrides[p.name]
                if not isinstance(value, (bool, int, float)):
                    self.error(p.loc, f"parameter '{p.name}' must be an int, float or bool, "
                                      f"got {type(value).__name__}")
                else:
                    try:
                        self.params[p.name] = const(value)
                    except BuildError as e:
                        self.error(p.loc, f"parameter '{p.name}': {e}")
            elif p.default is None:
                self.error(p.loc, f"parameter '{p.name}' has no default and no value was given")
            else:
                v = self.constant(p.default, _Ctx("const"))
                if v is not None:
                    self.params[p.name] = const(v)
            if p.name not in self.params:
                self.bad_params.add(p.name)

    def constant(self, e, ctx: _Ctx, what="this value"):
        """Evaluate `e` to a Python constant (int/float/bool), or None after an error."""
        try:
            v = self.scalar(self.expr(e, _Ctx("const", ctx.env, ctx.site, ctx.stack)), e.loc, ctx)
        except _Failed:
            return None
        if not isinstance(v, Const):
            self.error(e.loc, f"{what} must be a constant", ctx=ctx)
            return None
        return v.value

    def bind_layout(self, d: ast.LayoutDecl):
        if d.kind != "grid":
            self.error(d.loc, f"unknown layout '{d.kind}'", suggest(d.kind, ["grid"]))
            return
        axes, seen = [], set()
        for kw in d.axes:
            if kw.name in seen or kw.name in INDEX_VARS:
                self.error(kw.loc, f"bad axis name '{kw.name}'"
                           + (" (duplicate)" if kw.name in seen else ""))
                continue
            seen.add(kw.name)
            size = self.constant(kw.value, _Ctx("const"), f"size of axis '{kw.name}'")
            if size is None:
                continue
            if type(size) is not int or size < 1:
                self.error(kw.value.loc, f"size of axis '{kw.name}' must be a positive integer, "
                                         f"got {size!r}")
                continue
            axes.append(Axis(kw.name, size))
        if not d.axes:
            self.error(d.loc, "a grid layout needs at least one axis")
        self.layout = Layout(tuple(axes))

    def declare_input(self, d: ast.InputDecl):
        ok = True
        if d.name in self.inputs:
            self.error(d.loc, f"input '{d.name}' is declared twice")
            return
        if d.dtype not in DTYPES:
            self.error(d.loc, f"unknown element type '{d.dtype}' (expected int, float or bool)")
            ok = False
        dims = []
        for e in d.dims:
            if isinstance(e, ast.Name) and e.id in DIM_NAMES:
                dims.append(e.id)
                continue
            if isinstance(e, ast.Name) and e.id not in self.params:
                self.error(e.loc, "bad input dimension: expected one of "
                           + ", ".join(DIM_NAMES) + " or a positive integer",
                           suggest(e.id, list(DIM_NAMES) + list(self.params)))
                ok = False
                continue
            # Anything else is a constant expression over parameters (`2 * maxdist + 1`).
            before = len(self.diags.items)
            v = self.constant(e, _Ctx("const"), "an input dimension")
            if type(v) is int and v > 0:
                dims.append(v)
                continue
            if len(self.diags.items) == before:
                self.error(e.loc, "bad input dimension: expected one of " + ", ".join(DIM_NAMES)
                           + f" or a positive integer, got {v!r}")
            ok = False
        if not d.dims:
            self.error(d.loc, f"input '{d.name}' needs at least one dimension")
            ok = False
        if ok:
            self.inputs[d.name] = InputDecl(d.name, d.dtype, tuple(dims))

    # ---- expressions ----------------------------------------------------------------------
    def scalar(self, v: Value, loc, ctx) -> Expr:
        if isinstance(v, TupleValue):
            self.fail(loc, "a tuple is only allowed as a per-axis argument of a primitive", ctx=ctx)
        return v

    def scalars(self, exprs, ctx) -> list:
        """Scalar values of `exprs`; errors in each are reported before failing."""
        out, failed = [], False
        for x in exprs:
            try:
                out.append(self.scalar(self.expr(x, ctx), x.loc, ctx))
            except _Failed:
                failed = True
        if failed:
            raise _Failed
        return out

    def build(self, fn, loc, ctx, *args, **kw) -> Expr:
        try:
            return fn(*args, floats=ctx.floats, **kw)
        except BuildError as e:
            self.fail(loc, str(e), ctx=ctx)

    def expr(self, e, ctx: _Ctx) -> Value:
        if isinstance(e, ast.Num):
            return const(e.value)
        if isinstance(e, ast.Bool):
            return const(bool(e.value))
        if isinstance(e, ast.Name):
            return self.name(e, ctx)
        if isinstance(e, ast.Attr):
            return self.coord(e, ctx)
        if isinstance(e, ast.Unary):
            x, = self.scalars([e.operand], ctx)
            return self.build(unary, e.loc, ctx, "neg" if e.op == "-" else "not", x)
        if isinstance(e, ast.Binary):
            op = _BIN.get(e.op)
            if op is None:
                self.fail(e.loc, f"unknown operator '{e.op}'", ctx=ctx)
            a, b = self.scalars([e.left, e.right], ctx)
            return self.build(binary, e.loc, ctx, op, a, b)
        if isinstance(e, ast.Compare):
            vals = self.scalars(e.operands, ctx)
            out = None
            for op, a, b in zip(e.ops, vals, vals[1:]):
                c = self.build(binary, e.loc, ctx, _CMP[op], a, b)
                out = c if out is None else self.build(binary, e.loc, ctx, "and", out, c)
            return out
        if isinstance(e, ast.Ternary):
            c, a, b = self.scalars([e.cond, e.then, e.orelse], ctx)
            return self.build(select, e.loc, ctx, c, a, b)
        if isinstance(e, ast.Tuple):
            return TupleValue(tuple(self.scalars(e.items, ctx)))
        if isinstance(e, ast.Index):
            return self.index(e, ctx)
        if isinstance(e, ast.Call):
            return self.call(e.func, e.args, e.kwargs, e.loc, ctx)
        self.fail(getattr(e, "loc", None), f"unexpected {type(e).__name__} in an expression", ctx=ctx)

    def scope_names(self, ctx) -> list[str]:
        names = list(ctx.env) + list(self.params) + list(INDEX_VARS + LENGTH_VARS)
        names += list(self.inputs) + list(self.defs) + list(BUILTINS) + list(PY_PRIMITIVES)
        if ctx.clause == "score":
            names.append(SCORE_VAR)
        return names

    def name(self, e: ast.Name, ctx: _Ctx) -> Value:
        n = e.id
        if n in ctx.env:
            return ctx.env[n]
        if n in self.params:
            return self.params[n]
        if n in self.bad_params:
            raise _Failed
        if n in INDEX_VARS or n in LENGTH_VARS or n == SCORE_VAR:
            if ctx.clause == "const":
                self.fail(e.loc, f"'{n}' is not a constant (parameter defaults, layout sizes and "
                                 "primitive options must be constant)", ctx=ctx)
            if n == SCORE_VAR and ctx.clause != "score":
                self.fail(e.loc, "'s' (the attention score) can only be used in a score clause",
                          ctx=ctx)
            return Var(n)
        if n in self.inputs:
            dims = ", ".join(str(x) for x in self.inputs[n].dims)
            self.fail(e.loc, f"input '{n}' must be indexed, e.g. {n}[{dims}]", ctx=ctx)
        if n in self.defs or n in PY_PRIMITIVES:
            return self.call(n, (), (), e.loc, ctx)
        if n in BUILTINS:
            self.fail(e.loc, f"'{n}' is a function; call it with arguments", ctx=ctx)
        hint = suggest(n, self.scope_names(ctx))
        callable_hint = suggest(n, list(self.defs) + list(PY_PRIMITIVES))
        kind = "primitive" if hint is not None and hint == callable_hint else "name"
        self.fail(e.loc, f"unknown {kind} '{n}'", hint, ctx=ctx)

    def coord(self, e: ast.Attr, ctx: _Ctx) -> Expr:
        side = e.value.id if isinstance(e.value, ast.Name) else None
        if side not in ("q", "k") or side in ctx.env:
            self.fail(e.loc, "coordinates are written q.<axis> or k.<axis>", ctx=ctx)
        if ctx.clause == "const":
            self.fail(e.loc, f"'{side}.{e.attr}' is not a constant", ctx=ctx)
        if self.segmented is not None:  # segment membership, or a side's own grid axis
            from .segments import resolve
            hit = resolve(self.segmented, side, e.attr)
            if isinstance(hit, str):
                self.fail(e.loc, hit, ctx=ctx)
            return hit
        if self.layout is None:
            self.fail(e.loc, f"coordinate '{side}.{e.attr}' needs a layout "
                             "(add e.g. 'layout grid(y = 64, x = 64)')", ctx=ctx)
        names = [a.name for a in self.layout.axes]
        if e.attr not in names:
            self.fail(e.loc, f"unknown axis '{e.attr}'",
                      suggest(e.attr, names) or f"the layout has axes {', '.join(names)}", ctx=ctx)
        return Coord(side, names.index(e.attr), e.attr)

    def index(self, e: ast.Index, ctx: _Ctx) -> Expr:
        decl = self.inputs.get(e.name)
        if decl is None:
            self.fail(e.loc, f"unknown input '{e.name}'", suggest(e.name, self.inputs), ctx=ctx)
        if ctx.clause == "const":
            self.fail(e.loc, f"input '{e.name}' is not a constant", ctx=ctx)
        if len(e.indices) != len(decl.dims):
            self.fail(e.loc, f"input '{e.name}' has {len(decl.dims)} dimensions "
                             f"[{', '.join(map(str, decl.dims))}], got {len(e.indices)} indices",
                      ctx=ctx)
        idx = self.scalars(e.indices, ctx)
        for x, v in zip(e.indices, idx):
            if v.dtype != INT:
                self.fail(x.loc, f"index of '{e.name}' must be int, got {v.dtype}", ctx=ctx)
        return Load(e.name, tuple(idx), decl.dtype)

    # ---- calls ----------------------------------------------------------------------------
    def call(self, fname, args, kwargs, loc, ctx: _Ctx) -> Value:
        # Functions live in their own namespace: `window(window)` calls the primitive with
        # the parameter of the same name.
        if fname in BUILTINS:
            if kwargs:
                self.fail(kwargs[0].loc, f"'{fname}' takes no keyword arguments", ctx=ctx)
            if len(args) != BUILTINS[fname]:
                self.fail(loc, f"'{fname}' takes {_n_args(BUILTINS[fname])} "
                               f"({len(args)} given)", ctx=ctx)
            vals = self.scalars(args, ctx)
            return self.build(builtin, loc, ctx, fname, vals)
        if fname in PY_PRIMITIVES:
            bound = self.bind(fname, PY_PRIMITIVES[fname], args, kwargs, loc, ctx)
            return getattr(self, "prim_" + fname)(bound, loc, ctx)
        if fname in self.defs:
            return self.expand(fname, args, kwargs, loc, ctx)
        if fname in ctx.env or fname in self.params:
            self.fail(loc, f"'{fname}' is not a function", ctx=ctx)
        callables = list(self.defs) + list(BUILTINS) + list(PY_PRIMITIVES)
        self.fail(loc, f"unknown primitive '{fname}'",
                  suggest(fname, callables) or suggest(fname, self.scope_names(ctx)), ctx=ctx)

    def bind(self, fname, sig, args, kwargs, loc, ctx) -> dict:
        """Match call arguments to `sig` ((name, default-or-REQUIRED), ...): name -> AST."""
        names = [n for n, _ in sig]
        if len(args) > len(sig):
            self.fail(loc, f"'{fname}' takes at most {_n_args(len(sig))} ({len(args)} given)",
                      ctx=ctx)
        out = dict(zip(names, args))
        for kw in kwargs:
            if kw.name not in names:
                self.fail(kw.loc, f"'{fname}' has no parameter '{kw.name}'",
                          suggest(kw.name, names), ctx=ctx)
            if kw.name in out:
                self.fail(kw.loc, f"argument '{kw.name}' of '{fname}' given twice", ctx=ctx)
            out[kw.name] = kw.value
        missing = [n for n, dflt in sig if dflt is REQUIRED and n not in out]
        if missing:
            usage = f"{fname}({', '.join(names)})"
            self.fail(loc, f"'{fname}' is missing argument '{missing[0]}'", f"usage: {usage}",
                      ctx=ctx)
        return out

    def expand(self, fname, args, kwargs, loc, ctx: _Ctx) -> Value:
        d, is_prelude = self.defs[fname]
        if fname in ctx.stack:
            self.fail(loc, f"'{fname}' is defined in terms of itself", ctx=ctx)
        sig = [(p.name, REQUIRED if p.default is None else p.default) for p in d.params]
        bound = self.bind(fname, sig, args, kwargs, loc, ctx)
        env = {}
        for p in d.params:
            if p.name in bound:
                env[p.name] = self.expr(bound[p.name], ctx)
        site = ctx.site if ctx.site is not None else (loc if is_prelude else None)
        inner = _Ctx(ctx.clause, env, site, ctx.stack + (fname,))
        for p in d.params:   # defaults may refer to earlier parameters
            if p.name not in env:
                env[p.name] = self.expr(p.default, inner)
        return self.expr(d.body, inner)


def _n_args(n: int) -> str:
    return f"{n} argument" + ("" if n == 1 else "s")


def elaborate(spec: ast.Spec, params: Optional[dict] = None, *, source: Optional[str] = None,
              filename: str = "<spec>", prelude: Optional[list] = None) -> Pattern:
    """Elaborate a parsed spec into a `Pattern`.

    `params` overrides header defaults (name -> int/float/bool); `prelude` is the list of
    library `ast.Def`s (from `grammar/prelude.attn`). Raises `SpecError` listing every
    semantic error. The resulting mask evaluates to `bool [B, H, Lq, Lkv]` via
    `Pattern.dense_mask`.
    """
    return Elaborator(spec, params or {}, source, filename, prelude).run()


def check_lengths(pattern: Pattern, q_len: int, kv_len: int) -> None:
    """`pattern.check_lengths(q_len, kv_len)` (kept here for callers of the elaborator)."""
    pattern.check_lengths(q_len, kv_len)
