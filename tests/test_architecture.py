"""The architecture's contracts (docs/architecture.md): imports flow one way through the layers that
pyproject.toml's import-linter contracts name, and no module imports itself back through others, imports
inside functions and under TYPE_CHECKING included.

Both checks run on the package as it installs (`kernels/` placed at `workbench/kernels`, as the wheel does),
in a fresh interpreter so that grimp reads that copy and not the modules this test process has imported.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EDGES = """
import json, grimp
g = grimp.build_graph("workbench", cache_dir=None)
print(json.dumps({m: sorted(g.find_modules_directly_imported_by(m)) for m in g.modules}))
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A copy of the package laid out as installed: workbench/ with kernels/ inside it."""
    site = tmp_path_factory.mktemp("site")
    skip = shutil.ignore_patterns("__pycache__", "kernels")
    shutil.copytree(ROOT / "workbench", site / "workbench", ignore=skip)
    shutil.copytree(ROOT / "kernels", site / "workbench" / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    return site


def _run(args: list[str], site: Path) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=site, env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=300)


def cycles(edges: dict[str, list[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, []):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_cycles():
    assert cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c"]]
    assert cycles({"a": ["b"], "b": [], "c": ["a", "b"]}) == []


def test_no_import_cycle_among_workbench_modules(installed):
    run = _run([sys.executable, "-c", EDGES], installed)
    assert run.returncode == 0, run.stderr
    edges = json.loads(run.stdout)
    assert "workbench.kernels.router" in edges and "workbench.models.moe" in edges  # the whole package was read
    assert cycles(edges) == []


def test_layering_contract(installed):
    run = _run([str(Path(sys.executable).parent / "lint-imports"), "--config", str(ROOT / "pyproject.toml"),
                "--no-cache"], installed)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 broken" in run.stdout


def test_layering_contract_fails_on_an_upward_import(installed, tmp_path):
    """The contract is live: one upward import (the store reaching into the widgets) breaks it."""
    site = tmp_path / "site"
    shutil.copytree(installed, site)
    with open(site / "workbench" / "schema.py", "a") as f:
        f.write("\n\ndef _upward():\n    from . import widgets  # noqa: F401\n")
    run = _run([str(Path(sys.executable).parent / "lint-imports"), "--config", str(ROOT / "pyproject.toml"),
                "--no-cache"], site)
    assert run.returncode != 0
    assert "workbench.schema -> workbench.widgets" in run.stdout
