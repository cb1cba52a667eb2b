"""The repository root shadows no installed package, and the lock covers what setup.py asks for.

transformers imports the PyPI package ``kernels``; a ``kernels/__init__.py`` at the root once
won over it in every process whose ``sys.path`` held the root (pytest, ``python -m``,
``python -c``), and every modeling import failed.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "lock-cpu.txt"

_WHERE_KERNELS_RESOLVES = """
import json, sys
try:
    import kernels
except ImportError:
    print(json.dumps({"absent": True}))
    sys.exit()
print(json.dumps({"absent": False, "file": getattr(kernels, "__file__", None),
                  "path": [str(p) for p in getattr(kernels, "__path__", [])]}))
"""


def _installed(name: str) -> importlib.metadata.Distribution | None:
    try:
        return importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return None


@pytest.mark.parametrize("how", ["-c", "-m"])
def test_import_kernels_from_the_root_is_the_installed_distribution(
    how: str, tmp_path: Path
) -> None:
    env = {"PATH": "/usr/bin:/bin"}
    if how == "-c":
        command = [sys.executable, "-c", _WHERE_KERNELS_RESOLVES]
    else:  # ``python -m`` puts the working directory first on sys.path, as ``torchrun -m`` does
        (tmp_path / "where_kernels.py").write_text(_WHERE_KERNELS_RESOLVES)
        command = [sys.executable, "-m", "where_kernels"]
        env["PYTHONPATH"] = str(tmp_path)
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, check=True)
    found = json.loads(done.stdout)
    distribution = _installed("kernels")
    if distribution is None:
        # Not installed: at most an empty namespace portion of our folder, with no module in it.
        assert found["absent"] or found["file"] is None, found
        return
    assert found["file"] is not None, f"a namespace package won over the installed one: {found}"
    installed_at = Path(distribution.locate_file("kernels")).resolve()
    assert Path(found["file"]).resolve().parent == installed_at, found


def test_the_repository_has_no_top_level_package_named_like_a_dependency() -> None:
    lock_names = set(_lock().keys())
    for child in ROOT.iterdir():
        name = child.name.removesuffix(".py").lower().replace("_", "-")
        is_package = (child / "__init__.py").exists() or child.suffix == ".py"
        if is_package and child.name not in {"setup.py"}:
            assert name not in lock_names, f"{child} shadows the locked dependency {name}"


def _lock() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in LOCK.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;\\]+)", line)
        if match:
            pins[_canonical(match.group(1))] = match.group(2)
    return pins


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _setup_requirements() -> list[str]:
    namespace: dict = {}
    source = (ROOT / "setup.py").read_text()
    head = source.split("\nsetup(")[0]  # the requirement lists, without calling setup()
    exec(compile(head, "setup.py", "exec"), namespace)
    extras = namespace["EXTRAS_REQUIRE"]
    return [*namespace["INSTALL_REQUIRES"], *extras["dev"], *extras["plot"], *extras["math"]]


def test_the_lock_pins_every_requirement_of_setup_py_within_its_range() -> None:
    from packaging.markers import default_environment
    from packaging.requirements import Requirement

    pins = _lock()
    for line in _setup_requirements():
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate(
            default_environment()
        ):
            continue
        name = _canonical(requirement.name)
        assert name in pins, f"{LOCK.name} lacks {name}: run scripts/lock.sh"
        version = pins[name].split("+")[0]
        assert requirement.specifier.contains(version, prereleases=True), (
            f"{LOCK.name} pins {name}=={pins[name]}, outside setup.py's {requirement}: "
            "run scripts/lock.sh"
        )
