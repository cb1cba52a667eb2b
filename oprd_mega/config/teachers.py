"""Several teachers: the ``teachers`` list, per-sample routing, and every teacher resolved.

A run has either the single ``teacher`` section (a list of one, named ``teacher``, whose layers,
projection and layout are ``distillation.layers``, ``distillation.projection`` and
``parallel.teacher``) or a ``teachers`` list whose entries may set each of those for
themselves. :func:`teacher_entries` gives every teacher with its effective settings and the
dotted key each came from, so every check names the key the user wrote.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import Field, field_validator

from oprd_mega.config.base import Section, invalid
from oprd_mega.config.distill import LayerSpec, ProjectionSection
from oprd_mega.config.models import ModelSection, TeacherParallel
from oprd_mega.parallel.layout import ParallelLayout, TeacherLayout

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
SINGLE_TEACHER = "teacher"


class TeacherSection(ModelSection):
    """One teacher of several: a model directory, and what it supervises and how."""

    name: str
    """The teacher's name (letters, digits, '_' and '-'): routes name it, its metrics are
    logged under teacher/NAME/..., its projection is checkpointed under it."""
    layers: LayerSpec | None = None
    """Student layers this teacher supervises (as distillation.layers); null:
    distillation.layers."""
    projection: ProjectionSection | None = None
    """Its projection (as distillation.projection); null: distillation.projection. A bridge
    file is built for one (student, teacher) pair: two teachers cannot share one."""
    parallel: TeacherParallel | None = None
    """Its own tensor/pipeline sizes (as parallel.teacher); null: parallel.teacher."""
    weight: float = Field(1.0, gt=0)
    """Weight of its loss: the objective is the sum over teachers of weight x (its OPRD and OPD
    terms, each a mean over the tokens of the samples routed to it)."""

    @field_validator("name")
    @classmethod
    def _name_is_plain(cls, value: str) -> str:
        if not NAME.fullmatch(value):
            raise ValueError("a teacher name is letters, digits, '_' and '-' only")
        return value


class RoutingSection(Section):
    """Which teachers supervise which prompts (with several teachers)."""

    routes: dict[str, tuple[str, ...]] = Field(default_factory=dict)
    """Values of data.teacher_field -> the teachers their prompts go to, e.g. {math:
    [math_teacher], code: [code_teacher, general]}. Empty: a value names a teacher itself."""
    default: tuple[str, ...] | None = None
    """The teachers of a prompt without a route (no data.teacher_field, or the field missing,
    null or empty in its row): one, several (their weighted losses add) or [] (the prompt is
    sampled but not supervised; counted in routing/unsupervised_samples). Null: every
    teacher."""

    @field_validator("routes", mode="before")
    @classmethod
    def _single_names(cls, value: Any) -> Any:
        if isinstance(value, Mapping):  # math: math_teacher is math: [math_teacher]
            return {k: [v] if isinstance(v, str) else v for k, v in value.items()}
        return value

    @field_validator("default", mode="before")
    @classmethod
    def _single_default(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


@dataclass(frozen=True)
class TeacherEntry:
    """One teacher with its effective settings; ``index`` is its place in ``teachers`` (None:
    the single ``teacher`` section)."""

    index: int | None
    name: str
    model: ModelSection
    layers: str | tuple[int, ...]
    projection: ProjectionSection
    layout: TeacherLayout
    weight: float
    own_layers: bool = False
    own_projection: bool = False
    own_parallel: bool = False

    def key(self, field: str) -> str:
        """The dotted key that set ``field`` ('path', 'layers', 'projection.mode',
        'parallel.tp', ...): the entry's own, or the shared key it inherited."""
        head, _, knob = field.partition(".")
        own_size = self.own_parallel and getattr(self.layout, knob, None) is not None
        inherited = {
            "layers": (self.own_layers, "distillation.layers"),
            "projection": (self.own_projection, "distillation." + field),
            "parallel": (own_size, "parallel.teacher." + knob),
        }
        if head in inherited:
            own, shared = inherited[head]
            if self.index is None or not own:
                return shared
        if self.index is None:
            return f"{SINGLE_TEACHER}.{field}"
        return f"teachers[{self.index}].{field}"

    def parallel_layout(self, student: ParallelLayout) -> ParallelLayout:
        """The teacher's layout (its own tp/pp where set, the student's otherwise)."""
        return ParallelLayout(
            tp=student.tp, pp=student.pp, sp=student.sp, cp=student.cp, teacher=self.layout
        ).teacher_layout()

    def has_own_layout(self, student: ParallelLayout) -> bool:
        layout = self.parallel_layout(student)
        return (layout.tp, layout.pp) != (student.tp, student.pp)


