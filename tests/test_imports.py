"""Every `from peftkit.x import name` in the package, the scripts and the tests names something that exists.

Most of peftkit's imports of its own modules sit inside functions (to keep `peftkit --help` fast), so a module split
that misses one fails only when that path runs: the benchmark scripts, which no other test runs, would fail at their
first call."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FILES = sorted(p for folder in ("peftkit", "scripts", "tests") for p in (ROOT / folder).rglob("*.py"))


def _own_imports(path: Path) -> list[tuple[int, str, str]]:
    """(line, module, name) of each `from peftkit... import name` in `path`, wherever it sits."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "peftkit":
            found += [(node.lineno, node.module, alias.name) for alias in node.names if alias.name != "*"]
    return found


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_import_of_peftkit_resolves(path):
    missing = []
    for line, module, name in _own_imports(path):
        owner = importlib.import_module(module)
        if not hasattr(owner, name):
            try:  # a submodule, imported by name
                importlib.import_module(f"{module}.{name}")
            except ModuleNotFoundError:
                missing.append(f"{path.relative_to(ROOT)}:{line}: {module} has no {name}")
    assert not missing, "\n".join(missing)
