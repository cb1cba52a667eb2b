"""The whole training configuration: one frozen, validated object."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from oprd_mega.config.base import Section, invalid
from oprd_mega.config.data import BatchSection, PromptsSection
from oprd_mega.config.distill import DistillationSection
from oprd_mega.config.errors import ConfigError
from oprd_mega.config.models import ModelSection, Parallel
from oprd_mega.config.rollout import RolloutSection
from oprd_mega.config.teachers import (
    RoutingSection,
    TeacherEntry,
    TeacherSection,
    check_teacher_list,
    teacher_entries,
)
from oprd_mega.config.training import (
    CheckpointSection,
    EvaluationSection,
    MetricsSection,
    OptimizerSection,
    ScheduleSection,
    TrainingSection,
)
from oprd_mega.parallel.layout import ParallelLayout
from oprd_mega.rollout.sampling import SamplingConfig


class TrainConfig(Section):
    """An OPRD training run (``oprd-mega train --config FILE.yaml key.sub=value ...``)."""

    seed: int = Field(1234, ge=0)
    """Seed of data order, rollouts' sampling seeds, model init and dropout."""
    student: ModelSection
    """The model being trained; rollout servers serve its current weights."""
    teacher: ModelSection | None
    """The frozen teacher (run up to its deepest tapped layer, no LM head in OPRD-only mode);
    required unless a teachers list is given."""
    teachers: tuple[TeacherSection, ...] = ()
    """Several frozen teachers, each with a name, a model directory and optionally its own
    layers, projection, parallel layout and loss weight (docs/multi-teacher.md); prompts are
    routed to them by data.teacher_field and routing. Empty: the teacher section."""
    routing: RoutingSection = RoutingSection()
    """Which teachers supervise which prompts (with a teachers list)."""
    parallel: Parallel = ParallelLayout()
    """Tensor/pipeline/context/sequence parallelism of both models; data parallelism fills the
    rest."""
    rollout: RolloutSection
    """Rollout servers, sampling and weight sync."""
    data: PromptsSection
    """The training prompts."""
    batch: BatchSection = BatchSection()
    """Batch size and token budgets."""
    distillation: DistillationSection = DistillationSection()
    """The objective."""
    optimizer: OptimizerSection = OptimizerSection()
    """AdamW settings."""
    schedule: ScheduleSection = ScheduleSection()
    """Steps, warm-up and decay."""
    training: TrainingSection = TrainingSection()
    """Activation recompute and gradient/parameter communication overlap."""
    checkpoint: CheckpointSection = CheckpointSection()
    """Checkpoints and resume."""
    metrics: MetricsSection = MetricsSection()
    """Metrics sinks."""
    evaluation: EvaluationSection = EvaluationSection()
    """Held-out evaluation."""

    @property
    def evaluation_sampling(self) -> SamplingConfig:
        """Evaluation's sampling: evaluation.sampling, else rollout.sampling with n = k."""
        if self.evaluation.sampling is not None:
            return self.evaluation.sampling
        return dataclasses.replace(self.rollout.sampling, n=self.evaluation.k)

    @model_validator(mode="before")
    @classmethod
    def _teachers_replace_teacher(cls, data: Any) -> Any:
        """A teachers list stands in for the (otherwise required) teacher section."""
        if isinstance(data, dict) and data.get("teachers") and "teacher" not in data:
            data = {**data, "teacher": None}
        return data

    @property
    def teacher_list(self) -> list[TeacherEntry]:
        """Every teacher with its effective layers, projection, layout and weight."""
        return teacher_entries(self)

    @model_validator(mode="after")
    def _teachers_and_routes(self) -> TrainConfig:
        check_teacher_list(
            self.teacher,
            self.teachers,
            self.routing,
            self.data.teacher_field,
            self.distillation.projection.bridge_path,
        )
        return self

    @model_validator(mode="after")
    def _training_fits_optimizer(self) -> TrainConfig:
        training = self.training
        if training.overlap_param_gather and not self.optimizer.use_distributed_optimizer:
            raise invalid(
                "training.overlap_param_gather",
                True,
                "needs optimizer.use_distributed_optimizer = true (only the distributed "
                "optimizer gathers parameters)",
            )
        shared_maps = [
            entry
            for entry in self.teacher_list
            if entry.projection.mode == "full" and not entry.projection.per_layer
        ]
        if (
            training.overlap_grad_reduce
            and (self.parallel.pp > 1 or training.recompute.granularity == "full")
            and self.distillation.uses_oprd
            and shared_maps
        ):
            raise invalid(
                "training.overlap_grad_reduce",
                True,
                "not supported with a shared projection (distillation.projection.per_layer = "
                "false) under parallel.pp > 1 (its gradient is summed over pipeline stages "
                "before the data-parallel reduction) nor with training.recompute.granularity = "
                "'full' (its gradient arrives once per checkpointed chunk)",
            )
        return self

    @model_validator(mode="before")
    @classmethod
    def _launch_serves_student(cls, data: Any) -> Any:
        """rollout.launch.model_path defaults to student.path (rollout.launch itself to {} in
        mode 'launch')."""
        if not isinstance(data, dict):
            return data
        rollout = data.get("rollout", {})
        if not isinstance(rollout, dict):
            return data
        student = data.get("student")
        path = student.get("path") if isinstance(student, dict) else None
        launch = rollout.get("launch", None if rollout.get("mode") == "attach" else {})
        if isinstance(launch, dict) and "model_path" not in launch and path is not None:
            launch = {**launch, "model_path": path}
        if launch is not None:
            rollout = {**rollout, "launch": launch}
        return {**data, "rollout": rollout}


