"""The example configurations load, survive a dump, and fit their intended world sizes."""

from __future__ import annotations

from pathlib import Path

import pytest

from oprd_mega.config import data_parallel_size, dump_config, load_config

pytestmark = pytest.mark.filterwarnings("error")

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
WORLD_SIZES = {
    "tiny_cpu.yaml": 2,
    "tiny_cpu_narrow_full.yaml": 2,
    "smollm2_recovery_cpu.yaml": 2,
    "tiny_cpu_two_teachers.yaml": 2,
    "qwen3_1.7b_from_8b_2x8.yaml": 16,
}


def test_the_examples_are_all_covered() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.yaml")) == sorted(WORLD_SIZES)


@pytest.mark.parametrize("name", sorted(WORLD_SIZES))
def test_example_loads_round_trips_and_fits(name: str, tmp_path: Path) -> None:
    config = load_config(EXAMPLES / name)
    assert load_config(dump_config(config, tmp_path / "c.yaml")) == config
    assert data_parallel_size(config, WORLD_SIZES[name]) >= 1


def test_tiny_example_is_a_cpu_run() -> None:
    config = load_config(EXAMPLES / "tiny_cpu.yaml")
    assert config.student.dtype == config.teacher.dtype == "float32"
    assert config.rollout.launch is not None and config.rollout.launch.backend == "embedded"
    assert config.parallel.tp * config.parallel.pp == 2


def test_recovery_example_is_a_tp1_cpu_run_on_chat_prompts() -> None:
    config = load_config(EXAMPLES / "smollm2_recovery_cpu.yaml")
    assert config.student.dtype == config.teacher.dtype == "float32"
    assert config.rollout.launch is not None and config.rollout.launch.backend == "embedded"
    assert config.parallel.tp == 1  # SmolLM2's 9 heads and 3 KV heads allow TP 1 and 3
    assert data_parallel_size(config, 2) == 2
    assert config.data.chat_template
    assert config.distillation.layers == "all"


def test_two_teacher_example_routes_by_task() -> None:
    config = load_config(EXAMPLES / "tiny_cpu_two_teachers.yaml")
    assert [entry.name for entry in config.teacher_list] == ["add", "fwd"]
    assert config.data.teacher_field == "task"
    assert sorted(config.evaluation.sets) == ["add", "fwd"]


def test_qwen_example_projects_and_attaches() -> None:
    config = load_config(EXAMPLES / "qwen3_1.7b_from_8b_2x8.yaml")
    assert config.distillation.projection.mode == "full"
    assert config.rollout.mode == "attach" and config.rollout.launch is None
    assert data_parallel_size(config, 16) == 8


def test_examples_take_overrides() -> None:
    config = load_config(
        EXAMPLES / "tiny_cpu.yaml", ["distillation.method=opd-top1", "schedule.steps=50"]
    )
    assert config.distillation.method == "opd-top1"
    assert config.schedule.steps == 50
