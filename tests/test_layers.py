"""The package's layers hold: import-linter's contracts (.importlinter) pass, and no module
of fedtune imports, directly or through others, a module that imports it back (function-local
imports included: a lazy import does not hide a cycle). Every function-local import of
fedtune's own code says why on its line (``# lazy: torch``: kept out of a start-up path), and
no file is over 400 lines nor any function over 60."""

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parent.parent


def test_lint_imports_keeps_the_layer_contracts():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or "lint-imports"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([exe, "--config", str(ROOT / ".importlinter")], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "0 broken" in res.stdout


def _cycles(graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(m):
        index[m] = low[m] = len(index)
        stack.append(m)
        on.add(m)
        for n in graph.find_modules_directly_imported_by(m):
            if n not in index:
                visit(n)
                low[m] = min(low[m], low[n])
            elif n in on:
                low[m] = min(low[m], index[n])
        if low[m] == index[m]:
            comp = []
            while True:
                n = stack.pop()
                on.discard(n)
                comp.append(n)
                if n == m:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for m in sorted(graph.modules):
        if m not in index:
            visit(m)
    return out


def test_no_import_cycle_in_fedtune():
    graph = grimp.build_graph("fedtune", include_external_packages=False, exclude_type_checking_imports=True)
    # A package imports its own submodules (its __init__); those edges are not cycles of code.
    for m in list(graph.modules):
        for n in graph.find_modules_directly_imported_by(m):
            if n.startswith(m + "."):
                graph.remove_import(importer=m, imported=n)
    cycles = _cycles(graph)
    assert not cycles, f"import cycles: {cycles}"


# ---- lazy imports say why; sizes ------------------------------------------------------------
MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 60


def _sources():
    return [(p.relative_to(ROOT), p.read_text()) for p in sorted((ROOT / "fedtune").rglob("*.py"))]


def _own(node) -> bool:
    if isinstance(node, ast.ImportFrom):
        return node.level > 0 or (node.module or "").split(".")[0] == "fedtune"
    return isinstance(node, ast.Import) and any(a.name.split(".")[0] == "fedtune" for a in node.names)


def unexplained_lazy_imports(source: str) -> list[int]:
    """Lines of function-local imports of fedtune's own code without a ``# lazy: <reason>``."""
    lines, bad = source.splitlines(), set()
    for fn in ast.walk(ast.parse(source)):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if _own(node) and not re.search(r"# lazy: *\S", "\n".join(lines[node.lineno - 1:node.end_lineno])):
                    bad.add(node.lineno)
    return sorted(bad)


def oversized(source: str) -> list[str]:
    """The file, if over MAX_FILE_LINES, and each function over MAX_FUNCTION_LINES (def to last line)."""
    out = [f"{len(source.splitlines())} lines"] if len(source.splitlines()) > MAX_FILE_LINES else []
    for fn in ast.walk(ast.parse(source)):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and fn.end_lineno - fn.lineno + 1 > MAX_FUNCTION_LINES:
            out.append(f"{fn.name} (line {fn.lineno}): {fn.end_lineno - fn.lineno + 1} lines")
    return out


def test_the_checks_catch_what_they_claim():
    bad = "def f():\n    from fedtune.model import x\n    import fedtune.train\n    from .data import y  # lazy:\n"
    good = "def f():\n    from fedtune.model import (  # lazy: torch\n        x,\n    )\n    import os\n"
    assert unexplained_lazy_imports(bad) == [2, 3, 4] and unexplained_lazy_imports(good) == []
    long = "def f():\n" + "    x = 1\n" * MAX_FUNCTION_LINES
    assert oversized(long) == [f"f (line 1): {MAX_FUNCTION_LINES + 1} lines"] and oversized(long[:-10]) == []
    assert oversized("x = 1\n" * (MAX_FILE_LINES + 1)) == [f"{MAX_FILE_LINES + 1} lines"]


def test_every_lazy_import_of_fedtune_says_why():
    bad = [f"{path}:{line}" for path, src in _sources() for line in unexplained_lazy_imports(src)]
    assert not bad, f"function-local imports of fedtune without '# lazy: <reason>' (or move them to the top): {bad}"


def test_no_file_over_400_lines_and_no_function_over_60():
    bad = [f"{path}: {what}" for path, src in _sources() for what in oversized(src)]
    assert not bad, f"split these: {bad}"
