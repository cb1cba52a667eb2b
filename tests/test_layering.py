"""Imports run down the layers: distill sits below bridge (the bridge package reads its files
and hands distill plain tensors), and tools never import the test suite. Process groups are
passed, not swapped: every model computes in its own ``pg_collection`` and nothing of ours
changes Megatron's ``parallel_state`` globals."""

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


# The code that builds, loads, runs, gathers or checkpoints a model that may not be the student
# (the teacher on its own layout): it takes the model's process groups (Megatron's
# pg_collection), never parallel_state's globals.
RUNS_ANY_MODEL = [
    "oprd_mega/models/builder.py",
    "oprd_mega/models/running.py",
    "oprd_mega/distill/build.py",
    "oprd_mega/distill/teacher.py",
    "oprd_mega/distill/teacher_layout.py",
    "oprd_mega/convert/mcore_io.py",
    "oprd_mega/convert/gather.py",
    "oprd_mega/rollout/megatron_sync.py",
    "oprd_mega/distill/projection.py",
]


def _python_files(*folders: str) -> list[Path]:
    return sorted(path for folder in folders for path in (ROOT / folder).rglob("*.py"))


def _parallel_state_names(tree: ast.AST) -> set[str]:
    """The names a module binds to Megatron's ``parallel_state`` (``ps``, ``parallel_state``)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "megatron.core":
            names |= {a.asname or a.name for a in node.names if a.name == "parallel_state"}
        elif isinstance(node, ast.Import):
            names |= {
                a.asname or a.name
                for a in node.names
                if a.name == "megatron.core.parallel_state" and a.asname
            }
    return names


def test_no_code_swaps_parallel_state_globals() -> None:
    """Each model holds its own process groups and they are passed to what runs it: no code of
    ours assigns ``parallel_state``'s module globals, snapshots them (``vars``) or runs
    Megatron's ``initialize_model_parallel`` outside the student's start-up."""
    wrong = []
    for path in _python_files("oprd_mega", "tools"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names = _parallel_state_names(tree)
        where = path.relative_to(ROOT).as_posix()
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                first = node.args[0] if node.args else None
                if (
                    node.func.id in {"setattr", "vars", "delattr"}
                    and isinstance(first, ast.Name)
                    and first.id in names
                ):
                    wrong.append(f"{where}:{node.lineno}: {node.func.id}({first.id}, ...)")
            targets = (
                node.targets
                if isinstance(node, ast.Assign)
                else [node.target]
                if isinstance(node, ast.AugAssign | ast.AnnAssign)
                else []
            )
            for target in targets:
                if (
                    isinstance(target, ast.Attribute)
                    and isinstance(target.value, ast.Name)
                    and target.value.id in names
                ):
                    wrong.append(f"{where}:{node.lineno}: assigns {target.value.id}.{target.attr}")
            if (
                isinstance(node, ast.Attribute)
                and node.attr == "initialize_model_parallel"
                and where != "oprd_mega/parallel/distributed.py"
            ):
                wrong.append(f"{where}:{node.lineno}: initialize_model_parallel")
    assert wrong == []


@pytest.mark.parametrize("path", RUNS_ANY_MODEL)
def test_code_running_any_model_reads_its_groups_not_the_globals(path: str) -> None:
    """The builder, the forward-only schedule, the teacher pass and its routing, weight
    loading: the groups come from the model or the caller, not from ``parallel_state``."""
    file = Path(path).name
    modules = {module for name, module in _imports((ROOT / path).parent) if name == file}
    tree = ast.parse((ROOT / path).read_text(encoding="utf-8"))
    assert _parallel_state_names(tree) == set()
    assert "megatron.core.parallel_state" not in modules
