"""Checks against the models' shapes (HFModelArgs as read from config.json)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from oprd_mega.config import ConfigError
from oprd_mega.config.against_models import check_models
from oprd_mega.models.hf_config import HFModelArgs
from tests.config.helpers import minimal


def _model(layers: int, hidden: int, heads: int = 8, kv: int = 4, vocab: int = 100) -> HFModelArgs:
    return HFModelArgs(
        family="qwen3",
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=hidden // heads,
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        tie_word_embeddings=False,
        max_position_embeddings=4096,
    )


def test_pairs_follow_the_layer_map() -> None:
    pairs = check_models(minimal("distillation.layers=[1, 3]"), _model(3, 64), _model(5, 64))
    assert pairs == [(1, 1), (3, 5)]


def test_identity_needs_equal_widths() -> None:
    with pytest.raises(ConfigError) as info:
        check_models(minimal(), _model(4, 64), _model(4, 128))
    assert info.value.problems == [
        "distillation.projection.mode = 'identity': the student's width 64 differs from the "
        "teacher's 128; use 'full' or 'bridge'"
    ]
    check_models(minimal("distillation.projection.mode=full"), _model(4, 64), _model(4, 128))


def test_every_misfit_is_named() -> None:
    config = minimal(
        "distillation.method=combined",
        "distillation.layers=[2, 9]",
        "parallel.tp=3",
        "parallel.pp=6",
    )
    with pytest.raises(ConfigError) as info:
        check_models(config, _model(4, 64, vocab=100), _model(4, 64, vocab=120))
    text = "\n".join(info.value.problems)
    assert "distillation.layers = [2, 9]: layers: 9 is outside 1..4" in text
    assert "distillation.method = 'combined': OPD needs one vocabulary" in text
    assert "parallel.tp = 3: must divide the student's num_attention_heads (8)" in text
    assert "parallel.pp = 6: the teacher runs 4 layer" in text


def test_the_teacher_is_truncated_at_the_deepest_tap() -> None:
    config = minimal("distillation.layers=last", "parallel.pp=2")
    check_models(config, _model(2, 64), _model(4, 64))  # last student layer -> teacher 4
    config = minimal("distillation.layers=[1]", "parallel.pp=2")
    with pytest.raises(ConfigError, match="the teacher runs 1 layer"):
        check_models(config, _model(2, 64), _model(4, 64))


def test_tensor_parallel_size_must_divide_ffn_width_never_the_vocabulary() -> None:
    """The config check applies the builder's full rule (it used to check heads only, and a TP
    not dividing intermediate_size failed after the rollout servers had started). The vocabulary
    is padded for the TP, so an odd vocabulary or padding multiple always fits."""
    student = replace(_model(4, 64, heads=8, kv=4, vocab=517), intermediate_size=250)
    with pytest.raises(ConfigError) as info:
        check_models(minimal("parallel.tp=4"), student, _model(4, 64))
    text = "\n".join(info.value.problems)
    assert "parallel.tp = 4: must divide the student's intermediate_size (250)" in text
    assert "vocab" not in text and "teacher" not in text
    fitting = replace(student, intermediate_size=256)
    check_models(minimal("parallel.tp=4"), fitting, fitting)
    padded = replace(fitting, make_vocab_size_divisible_by=6)
    check_models(minimal("parallel.tp=4"), padded, _model(4, 64))


def test_opd_needs_one_vocabulary_padding_at_both_tensor_parallel_sizes() -> None:
    config = minimal("distillation.method=opd-top1")
    student, teacher = _model(4, 64, vocab=517), _model(4, 64, vocab=517)
    check_models(config, student, teacher)
    with pytest.raises(ConfigError) as info:
        check_models(config, student, replace(teacher, make_vocab_size_divisible_by=64))
    (problem,) = info.value.problems
    assert problem.startswith(
        "student.make_vocab_size_divisible_by = 128 and teacher.make_vocab_size_divisible_by = 64"
        ": the student holds a vocabulary padded to 640 rows at tp = 1, the teacher 576"
    )
    assert problem.endswith(
        "set both keys to 128 (student.make_vocab_size_divisible_by=128 "
        "teacher.make_vocab_size_divisible_by=128)"
    )
    # at TP3 the student needs 768 rows (a multiple of 128 x 3), the teacher at TP1 holds 640:
    # the message names one value for both keys that fits both sizes
    odd_heads = _model(4, 96, heads=6, kv=3, vocab=517)
    tp3 = ("distillation.method=opd-top1", "parallel.tp=3", "parallel.teacher.tp=1")
    with pytest.raises(ConfigError) as info:
        check_models(minimal(*tp3), odd_heads, odd_heads)
    (problem,) = info.value.problems
    assert "padded to 768 rows at tp = 3, the teacher 640 at tp = 1" in problem
    assert problem.endswith(
        "set both keys to 384 (student.make_vocab_size_divisible_by=384 "
        "teacher.make_vocab_size_divisible_by=384)"
    )
    both = {"make_vocab_size_divisible_by": 384}
    check_models(minimal(*tp3), replace(odd_heads, **both), replace(odd_heads, **both))
    # 640 rows split over 2 and 4 alike: a teacher at TP1 and a student at TP2 agree
    check_models(
        minimal("distillation.method=opd-top1", "parallel.teacher.tp=1", "parallel.tp=2"),
        student,
        teacher,
    )


def _split(config, student: HFModelArgs, teacher: HFModelArgs) -> list[tuple[int, int]]:
    """check_models on the models as config.model_files.model_args gives them (with the
    sections' pipeline splits)."""
    return check_models(
        config,
        replace(student, pipeline_split=config.student.pipeline_split),
        replace(teacher, pipeline_split=config.teacher.pipeline_split),
    )


def test_hand_set_pipeline_splits_are_checked_per_model_under_their_dotted_keys() -> None:
    """Student and teacher have their own depths, so each has its own split; the teacher's
    counts the layers it runs (cut after its deepest tapped layer)."""
    config = minimal(
        "distillation.layers=last",
        "parallel.pp=4",
        "student.pipeline_split={first: 2, last: 1}",  # 2 | 1 | 1 | 1
        "teacher.pipeline_split={last: 3}",  # 1 | 1 | 1 | 3
    )
    _split(config, _model(5, 64), _model(6, 64))
    with pytest.raises(ConfigError) as info:
        _split(config, _model(6, 64), _model(6, 64))
    assert info.value.problems == [
        "student.pipeline_split = {first: 2, last: 1}: the student runs 6 layer(s): it leaves 3 "
        "of the 6 layer(s) run for the 2 middle stage(s), which need equal numbers and at least "
        "one layer each"
    ]
    # student layers 1, 2 of 5 -> teacher layers 1, 3 of 10: the teacher runs 3 layers
    truncated = minimal(
        "distillation.layers=[1, 2]",
        "parallel.pp=2",
        "teacher.pipeline_split={first: 3}",
    )
    with pytest.raises(ConfigError) as info:
        _split(truncated, _model(5, 64), _model(10, 64))
    (problem,) = info.value.problems
    assert problem.startswith("teacher.pipeline_split = {first: 3}: the teacher runs 3 layer(s)")
    assert problem.endswith("(cut after its deepest tapped layer; the split counts those)")
    _split(
        minimal("distillation.layers=[1, 2]", "parallel.pp=2", "teacher.pipeline_split={first: 1}"),
        _model(5, 64),
        _model(10, 64),
    )


def test_a_hand_set_split_needs_a_pipeline() -> None:
    with pytest.raises(ConfigError) as info:
        _split(minimal("student.pipeline_split={first: 1}"), _model(4, 64), _model(4, 64))
    assert info.value.problems == [
        "student.pipeline_split = {first: 1}: the student runs 4 layer(s): a hand-set split needs "
        "at least 2 pipeline stages, not 1"
    ]


@pytest.mark.parametrize(
    ("overrides", "multiple"),
    [
        (["parallel.cp=2"], 4),
        (["parallel.cp=3"], 6),
        (["parallel.cp=2", "parallel.tp=4", "parallel.sp=true"], 8),
        (["parallel.cp=3", "parallel.tp=2", "parallel.sp=true"], 6),
    ],
)
def test_context_parallel_needs_a_token_budget_of_whole_chunks(
    overrides: list[str], multiple: int
) -> None:
    """2 x cp chunks (each rank's two split over tp under SP): the budget must be a multiple,
    and the error names both keys."""
    model = _model(4, 64)
    fits = minimal(*overrides, f"batch.max_tokens_per_microbatch={multiple * 100}")
    check_models(fits, model, model)
    cp = next(o for o in overrides if o.startswith("parallel.cp=")).split("=")[1]
    budget = multiple * 100 + multiple // 2
    config = minimal(*overrides, f"batch.max_tokens_per_microbatch={budget}")
    with pytest.raises(ConfigError) as info:
        check_models(config, model, model)
    (problem,) = info.value.problems
    assert problem.startswith(
        f"parallel.cp = {cp}: batch.max_tokens_per_microbatch ({budget}) must be a multiple of "
        f"{multiple} (2 x cp = {2 * int(cp)} chunks"
    )
