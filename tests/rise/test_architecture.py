"""The import rules of README "Architecture": layers (import-linter contracts in
pyproject.toml), no import cycles, no private names across modules, imports at the top.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "services" / "rise"
GENERATED = PACKAGE / "v1"


def sources() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if GENERATED not in p.parents)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def lint_imports() -> str:
    exe = Path(sys.executable).with_name("lint-imports")
    return str(exe) if exe.exists() else shutil.which("lint-imports") or "lint-imports"


def test_import_contracts_are_kept():
    out = subprocess.run([lint_imports(), "--config", str(REPO / "pyproject.toml")],
                         cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "5 kept, 0 broken" in out.stdout


def test_no_import_cycles():
    """No module reaches itself through its imports (a cycle makes import order matter
    and hides which layer a module belongs to)."""
    graph = grimp.build_graph("rise", exclude_type_checking_imports=True)
    modules = sorted(m for m in graph.modules if not m.startswith("rise.v1"))
    cycles = []
    for m in modules:
        for imported in graph.find_modules_directly_imported_by(m):
            # A package importing its own submodule (``rise.stack`` -> ``rise.stack.cli``)
            # is how packages re-export; only a chain back from elsewhere is a cycle.
            if imported.startswith(m + "."):
                continue
            back = graph.find_shortest_chain(importer=imported, imported=m)
            if back is not None and not m.startswith(imported + "."):
                cycles.append(" -> ".join((m, *back)))
    assert cycles == []


def _rise_module_aliases(tree: ast.Module) -> set[str]:
    """Names bound to rise modules (``from rise import index as I``, ``import rise.x``)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and \
                (node.module == "rise" or node.module.startswith("rise.")):
            for a in node.names:
                names.add(a.asname or a.name)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("rise"):
                    names.add(a.asname or a.name.split(".")[0])
    return names


def test_no_private_names_across_modules():
    found = []
    for path in sources():
        tree = ast.parse(path.read_text(), str(path))
        aliases = _rise_module_aliases(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and \
                    node.module.startswith("rise"):
                found += [f"{module_name(path)}: from {node.module} import {a.name}"
                          for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
                    node.value.id in aliases and node.attr.startswith("_") and \
                    not node.attr.startswith("__"):
                found.append(f"{module_name(path)}: {node.value.id}.{node.attr}")
    assert found == []


LAZY_REASON = "start-up"
"""The comment a function-level import carries: a measured start-up time it saves."""


def test_imports_are_at_the_top_unless_a_reason_is_given():
    """An import inside a function must say why, on its line or just above (the CLI
    keeps torch out of ``rise --help``; the stack keeps optional servers optional)."""
    found = []
    for path in sources():
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines), str(path))
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Import | ast.ImportFrom):
                    around = " ".join(lines[max(0, node.lineno - 5):node.lineno])
                    if LAZY_REASON not in around and "TYPE_CHECKING" not in around:
                        found.append(f"{module_name(path)}:{node.lineno}")
    assert found == [], f"function-level imports without a '{LAZY_REASON}' reason: {found}"


@pytest.mark.parametrize("module", ["rise.manifest", "rise.index", "rise.gateway.service"])
def test_readers_of_indexes_do_not_load_the_model_pipeline(module):
    """What the contracts say, checked in a fresh interpreter: opening indexes (the gateway,
    the scorer) never imports the model loader's heavy dependencies through rise.index."""
    code = (f"import sys, {module}; "
            "print(sorted(m for m in ('rise.worker', 'rise.worker.app', 'celery.worker') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"
