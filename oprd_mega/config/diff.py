"""Which keys differ between two configurations (e.g. a checkpoint's and the resumed run's)."""

from __future__ import annotations

from typing import Any

from oprd_mega.config.schema import TrainConfig


def _compare(old: Any, new: Any, key: str, changes: list[tuple[str, Any, Any]]) -> None:
    if isinstance(old, dict) and isinstance(new, dict):
        for name in [*old, *(n for n in new if n not in old)]:
            _compare(old.get(name), new.get(name), f"{key}.{name}" if key else name, changes)
    elif old != new:
        changes.append((key, old, new))


def config_diff(old: TrainConfig, new: TrainConfig) -> list[tuple[str, Any, Any]]:
    """``(dotted key, old value, new value)`` for every differing leaf, in schema order.

    Values are as in the YAML dump; a section null on one side is one entry with its mapping.
    """
    changes: list[tuple[str, Any, Any]] = []
    _compare(old.model_dump(mode="json"), new.model_dump(mode="json"), "", changes)
    return changes
