"""The package has no import cycle between its parts, and imports flow one way through the
stages

    base/frontend → ir → passes → schedule → codegen → runtime → cli (and other entry points)

Every module's AST is read, function-level imports included (a lazy import is still a
dependency), so a lower stage never reaches up into a higher one."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE_DIRS = {"attncc": "attncc", "grammar": "attncc.grammar", "codegen": "attncc.codegen"}

# Stage of each module, by longest matching name prefix; a module may import only modules of
# its own stage or lower ones.
STAGES = [
    ("attncc.options", 0), ("attncc.helpers", 0), ("attncc.grammar", 0),   # below every stage
    ("attncc.frontend", 1),                       # parser, AST, errors and diagnostics
    ("attncc.ir", 2), ("attncc.reference", 2),    # IR, Pattern, dense evaluation
    ("attncc.passes", 3), ("attncc.api", 3),      # elaboration and analyses; load/parse
    ("attncc.schedule", 4),
    ("attncc.codegen", 5),
    ("attncc.runtime", 6),
    ("attncc.cli", 7), ("attncc.__main__", 7), ("attncc.pipeline", 7),  # entry points
    ("attncc.decorator", 7),                      # @attncc.pattern: its functions run kernels
    ("attncc.distributed", 7),
]
STAGE_NAMES = ["base", "frontend", "ir", "passes", "schedule", "codegen", "runtime", "entry"]


def modules() -> dict:
    out = {}
    for top, pkg in SOURCE_DIRS.items():
        for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
            for f in files:
                if not f.endswith(".py"):
                    continue
                path = os.path.join(dirpath, f)
                rel = os.path.relpath(path, os.path.join(ROOT, top))[:-3].split(os.sep)
                is_pkg = rel[-1] == "__init__"
                name = ".".join([pkg] + (rel[:-1] if is_pkg else rel))
                out[name] = (path, is_pkg)
    return out


def import_edges(mods: dict) -> set:
    """(importer, imported module, line) for every import of an attncc module anywhere in a
    file (module level, functions, try blocks). `from x import name` counts `x.name` when that
    is a module. Imports of the package `attncc` itself (its lazy public names) are skipped."""
    edges = set()
    for name, (path, is_pkg) in mods.items():
        tree = ast.parse(open(path, encoding="utf-8").read(), filename=path)
        base = name if is_pkg else name.rpartition(".")[0]
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parent = base
                    for _ in range(node.level - 1):
                        parent = parent.rpartition(".")[0]
                    mod = parent + ("." + node.module if node.module else "")
                else:
                    mod = node.module or ""
                targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                if not (t == "attncc" or t.startswith("attncc.")):
                    continue
                while t not in mods and "." in t:
                    t = t.rpartition(".")[0]
                if t in mods and t != name and t != "attncc":
                    edges.add((name, t, node.lineno))
    return edges


def stage(name: str):
    best = None
    for prefix, s in STAGES:
        if name == prefix or name.startswith(prefix + "."):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, s)
    return None if best is None else best[1]


def cycles(nodes, edges) -> list:
    """Strongly connected components with more than one module (Tarjan)."""
    graph = {n: sorted({b for a, b, _ in edges if a == n}) for n in nodes}
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))
    for n in sorted(nodes):
        if n not in index:
            visit(n)
    return out


def unit(name: str) -> str:
    """The subpackage a module belongs to (attncc.runtime.backends.flex -> attncc.runtime), or
    the module itself at the top level (attncc.cli)."""
    return ".".join(name.split(".")[:2])


_EDGES = {}


def package_edges():
    """(modules, edges) of the package, computed once per test session."""
    if not _EDGES:
        mods = modules()
        _EDGES["value"] = (mods, import_edges(mods))
    return _EDGES["value"]


def test_no_import_cycle_between_packages():
    """No cycle between the subpackages and top-level modules of attncc, function-level
    imports included. (Within one subpackage, a lazy import such as `Expr.__str__` using the
    printer, or `Schedule.__str__` the drawing module, is allowed.)"""
    mods, all_edges = package_edges()
    edges = {(unit(a), unit(b), line) for a, b, line in all_edges if unit(a) != unit(b)}
    found = cycles({unit(m) for m in mods} - {"attncc"}, edges)
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_imports_follow_the_stage_order():
    mods, edges = package_edges()
    unclassified = sorted(m for m in mods if m != "attncc" and stage(m) is None)
    assert not unclassified, f"add these modules to STAGES: {unclassified}"
    bad = [f"{a} ({STAGE_NAMES[stage(a)]}) imports {b} ({STAGE_NAMES[stage(b)]}) at line {line}"
           for a, b, line in sorted(edges) if stage(b) > stage(a)]
    assert not bad, "imports against the stage order:\n" + "\n".join(bad)


def test_the_checks_catch_a_cycle_and_a_function_level_upward_import(tmp_path):
    pkg = tmp_path / "attncc"
    (pkg / "ir").mkdir(parents=True)
    (pkg / "runtime").mkdir()
    for f in ("__init__.py", "ir/__init__.py", "runtime/__init__.py"):
        (pkg / f).write_text("")
    (pkg / "ir" / "pattern.py").write_text("def call():\n    from ..runtime.compile import k\n")
    (pkg / "runtime" / "compile.py").write_text("from ..ir.pattern import call\nk = 1\n")
    mods = {"attncc.ir.pattern": (str(pkg / "ir" / "pattern.py"), False),
            "attncc.runtime.compile": (str(pkg / "runtime" / "compile.py"), False)}
    edges = import_edges(mods)
    assert {(a, b) for a, b, _ in edges} == {("attncc.ir.pattern", "attncc.runtime.compile"),
                                             ("attncc.runtime.compile", "attncc.ir.pattern")}
    assert cycles(set(mods), edges) == [sorted(mods)]
    assert stage("attncc.runtime.compile") > stage("attncc.ir.pattern")