def data_parallel_size(config: TrainConfig, world_size: int) -> int:
    """The data-parallel size under ``world_size`` processes; a ConfigError if it cannot work.

    tp * pp * cp must divide the world size (the teacher's tp * pp too), and a step's samples
    must fill every rank's microbatches (prompts_per_step * n >= dp * microbatch_multiple).
    """
    layout = config.parallel
    model_parallel = layout.tp * layout.pp * layout.cp
    if world_size < 1 or world_size % model_parallel:
        raise ConfigError(
            [
                f"parallel.tp = {layout.tp}, parallel.pp = {layout.pp}, parallel.cp = "
                f"{layout.cp}: tp * pp * cp = {model_parallel} must divide the world size "
                f"{world_size}"
            ]
        )
    for entry in config.teacher_list:
        teacher = entry.parallel_layout(layout)
        if world_size % (teacher.tp * teacher.pp):
            raise ConfigError(
                [
                    f"{entry.key('parallel.tp')} = {teacher.tp}, {entry.key('parallel.pp')} = "
                    f"{teacher.pp}: tp * pp = {teacher.tp * teacher.pp} must divide the world "
                    f"size {world_size} (the teacher's data-parallel size fills the rest)"
                ]
            )
    dp = layout.data_parallel_size(world_size)
    samples = config.batch.prompts_per_step * config.rollout.sampling.n
    needed = dp * config.batch.microbatch_multiple
    if samples < needed:
        raise ConfigError(
            [
                f"batch.prompts_per_step = {config.batch.prompts_per_step}: with "
                f"rollout.sampling.n = {config.rollout.sampling.n} a step has {samples} samples, "
                f"fewer than dp ({dp}) x batch.microbatch_multiple "
                f"({config.batch.microbatch_multiple}) = {needed}; use at least "
                f"{-(-needed // config.rollout.sampling.n)} prompts per step"
            ]
        )
    return dp


def check_paths(config: TrainConfig) -> None:
    """Raise a ConfigError naming every configured input file or directory that is missing."""
    inputs: dict[str, str | None] = {"student.path": config.student.path}
    for entry in config.teacher_list:
        inputs[entry.key("path")] = entry.model.path
    inputs |= {
        "data.path": config.data.path,
        "distillation.projection.bridge_path": config.distillation.projection.bridge_path,
    }
    for entry in config.teacher_list:
        inputs[entry.key("projection.bridge_path")] = entry.projection.bridge_path
    inputs["evaluation.prompts"] = config.evaluation.prompts
    for name, one in config.evaluation.sets.items():
        inputs[f"evaluation.sets.{name}.prompts"] = one.prompts
    if config.rollout.mode == "launch" and config.rollout.launch is not None:
        inputs["rollout.launch.model_path"] = config.rollout.launch.model_path
    missing = [
        f"{key} = {value!r}: no such file or directory"
        for key, value in inputs.items()
        if value is not None and not Path(value).exists()
    ]
    if missing:
        raise ConfigError(missing)
