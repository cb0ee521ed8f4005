"""The package's layers hold: import-linter's contracts (.importlinter) pass, and no module
of fedtune imports, directly or through others, a module that imports it back (function-local
imports included: a lazy import does not hide a cycle)."""

import os
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
