"""The smallest valid configuration, as plain data, and a loader shortcut."""

from __future__ import annotations

from oprd_mega.config import TrainConfig, load_config

REQUIRED = ["student.path=models/student", "teacher.path=models/teacher", "data.path=p.jsonl"]


def minimal(*overrides: str) -> TrainConfig:
    """The required keys plus ``overrides``."""
    return load_config(None, [*REQUIRED, *overrides])
