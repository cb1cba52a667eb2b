"""distill sits below bridge: the bridge package reads its files and hands distill plain tensors."""

from __future__ import annotations

import ast
from pathlib import Path

import oprd_mega.distill


def test_distill_never_imports_bridge() -> None:
    package = Path(oprd_mega.distill.__file__).parent
    found = []
    for path in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            found += [f"{path.name}: {n}" for n in names if n.startswith("oprd_mega.bridge")]
    assert found == []
