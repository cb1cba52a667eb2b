"""Imports run down the layers: distill sits below bridge (the bridge package reads its files
and hands distill plain tensors), and tools never import the test suite."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imports(folder: Path) -> list[tuple[str, str]]:
    """``(file name, imported module)`` for every import in the folder's Python files."""
    found = []
    for path in sorted(folder.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.append((path.name, node.module))
            elif isinstance(node, ast.Import):
                found += [(path.name, alias.name) for alias in node.names]
    return found


@pytest.mark.parametrize(
    "folder, forbidden",
    [("oprd_mega/distill", "oprd_mega.bridge"), ("tools", "tests")],
)
def test_no_import_runs_back_up(folder: str, forbidden: str) -> None:
    wrong = [
        f"{name}: {module}"
        for name, module in _imports(ROOT / folder)
        if module == forbidden or module.startswith(forbidden + ".")
    ]
    assert wrong == []
