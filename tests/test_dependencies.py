"""Declared dependencies are exactly the imported ones.

Every module of the package (attncc/, grammar/, codegen/ as installed) is parsed: each
imported top-level name must be the standard library, attncc itself, or a distribution
declared in pyproject.toml; a distribution declared only in an optional extra may be imported
only where the import is optional (inside a function, or under `try: ... except ImportError`).
Every declared runtime dependency must be imported somewhere (or be listed below with the
reason it is needed at run time). Every module also imports cleanly in a fresh interpreter
without pulling in an optional extra.
"""
import ast
import functools
import importlib.metadata
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE_DIRS = {"attncc": "attncc", "grammar": "attncc.grammar", "codegen": "attncc.codegen"}

# Declared, needed at run time, but never imported by name from the package.
NEEDED_UNIMPORTED = {
    "numpy": "Triton's interpreter (TRITON_INTERPRET=1) and Tensor.numpy() in draw.py need it",
}


def _pyproject() -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        from pip._vendor import tomli as tomllib
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def _dist_name(requirement: str) -> str:
    return re.match(r"\s*([A-Za-z0-9_.\-]+)", requirement).group(1).lower().replace("_", "-")


def declared() -> tuple[set[str], dict[str, set[str]]]:
    project = _pyproject()["project"]
    required = {_dist_name(r) for r in project.get("dependencies", [])}
    extras = {name: {_dist_name(r) for r in reqs}
              for name, reqs in project.get("optional-dependencies", {}).items()}
    return required, extras


def module_files():
    for top, _ in SOURCE_DIRS.items():
        for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
            for name in sorted(files):
                if name.endswith(".py"):
                    yield os.path.join(dirpath, name)


def _handles_import_error(node: ast.Try) -> bool:
    for h in node.handlers:
        names = [h.type] if not isinstance(h.type, ast.Tuple) else list(h.type.elts)
        if h.type is None or any(isinstance(n, ast.Name) and n.id in
                                 ("ImportError", "ModuleNotFoundError", "Exception")
                                 for n in names):
            return True
    return False


def imports(path: str):
    """(top-level name, optional, line) for every absolute import in the file at `path`;
    `optional` when inside a function or a try block that handles ImportError."""
    tree = ast.parse(open(path, encoding="utf-8").read(), filename=path)
    out = []

    def visit(node, optional):
        for child in ast.iter_child_nodes(node):
            opt = optional
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                opt = True
            if isinstance(child, ast.Try) and _handles_import_error(child):
                for stmt in child.body:
                    visit_stmt(stmt, True)
                for part in (child.handlers, child.orelse, child.finalbody):
                    for stmt in part:
                        visit_stmt(stmt, optional)
                continue
            visit_stmt(child, opt)

    def visit_stmt(node, optional):
        if isinstance(node, ast.Import):
            out.extend((a.name.split(".")[0], optional, node.lineno) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.module.split(".")[0], optional, node.lineno))
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            opt = optional or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(node, ast.Try) and _handles_import_error(node):
                visit(ast.Module(body=[node], type_ignores=[]), optional)
            else:
                visit(node, opt)

    visit(tree, False)
    return out


@functools.lru_cache(maxsize=1)
def _distributions() -> dict:
    return importlib.metadata.packages_distributions()


def _dist_of(name: str) -> str:
    try:  # the usual case (distribution named like its import), without a scan of all of them
        return importlib.metadata.distribution(name).metadata["Name"].lower().replace("_", "-")
    except importlib.metadata.PackageNotFoundError:
        pass
    dists = _distributions().get(name)
    assert dists, f"no installed distribution provides the import name {name!r}"
    return dists[0].lower().replace("_", "-")


def test_imports_match_declared_dependencies():
    required, extras = declared()
    optional_only = set().union(*extras.values()) - required
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    problems, used = [], set()
    for path in module_files():
        rel = os.path.relpath(path, ROOT)
        for name, optional, line in imports(path):
            if name in stdlib or name == "attncc":
                continue
            dist = _dist_of(name)
            used.add(dist)
            if dist in required:
                continue
            if dist in optional_only:
                if not optional:
                    problems.append(f"{rel}:{line}: '{name}' is an optional extra "
                                    "but imported unconditionally at module level")
                continue
            problems.append(f"{rel}:{line}: imports '{name}' (distribution '{dist}'), "
                            "which pyproject.toml does not declare")
    unused = required - used - set(NEEDED_UNIMPORTED)
    problems += [f"pyproject.toml declares '{d}', which the package never imports" for d in
                 sorted(unused)]
    assert not problems, "\n".join(problems)
    assert set(NEEDED_UNIMPORTED) <= required, "numpy must be declared (Triton's interpreter)"
    assert "plot" in extras and "matplotlib" in extras["plot"]


def test_the_import_check_catches_an_undeclared_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import sympy\ndef f():\n    import matplotlib\ntry:\n    import lark\n"
                   "except ImportError:\n    pass\n")
    assert imports(str(bad)) == [("sympy", False, 1), ("matplotlib", True, 3), ("lark", True, 5)]


def _module_names():
    names = []
    for path in module_files():
        rel = os.path.relpath(path, ROOT)[:-3].split(os.sep)
        rel[0] = SOURCE_DIRS[rel[0]]
        if rel[-1] == "__init__":
            rel = rel[:-1]
        if rel[-1] != "__main__":  # running it is the CLI, not an import
            names.append(".".join(rel))
    return names


def test_every_module_imports_in_a_fresh_interpreter():
    names = _module_names()
    assert "attncc.runtime.compile" in names and "attncc.codegen.forward" in names
    script = ("import importlib, sys\n"
              f"for name in {names!r}:\n"
              "    importlib.import_module(name)\n"
              "extras = sorted(m for m in ('matplotlib', 'pytest', 'hypothesis') if m in sys.modules)\n"
              "print('EXTRAS', extras)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "EXTRAS []" in res.stdout, res.stdout
