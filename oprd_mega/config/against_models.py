"""Checks that need the models' shapes: run once both config.json files are read."""

from __future__ import annotations

import math
from collections.abc import Sequence
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
    """:func:`check_all_models` for a run with one teacher: its layer pairs."""
    return check_all_models(config, student, [teacher])[0]


def check_all_models(
    config: TrainConfig, student: ModelShape, teachers: Sequence[ModelShape]
) -> list[list[tuple[int, int]]]:
    """Every teacher's (student layer, teacher layer) pairs (``teachers`` in the order of
    ``config.teacher_list``), or a ConfigError naming every key that does not fit these models
    (widths, layer numbers, tensor/pipeline sizes, vocabularies)."""
    problems: list[str] = []
    distill = config.distillation
    layout = config.parallel
    entries = config.teacher_list
    if len(entries) != len(teachers):
        raise ValueError(f"check_all_models: {len(teachers)} teacher shapes for {len(entries)}")
    student_keys = {"tp": "parallel.tp", "pp": "parallel.pp", "cp": "parallel.cp"}
    # the microbatch budget: a full packed row, padded for the context/sequence split, fits it
    budget = ("batch.max_tokens_per_microbatch", config.batch.max_tokens_per_microbatch)
    for problem in shape_problems(
        student,
        tp=layout.tp,
        pp=layout.pp,
        num_layers=student.num_layers,
        name="student",
        cp=layout.cp,
        sp=layout.sp,
        seq_length=budget,
    ):
        problems.append(_shape_message("student", problem, student_keys, truncated=False))
    all_pairs = []
    for entry, teacher in zip(entries, teachers, strict=True):
        pairs: list[tuple[int, int]] = []
        who = "the teacher" if entry.index is None else f"teacher {entry.name!r}"
        try:
            pairs = layer_pairs(
                entry.layers,
                student.num_layers,
                teacher.num_layers,
                source_layers(student, teacher),
            )
        except ValueError as exc:
            layers = entry.layers if isinstance(entry.layers, str) else list(entry.layers)
            problems.append(
                f"{entry.key('layers')} = {layers!r}: {exc} (the student has {student.num_layers})"
            )
        all_pairs.append(pairs)
        if (
            distill.uses_oprd
            and entry.projection.mode == "identity"
            and student.hidden_size != teacher.hidden_size
        ):
            problems.append(
                f"{entry.key('projection.mode')} = 'identity': the student's width "
                f"{student.hidden_size} differs from {who}'s {teacher.hidden_size}; use "
                "'full' or 'bridge'"
            )
        if distill.opd_term is not None and student.vocab_size != teacher.vocab_size:
            problems.append(
                f"distillation.method = {distill.method!r}: OPD needs one vocabulary, but the "
                f"student has {student.vocab_size} tokens and {who} {teacher.vocab_size} "
                f"({entry.key('path')})"
            )
        teacher_layout = entry.parallel_layout(layout)
        if distill.opd_term is not None and student.vocab_size == teacher.vocab_size:
            problems += _opd_padding_problems(
                student,
                teacher,
                layout.tp,
                teacher_layout.tp,
                entry.key("make_vocab_size_divisible_by"),
            )
        # A teacher size left unset is the student's: its problems name the key that set it.
        teacher_keys = {
            **student_keys,
            **{
                knob: entry.key(f"parallel.{knob}")
                for knob in ("tp", "pp")
                if getattr(entry.layout, knob) is not None
            },
        }
        needs_logits = distill.opd_term is not None
        deepest = teacher_depth(pairs, teacher.num_layers, needs_logits=needs_logits)
        for problem in shape_problems(  # the same sequences: their padding is checked once
            teacher,
            tp=teacher_layout.tp,
            pp=teacher_layout.pp,
            num_layers=deepest,
            name="teacher",
            cp=teacher_layout.cp,
            sp=teacher_layout.sp,
            seq_length=None,
        ):
            truncated = deepest < teacher.num_layers
            problems.append(
                _shape_message(
                    entry.key("pipeline_split").rsplit(".", 1)[0],
                    problem,
                    teacher_keys,
                    truncated=truncated,
                )
            )
    if 1 <= layout.pp <= student.num_layers and not any("pipeline_split" in p for p in problems):
        stages = layers_per_stage(student.num_layers, layout.pp, student.pipeline_split)
        problems += config.training.recompute.stage_problems(stages)
    if problems:
        raise ConfigError(problems)
    return all_pairs


def _opd_padding_problems(
    student: ModelShape,
    teacher: ModelShape,
    tp: int,
    teacher_tp: int,
    teacher_key: str = "teacher.make_vocab_size_divisible_by",
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
        f"{teacher_key} = {teacher.make_vocab_size_divisible_by}: "
        f"the student holds a vocabulary padded to {ours} rows at tp = {tp}, the teacher "
        f"{theirs} at tp = {teacher_tp}; OPD splits both output layers alike over "
        "tensor-parallel ranks, so both need one padding: set both keys to "
        f"{both} (student.make_vocab_size_divisible_by={both} {teacher_key}={both})"
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
