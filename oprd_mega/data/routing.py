"""Which teachers supervise a prompt: ``data.teacher_field``'s value through ``routing``.

A value is looked up in ``routing.routes``; with no routes it names a teacher itself (a list
of values names several). A row without the field (or with null or "") gets
``routing.default`` (null: every teacher). With one teacher nothing is routed: every sample
goes to it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oprd_mega.data.prompts import Prompt, PromptDataError, read_rows
from oprd_mega.errors import ConfigError

Route = tuple[str, ...]


@dataclass(frozen=True)
class PromptRouter:
    """Routes of one run. ``teachers``: every teacher's name, in order."""

    teachers: Route
    column: str | None = None
    routes: Mapping[str, Route] = field(default_factory=dict)
    default: Route | None = None

    @staticmethod
    def of(config: Any) -> PromptRouter:
        """The router of a ``TrainConfig``."""
        return PromptRouter(
            teachers=tuple(entry.name for entry in config.teacher_list),
            column=config.data.teacher_field,
            routes=dict(config.routing.routes),
            default=config.routing.default,
        )

    @property
    def routed(self) -> bool:
        """Whether samples carry routes (several teachers)."""
        return len(self.teachers) > 1

    def route_of(self, value: Any, where: str) -> Route | None:
        """The teachers of a row whose routing field holds ``value`` (in teacher order; None:
        every teacher, with one teacher only). ``where`` names the row in errors."""
        if not self.routed:
            return None
        if self.column is None or value is None or value == "" or value == []:
            chosen: set[str] = set(self.teachers if self.default is None else self.default)
        else:
            values = value if isinstance(value, list) else [value]
            chosen = set()
            for one in values:
                if not isinstance(one, str):
                    raise PromptDataError(
                        f"{where}: data.teacher_field {self.column!r} = {value!r}: a route is "
                        "a string (or a list of strings)"
                    )
                if one in self.routes:
                    chosen |= set(self.routes[one])
                elif not self.routes and one in self.teachers:
                    chosen.add(one)
                else:
                    known = (
                        f"routing.routes has {sorted(self.routes)}"
                        if self.routes
                        else f"teachers: {', '.join(self.teachers)}"
                    )
                    raise PromptDataError(
                        f"{where}: data.teacher_field {self.column!r} = {one!r} names no "
                        f"route ({known})"
                    )
        return tuple(name for name in self.teachers if name in chosen)

    def route(self, prompt: Prompt, where: str = "prompt") -> Route | None:
        """The teachers of a loaded prompt (its other columns hold the field)."""
        value = None if self.column is None else prompt.extra.get(self.column)
        return self.route_of(value, f"{where} row {prompt.index}")


def check_routes(config: Any) -> None:
    """Every training prompt's route resolves (before any process group or server starts):
    a ConfigError naming data.teacher_field, the file and the first bad rows."""
    router = PromptRouter.of(config)
    if not router.routed or router.column is None:
        return
    path = Path(config.data.path)
    try:
        rows = read_rows(path)
    except PromptDataError:
        return  # the prompt loader reports an unreadable file with its own message
    problems = []
    for index, row in enumerate(rows):
        try:
            router.route_of(row.get(router.column), f"data.path = {str(path)!r} row {index}")
        except PromptDataError as exc:
            problems.append(str(exc))
        if len(problems) == 5:
            problems.append("... (the first 5 bad rows)")
            break
    if problems:
        raise ConfigError(problems)
