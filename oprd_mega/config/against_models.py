"""Checks that need the models' shapes: run once both config.json files are read."""

from __future__ import annotations

from typing import Protocol

from oprd_mega.config.errors import ConfigError
from oprd_mega.config.schema import TrainConfig
from oprd_mega.distill.layers import layer_pairs, teacher_depth
from oprd_mega.models.shapes import layers_per_stage, shape_problems


class ModelShape(Protocol):
    """What the checks read of a model (``oprd_mega.models.HFModelArgs`` has it)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    make_vocab_size_divisible_by: int


def check_models(
    config: TrainConfig, student: ModelShape, teacher: ModelShape
) -> list[tuple[int, int]]:
    """The (student layer, teacher layer) pairs, or a ConfigError naming every key that does
    not fit these models (widths, layer numbers, tensor/pipeline sizes, vocabularies)."""
    problems: list[str] = []
    distill = config.distillation
    pairs: list[tuple[int, int]] = []
    try:
        pairs = layer_pairs(distill.layers, student.num_layers, teacher.num_layers)
    except ValueError as exc:
        layers = distill.layers if isinstance(distill.layers, str) else list(distill.layers)
        problems.append(
            f"distillation.layers = {layers!r}: {exc} (the student has {student.num_layers})"
        )
    if (
        distill.uses_oprd
        and distill.projection.mode == "identity"
        and student.hidden_size != teacher.hidden_size
    ):
        problems.append(
            f"distillation.projection.mode = 'identity': the student's width "
            f"{student.hidden_size} differs from the teacher's {teacher.hidden_size}; use "
            "'full' or 'bridge'"
        )
    if distill.opd_term is not None and student.vocab_size != teacher.vocab_size:
        problems.append(
            f"distillation.method = {distill.method!r}: OPD needs one vocabulary, but the "
            f"student has {student.vocab_size} tokens and the teacher {teacher.vocab_size}"
        )
    elif (
        distill.opd_term is not None
        and student.make_vocab_size_divisible_by != teacher.make_vocab_size_divisible_by
    ):
        problems.append(
            f"student.make_vocab_size_divisible_by = {student.make_vocab_size_divisible_by} and "
            f"teacher.make_vocab_size_divisible_by = {teacher.make_vocab_size_divisible_by}: "
            "OPD splits both output layers alike over tensor-parallel ranks, so both vocabularies "
            "need the same padding"
        )
    tp, pp = config.parallel.tp, config.parallel.pp
    deepest = teacher_depth(pairs, teacher.num_layers, needs_logits=distill.opd_term is not None)
    for name, model, depth in (
        ("student", student, student.num_layers),
        ("teacher", teacher, deepest),
    ):
        for problem in shape_problems(model, tp=tp, pp=pp, num_layers=depth, name=name):
            problems.append(f"parallel.{problem.knob} = {problem.value}: {problem.detail}")
    if 1 <= pp <= student.num_layers:
        problems += config.training.recompute.stage_problems(
            layers_per_stage(student.num_layers, pp)
        )
    if problems:
        raise ConfigError(problems)
    return pairs
