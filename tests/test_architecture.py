"""The package's import graph, read from the source with ``ast``: the optimiser side imports
nothing of the distributed package, no module imports itself back through others, and
importing the library loads no plotting or terminal packages."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "signsgd"

#: Modules of the optimiser side: they may not import ``signsgd.distributed`` (the boundary
#: is ``signsgd.reduction``, which the distributed package implements).
OPTIMISER_SIDE = ["optim", "compression", "functional", "packing", "reduction", "outer",
                  "scratch", "errors", "onebit_adam", "sharding"]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every ``signsgd`` module ``path`` imports, anywhere in the file (type-only imports
    and imports inside functions included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("signsgd"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and \
                node.module.startswith("signsgd"):
            found.add(node.module)
            for a in node.names:  # ``from signsgd import optim`` imports a module
                if (PACKAGE.parent / (node.module + "." + a.name).replace(".", "/")).with_suffix(
                        ".py").exists():
                    found.add(f"{node.module}.{a.name}")
    return found


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}


@pytest.mark.parametrize("module", OPTIMISER_SIDE)
def test_the_optimiser_side_imports_nothing_of_the_distributed_package(module):
    graph = _graph()
    bad = sorted(m for m in graph[f"signsgd.{module}"] if m.startswith("signsgd.distributed"))
    assert not bad, f"signsgd.{module} imports {bad}"


#: Edges that must not exist (the module on the left imports nothing of those on the right):
#: the loop is the library's, below the trainer; a task gets its spec, not the config.
FORBIDDEN = [("signsgd.loop", ("signsgd.train", "signsgd.config", "signsgd.tasks",
                               "signsgd.outputs", "signsgd.distributed")),
             ("signsgd.tasks", ("signsgd.config", "signsgd.train"))]


@pytest.mark.parametrize("module, above", FORBIDDEN)
def test_no_import_runs_back_up(module, above):
    bad = sorted(m for m in _graph()[module] if m.startswith(above))
    assert not bad, f"{module} imports {bad}"


def test_the_import_graph_has_no_cycle():
    graph = _graph()
    known = set(graph)

    def edges(m: str) -> set[str]:
        # an import of a package's own face (``from signsgd import functional``) is not an
        # edge back up: the package __init__ runs before any of its modules anyway
        return {t for t in graph[m] if t in known and t != m and not m.startswith(t + ".")}

    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for t in sorted(edges(m)):
            if state.get(t) == 1:
                cycle = path[path.index(t):] + [t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_importing_the_library_loads_no_plotting_or_terminal_package():
    code = ("import sys, signsgd, signsgd.distributed; "
            "print(sorted(m for m in ('matplotlib', 'rich') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout
