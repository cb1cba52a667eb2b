"""docs/config.md is generated from the models and must be current and complete."""

from __future__ import annotations

import pytest

from oprd_mega.config import TrainConfig
from oprd_mega.config.docs import DOC_PATH, main, render
from oprd_mega.config.fields import groups

pytestmark = pytest.mark.filterwarnings("error")


def test_docs_are_current() -> None:
    assert DOC_PATH.read_text(encoding="utf-8") == render(), (
        "docs/config.md is out of date: run python -m oprd_mega.config.docs"
    )


def test_every_key_and_section_is_described() -> None:
    undocumented = [
        key.key for group in groups(TrainConfig) for key in group.keys if not key.description
    ]
    undocumented += [group.key for group in groups(TrainConfig) if not group.description]
    assert undocumented == []


def test_every_key_is_in_the_document() -> None:
    text = render()
    for group in groups(TrainConfig):
        for key in group.keys:
            assert f"| `{key.key}` |" in text


def test_check_mode(tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "config.md"
    assert main(["--check", "--output", str(out)]) == 1
    assert main(["--output", str(out)]) == 0
    assert main(["--check", "--output", str(out)]) == 0
