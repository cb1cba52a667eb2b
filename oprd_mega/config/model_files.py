"""Checks that read the model directories (config.json, tokenizer): run before any process
group or rollout server starts, so a mismatch costs seconds, not a launch."""

from __future__ import annotations

from dataclasses import replace

from oprd_mega.config.against_models import check_all_models
from oprd_mega.config.errors import ConfigError
from oprd_mega.config.models import ModelSection
from oprd_mega.config.schema import TrainConfig, check_paths, data_parallel_size
from oprd_mega.data.routing import check_routes
from oprd_mega.models.hf_config import ConfigError as HFConfigError
from oprd_mega.models.hf_config import HFModelArgs, load_hf_config
from oprd_mega.models.tokenizers import first_difference, has_tokenizer, token_map


def check_tokenizers(config: TrainConfig) -> None:
    """Student and every teacher must share a tokenizer: a teacher reads the student's token
    ids in every projection mode and in OPD (training has no cross-tokenizer alignment). A
    teacher directory without tokenizer files is taken to use the student's."""
    student = config.student.path
    if not has_tokenizer(student):
        return
    problems = []
    student_map = None
    for entry in config.teacher_list:
        teacher = entry.model.path
        if not has_tokenizer(teacher):
            continue
        student_map = token_map(student) if student_map is None else student_map
        teacher_map = token_map(teacher)
        difference = first_difference(student_map, teacher_map)
        if difference is None:
            continue
        index, mine, theirs = difference
        who = "teacher" if entry.index is None else f"teacher {entry.name!r}"
        problems.append(
            f"student.path = {student!r} and {entry.key('path')} = {teacher!r} do not share a "
            f"tokenizer: token id {index} is {mine!r} in the student and {theirs!r} in the "
            f"{who} ({len(student_map)} vs {len(teacher_map)} tokens); the teacher reads the "
            "student's token ids (OPRD identity/full/bridge and OPD), so both need the same "
            "token-to-id map"
        )
    if problems:
        raise ConfigError(problems)


def model_args(section: ModelSection) -> HFModelArgs:
    """The model's ``config.json`` with the section's vocabulary padding and pipeline split:
    what is built."""
    args = load_hf_config(section.path)
    return replace(
        args,
        make_vocab_size_divisible_by=section.make_vocab_size_divisible_by,
        pipeline_split=section.pipeline_split,
    )


def check_model_files(config: TrainConfig) -> list[list[tuple[int, int]]]:
    """Every config.json file against the config (shapes, layers, layout) and the tokenizers;
    returns each teacher's layer pairs (in the order of ``config.teacher_list``)."""
    models = []
    keyed = [("student.path", config.student)]
    keyed += [(entry.key("path"), entry.model) for entry in config.teacher_list]
    for key, section in keyed:
        try:
            models.append(model_args(section))
        except (HFConfigError, FileNotFoundError) as exc:
            raise ConfigError([f"{key} = {section.path!r}: {exc}"]) from exc
    pairs = check_all_models(config, models[0], models[1:])
    check_tokenizers(config)
    return pairs


def check_launch(config: TrainConfig, world_size: int) -> list[list[tuple[int, int]]]:
    """All that ``train`` checks before any process group starts, for ``world_size`` ranks:
    the layout against the world size, the input files, both models' shapes against the
    layout (pipeline splits, recompute chunks, heads), the tokenizers and the prompts' routes
    to teachers; returns each teacher's layer pairs. ``oprd-mega train`` and ``oprd-mega
    config --world-size N`` both run it, so the one refuses exactly what the other does."""
    data_parallel_size(config, world_size)
    check_paths(config)
    check_routes(config)
    return check_model_files(config)
