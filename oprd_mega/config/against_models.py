"""Checks that need the models' shapes: run once both config.json files are read."""

from __future__ import annotations

import math
from typing import Protocol

from oprd_mega.config.errors import ConfigError
from oprd_mega.config.schema import TrainConfig
from oprd_mega.distill.layers import layer_pairs, source_layers, teacher_depth
from oprd_mega.models.shapes import (
    PipelineSplit,
    ShapeProblem,
    layers_per_stage,
    padded_vocab,
    shape_problems,
)


class ModelShape(Protocol):
    """What the checks read of a model (``oprd_mega.models.HFModelArgs`` has it)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    make_vocab_size_divisible_by: int
    pipeline_split: PipelineSplit | None


def check_models(
    config: TrainConfig, student: ModelShape, teacher: ModelShape
) -> list[tuple[int, int]]:
    """The (student layer, teacher layer) pairs, or a ConfigError naming every key that does
    not fit these models (widths, layer numbers, tensor/pipeline sizes, vocabularies)."""
    problems: list[str] = []
    distill = config.distillation
    pairs: list[tuple[int, int]] = []
    try:
        pairs = layer_pairs(
            distill.layers, student.num_layers, teacher.num_layers, source_layers(student, teacher)
        )
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
    layout = config.parallel
    if distill.opd_term is not None and student.vocab_size == teacher.vocab_size:
        problems += _opd_padding_problems(student, teacher, layout.tp, layout.teacher_layout().tp)
    student_keys = {"tp": "parallel.tp", "pp": "parallel.pp", "cp": "parallel.cp"}
    # A teacher size left unset is the student's: its problems name the key that set it.
    teacher_keys = {
        **student_keys,
        **{
            knob: f"parallel.teacher.{knob}"
            for knob in ("tp", "pp")
            if getattr(layout.teacher, knob) is not None
        },
    }
    deepest = teacher_depth(pairs, teacher.num_layers, needs_logits=distill.opd_term is not None)
    # the microbatch budget: a full packed row, padded for the context/sequence split, fits it
    budget = ("batch.max_tokens_per_microbatch", config.batch.max_tokens_per_microbatch)
    for name, model, depth, sizes, keys, seq_length in (
        ("student", student, student.num_layers, layout, student_keys, budget),
        # the same sequences: their padding is checked once
        ("teacher", teacher, deepest, layout.teacher_layout(), teacher_keys, None),
    ):
        for problem in shape_problems(
            model,
            tp=sizes.tp,
            pp=sizes.pp,
            num_layers=depth,
            name=name,
            cp=sizes.cp,
            sp=sizes.sp,
            seq_length=seq_length,
        ):
            truncated = depth < model.num_layers
            problems.append(_shape_message(name, problem, keys, truncated=truncated))
    if 1 <= layout.pp <= student.num_layers and not any("pipeline_split" in p for p in problems):
        stages = layers_per_stage(student.num_layers, layout.pp, student.pipeline_split)
        problems += config.training.recompute.stage_problems(stages)
    if problems:
        raise ConfigError(problems)
    return pairs


def _opd_padding_problems(
    student: ModelShape, teacher: ModelShape, tp: int, teacher_tp: int
) -> list[str]:
    """OPD splits both output layers alike over tensor-parallel ranks, so the student and the
    teacher must hold one padded vocabulary at their TPs; the fix names one value for both."""
    if tp < 1 or teacher_tp < 1:
        return []  # named by the shape checks
    ours = padded_vocab(student.vocab_size, student.make_vocab_size_divisible_by, tp)
    theirs = padded_vocab(teacher.vocab_size, teacher.make_vocab_size_divisible_by, teacher_tp)
    if ours == theirs:
        return []
    both = math.lcm(
        student.make_vocab_size_divisible_by, teacher.make_vocab_size_divisible_by, tp, teacher_tp
    )
    return [
        f"student.make_vocab_size_divisible_by = {student.make_vocab_size_divisible_by} and "
        f"teacher.make_vocab_size_divisible_by = {teacher.make_vocab_size_divisible_by}: "
        f"the student holds a vocabulary padded to {ours} rows at tp = {tp}, the teacher "
        f"{theirs} at tp = {teacher_tp}; OPD splits both output layers alike over "
        "tensor-parallel ranks, so both need one padding: set both keys to "
        f"{both} (student.make_vocab_size_divisible_by={both} "
        f"teacher.make_vocab_size_divisible_by={both})"
    ]


def _shape_message(
    name: str, problem: ShapeProblem, keys: dict[str, str], *, truncated: bool
) -> str:
    """A shape problem under its dotted key (``parallel.tp``, ``parallel.teacher.pp``,
    ``teacher.pipeline_split``); ``keys``: the key that set each parallel size of this model."""
    if problem.knob != "pipeline_split":
        return f"{keys[problem.knob]} = {problem.value}: {problem.detail}"
    why = " (cut after its deepest tapped layer; the split counts those)" if truncated else ""
    return f"{name}.pipeline_split = {problem.value}: {problem.detail}{why}"
