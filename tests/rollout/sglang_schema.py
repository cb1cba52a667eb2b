"""SGLang's own HTTP schema module, loaded from the pinned wheel without importing sglang.

``pip download --no-deps sglang==VERSION`` once into a cache folder (the wheel is kept there),
extract only the members a test reads: ``sglang/api/v1/api_types.py`` (it needs msgspec and
nothing else) is loaded with importlib; ``sglang_source.py`` takes single functions out of others.
The cache folder is ``$OPRD_SGLANG_SCHEMA_CACHE`` or ``~/.cache/oprd-mega/sglang-schema``.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from types import ModuleType

SGLANG_VERSION = "0.5.23"
SCHEMA_MEMBER = "sglang/api/v1/api_types.py"


def cache_dir() -> Path:
    default = Path.home() / ".cache" / "oprd-mega" / "sglang-schema"
    return Path(os.environ.get("OPRD_SGLANG_SCHEMA_CACHE", default)) / SGLANG_VERSION


def fetch_wheel() -> Path:
    """The cached SGLang wheel, downloaded once (``pip download --no-deps``)."""
    folder = cache_dir()
    wheels = sorted(folder.glob(f"sglang-{SGLANG_VERSION}-*.whl"))
    if wheels:
        return wheels[0]
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
             "--disable-pip-version-check", f"sglang=={SGLANG_VERSION}", "-d", tmp],
            check=True,
            capture_output=True,
            text=True,
            timeout=600,
        )  # fmt: skip
        downloaded = list(Path(tmp).glob("sglang-*.whl"))
        if not downloaded:
            raise FileNotFoundError(f"pip download left no sglang wheel in {tmp}")
        target = folder / downloaded[0].name
        downloaded[0].replace(target)
    return target


def fetch_member(member: str) -> Path:
    """One file of the wheel (e.g. ``sglang/srt/utils/common.py``), extracted once."""
    target = cache_dir() / "members" / member
    if target.is_file():
        return target
    with zipfile.ZipFile(fetch_wheel()) as wheel:
        data = wheel.read(member)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".tmp")
    partial.write_bytes(data)
    partial.replace(target)
    return target


def fetch_schema_file() -> Path:
    """The cached ``api_types.py``."""
    return fetch_member(SCHEMA_MEMBER)


def load_schema() -> ModuleType:
    """Import ``api_types.py`` as a standalone module."""
    path = fetch_schema_file()
    spec = importlib.util.spec_from_file_location("sglang_api_types_pinned", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # msgspec resolves the Structs' annotations through it
    spec.loader.exec_module(module)
    return module
