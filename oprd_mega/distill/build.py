"""Assembling the distillation step: the teacher model, this stage's projection, the student's
DDP wrapper, the optimizer and :class:`~oprd_mega.distill.step.DistillStep`.

The trainer, the step tests and ``tools/bench_step.py`` all build the step here, so the tests
exercise the product's own set-up. Weights are loaded by the caller (it knows the files).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.process_groups_config import ProcessGroupCollection

from oprd_mega.distill.layers import teacher_depth
from oprd_mega.distill.options import OptimizerOptions
from oprd_mega.distill.projection import BridgeTensors, ProjectionSpec, attach_projection
from oprd_mega.distill.step import (
    DistillStep,
    StepOptions,
    StepTeacher,
    build_optimizer,
    wrap_student,
)
from oprd_mega.distill.teacher import layer_stages
from oprd_mega.distill.teacher_layout import TeacherPlacement
from oprd_mega.models import HFModelArgs, build_gpt_model, build_truncated_model
from oprd_mega.models.running import unwrap
from oprd_mega.parallel.model_groups import groups_of


def build_teacher(
    args: HFModelArgs,
    pairs: list[tuple[int, int]],
    options: StepOptions,
    *,
    params_dtype: torch.dtype = torch.float32,
    sequence_parallel: bool = False,
    use_te: bool | None = None,
    pg_collection: ProcessGroupCollection | None = None,
) -> torch.nn.Module:
    """This rank's stage of the frozen teacher: the full model when an OPD term needs its
    logits, otherwise truncated at the deepest tapped teacher layer (no final norm, no head).
    ``use_te``: Transformer Engine layers (default: when TE can run); ``pg_collection``: the
    teacher's own process groups (``parallel.teacher``,
    :func:`~oprd_mega.parallel.model_groups.init_model_groups`; default: the student's)."""
    if options.opd_kind is not None:
        teacher = build_gpt_model(
            args,
            params_dtype=params_dtype,
            sequence_parallel=sequence_parallel,
            use_te=use_te,
            trainable=False,
            pg_collection=pg_collection,
        )
    else:
        depth = teacher_depth(pairs, args.num_layers, needs_logits=False)
        teacher = build_truncated_model(
            args,
            depth,
            params_dtype=params_dtype,
            sequence_parallel=sequence_parallel,
            use_te=use_te,
            pg_collection=pg_collection,
        )
    for param in teacher.parameters():
        param.requires_grad_(False)
    return teacher


def stage_layers(model: torch.nn.Module, pairs: list[tuple[int, int]]) -> list[int]:
    """The tapped student layers this pipeline stage owns (collective over the pipeline group)."""
    stages = layer_stages(model)
    stage = groups_of(model).pp.rank()
    return [student_layer for student_layer, _ in pairs if stages[student_layer] == stage]


@dataclass
class TeacherSetup:
    """One teacher as :func:`build_step` takes it: ``name``, the model (weights loaded), its
    ``(student layer, teacher layer)`` pairs, its projection (identity when None; ``bridge``:
    the maps of mode ``bridge``, read by :mod:`oprd_mega.bridge.loaded`), whether it was built
    in process groups of its own (``own_layout``: :func:`build_teacher`'s ``pg_collection``;
    its pass then runs there and routes the targets to the student's ranks) and its loss
    ``weight``."""

    name: str
    model: torch.nn.Module
    pairs: list[tuple[int, int]]
    projection: ProjectionSpec | None = None
    bridge: BridgeTensors | None = None
    own_layout: bool = False
    weight: float = 1.0


def build_step(
    student: torch.nn.Module,
    teachers: list[TeacherSetup],
    options: StepOptions,
    optimizer: OptimizerOptions,
    *,
    overlap_grad_reduce: bool = False,
    overlap_param_gather: bool = False,
) -> DistillStep:
    """The step over an unwrapped student chunk and its teachers.

    With a representation loss, this stage's projection of every teacher is attached to the
    student before Megatron's DDP wraps it (several teachers: each under its name, see
    :func:`~oprd_mega.distill.projection.attach_projection`); the optimizer covers them all.
    The step holds the wrapped ``student`` and the ``optimizer``. ``overlap_grad_reduce`` /
    ``overlap_param_gather``: see :func:`~oprd_mega.distill.step.wrap_student`.
    """
    several = len(teachers) > 1
    if options.uses_oprd:
        for teacher in teachers:
            projection = teacher.projection or ProjectionSpec()
            if projection.mode == "bridge" and teacher.bridge is None:
                raise ValueError(
                    f"teacher {teacher.name!r}: projection.mode 'bridge' needs the loaded bridge"
                )
            attach_projection(
                student,
                projection,
                stage_layers(student, teacher.pairs),
                student.config.hidden_size,
                unwrap(teacher.model).config.hidden_size,
                sequence_parallel=bool(student.config.sequence_parallel),
                bridge=teacher.bridge,
                name=teacher.name if several else None,
            )
    model = wrap_student(
        student,
        optimizer.use_distributed_optimizer,
        overlap_grad_reduce=overlap_grad_reduce,
        overlap_param_gather=overlap_param_gather,
    )
    return DistillStep(
        model,
        [
            StepTeacher(
                name=teacher.name,
                model=teacher.model,
                pairs=list(teacher.pairs),
                weight=teacher.weight,
                bridge=None if teacher.bridge is None else teacher.bridge.teacher,
                placement=TeacherPlacement.gather(student, teacher.model)
                if teacher.own_layout
                else None,
            )
            for teacher in teachers
        ],
        build_optimizer(model, optimizer),
        options,
    )
