"""parallel.teacher: the teacher's own tensor/pipeline sizes, checked before any server starts."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from oprd_mega.config import ConfigError, data_parallel_size, dump_config, load_config
from oprd_mega.config.against_models import check_models
from oprd_mega.parallel import ParallelLayout
from tests.config.helpers import minimal
from tests.config.test_against_models import _model


def test_default_is_the_students_layout() -> None:
    config = minimal("parallel.tp=2", "parallel.pp=2")
    assert config.parallel.teacher_layout() == ParallelLayout(tp=2, pp=2)
    assert not config.parallel.teacher_has_own_layout


def test_overrides_set_the_teacher_sizes_and_round_trip(tmp_path: Path) -> None:
    config = minimal("parallel.tp=2", "parallel.teacher.tp=1", "parallel.teacher.pp=2")
    assert config.parallel.teacher_layout() == ParallelLayout(tp=1, pp=2)
    path = tmp_path / "config.yaml"
    dump_config(config, path)
    assert load_config(path, []) == config


def test_teacher_layout_must_divide_the_world_size() -> None:
    config = minimal("parallel.tp=2", "parallel.teacher.tp=4")
    assert data_parallel_size(config, 4) == 2
    with pytest.raises(ConfigError) as info:
        data_parallel_size(config, 2)
    (problem,) = info.value.problems
    assert problem.startswith("parallel.teacher.tp = 4, parallel.teacher.pp = 1: tp * pp = 4")
    assert "world size 2" in problem


def test_context_parallelism_with_the_teacher_on_its_own_layout() -> None:
    """With cp > 1 the teacher shares the student's CP groups, or runs whole sequences on a
    layout of its own (its data-parallel size then counts the CP ranks)."""
    config = minimal("parallel.cp=2", "batch.max_tokens_per_microbatch=512")
    assert config.parallel.teacher_layout() == ParallelLayout(cp=2)
    own = minimal("parallel.cp=2", "parallel.teacher.tp=2", "batch.max_tokens_per_microbatch=512")
    assert own.parallel.teacher_layout() == ParallelLayout(tp=2)
    assert data_parallel_size(own, 4) == 2
    assert own.parallel.teacher_layout().data_parallel_size(4) == 2


@pytest.mark.parametrize("size", ["0", "-1", "x"])
def test_teacher_size_must_be_a_positive_integer(size: str) -> None:
    with pytest.raises(ConfigError) as info:
        minimal(f"parallel.teacher.tp={size}")
    assert "parallel.teacher" in "\n".join(info.value.problems)


def test_teacher_shapes_are_checked_at_the_teacher_layout_and_name_its_keys() -> None:
    full = "distillation.projection.mode=full"  # the teacher is wider
    student, teacher = _model(4, 64, heads=8, kv=4), _model(6, 96, heads=12, kv=6)
    check_models(minimal(full, "parallel.tp=4", "parallel.teacher.tp=2"), student, teacher)
    with pytest.raises(ConfigError) as info:  # 6 KV heads do not split over 4
        check_models(minimal(full, "parallel.tp=4"), student, teacher)
    assert info.value.problems == [
        "parallel.tp = 4: must divide the teacher's num_key_value_heads (6); the "
        "tensor-parallel sizes the teacher allows: 1, 2, 3, 6"
    ]
    with pytest.raises(ConfigError) as info:
        check_models(minimal(full, "parallel.teacher.tp=4"), student, teacher)
    assert info.value.problems == [
        "parallel.teacher.tp = 4: must divide the teacher's num_key_value_heads (6); the "
        "tensor-parallel sizes the teacher allows: 1, 2, 3, 6"
    ]
    shallow = replace(teacher, num_layers=2)  # student layers 1, 2 -> teacher layer 1
    with pytest.raises(ConfigError) as info:
        check_models(
            minimal(full, "parallel.teacher.pp=3", "distillation.layers=[1,2]"), student, shallow
        )
    (problem,) = info.value.problems
    assert problem.startswith("parallel.teacher.pp = 3: the teacher runs 1 layer(s)")


def test_opd_takes_a_teacher_layout_of_its_own() -> None:
    config = minimal("distillation.method=opd-top1", "parallel.tp=2", "parallel.teacher.tp=1")
    assert config.parallel.teacher_has_own_layout and config.distillation.opd_term is not None