def teacher_entries(config: Any) -> list[TeacherEntry]:
    """Every teacher of ``config`` (a ``TrainConfig``) with its effective settings."""
    distill, parallel = config.distillation, config.parallel
    if config.teacher is not None:
        return [
            TeacherEntry(
                None,
                SINGLE_TEACHER,
                config.teacher,
                distill.layers,
                distill.projection,
                parallel.teacher,
                1.0,
            )
        ]
    entries = []
    for index, section in enumerate(config.teachers):
        model = ModelSection(**section.model_dump(include=set(ModelSection.model_fields)))
        entries.append(
            TeacherEntry(
                index,
                section.name,
                model,
                distill.layers if section.layers is None else section.layers,
                distill.projection if section.projection is None else section.projection,
                parallel.teacher if section.parallel is None else section.parallel,
                section.weight,
                own_layers=section.layers is not None,
                own_projection=section.projection is not None,
                own_parallel=section.parallel is not None,
            )
        )
    return entries


def check_teacher_list(
    teacher: ModelSection | None,
    teachers: Sequence[TeacherSection],
    routing: RoutingSection,
    teacher_field: str | None,
    shared_bridge: str | None,
) -> None:
    """The cross-field rules of the teachers and their routes (a pydantic custom error naming
    the dotted key, relative to the whole config)."""
    if teacher is not None and teachers:
        raise invalid(
            "teachers", "[...]", "give the teacher section or the teachers list, not both"
        )
    if teacher is None and not teachers:
        raise invalid("teacher", None, "a run needs a teacher section or a teachers list")
    names = [SINGLE_TEACHER] if teacher is not None else [t.name for t in teachers]
    for index, name in enumerate(names):
        if name in names[:index]:
            raise invalid(
                f"teachers[{index}].name",
                name,
                f"duplicate teacher name (teachers[{names.index(name)}] has it)",
            )
    claimed: dict[str, str] = {}
    for index, entry in enumerate(teachers):
        projection = entry.projection
        path = shared_bridge if projection is None else projection.bridge_path
        mode_is_bridge = path is not None
        if not mode_is_bridge:
            continue
        key = (
            "distillation.projection.bridge_path"
            if projection is None
            else f"teachers[{index}].projection.bridge_path"
        )
        if path in claimed:
            raise invalid(
                f"teachers[{index}].projection.bridge_path",
                path,
                f"also the bridge of {claimed[path]}: a bridge file is built for one (student, "
                "teacher) pair; build one per teacher (oprd-mega bridge build)",
            )
        claimed[path] = f"teachers[{index}] (through {key})"
    for value, targets in routing.routes.items():
        if not targets:
            raise invalid(f"routing.routes.{value}", [], "name at least one teacher")
        for position, target in enumerate(targets):
            if target not in names:
                raise invalid(
                    f"routing.routes.{value}[{position}]",
                    target,
                    f"names no teacher (teachers: {', '.join(names)})",
                )
    for position, target in enumerate(routing.default or ()):
        if target not in names:
            raise invalid(
                f"routing.default[{position}]",
                target,
                f"names no teacher (teachers: {', '.join(names)})",
            )
    if routing.routes and teacher_field is None:
        raise invalid(
            "routing.routes",
            sorted(routing.routes),
            "routes map values of data.teacher_field: set data.teacher_field",
        )
