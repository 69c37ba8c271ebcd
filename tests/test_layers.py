"""The package's layers and the absence of import cycles, checked on the source (import-linter's
contracts in pyproject.toml, and grimp's import graph)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]


def test_import_linter_contracts_hold():
    # in a process of its own: import-linter reconfigures logging
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports())"
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 broken" in run.stdout


def test_no_import_cycles():
    graph = grimp.build_graph("dalle_ar", cache_dir=None)  # imports for type checking count
    cycles = []
    for m in sorted(graph.modules):
        for n in sorted(graph.find_modules_directly_imported_by(m)):
            chain = graph.find_shortest_chain(importer=n, imported=m)
            if chain:
                cycles.append(" -> ".join((m, *chain)))
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_kernels_import_nothing_above_them():
    """kernels/ is installed as dalle_ar.kernels (outside the graph grimp reads): it may import
    only itself."""
    bad = []
    for path in sorted((ROOT / "kernels").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            above = [n for n in names if n.split(".")[0] == "dalle_ar"]
            bad += [f"{path.name}: {n}" for n in above if not n.startswith("dalle_ar.kernels")]
    assert not bad


def test_every_package_folder_is_installed():
    """pyproject.toml lists the packages one by one (kernels/ ships as dalle_ar.kernels): a folder
    of dalle_ar/ left out of the list imports from a source checkout but not once installed."""
    toml = (ROOT / "pyproject.toml").read_text()
    listed = set(re.findall(r'"(dalle_ar[\w.]*)"', toml.split("packages = [", 1)[1].split("]")[0]))
    folders = {".".join(p.parent.relative_to(ROOT).parts)
               for p in (ROOT / "dalle_ar").rglob("__init__.py")}  # fmt: skip
    assert folders | {"dalle_ar.kernels"} == listed
