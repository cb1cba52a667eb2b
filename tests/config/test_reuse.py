"""The config reuses the project's option types, and its own sections match the functions
they feed (names and defaults), so the two cannot drift apart."""

from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path
from typing import get_args

import pytest
import torch

from oprd_kernels.api import projected_mse
from oprd_mega.config import ConfigError, check_paths, data_parallel_size, to_yaml
from oprd_mega.config.data import BatchSection, PromptsSection
from oprd_mega.config.distill import DistillationSection, ProjectionSection
from oprd_mega.config.models import DType
from oprd_mega.config.rollout import AttachSection, DiskSyncSection, DistributedSyncSection
from oprd_mega.config.training import OptimizerSection
from oprd_mega.data.prompts import load_prompts
from oprd_mega.data.scheduler import schedule_microbatches
from oprd_mega.distill.options import OptimizerOptions, ProjectionSpec, StepOptions
from oprd_mega.distill.positions import PositionSpec
from oprd_mega.distill.taps import KernelOptions
from oprd_mega.parallel.layout import ParallelLayout
from oprd_mega.rollout.client import ClientConfig
from oprd_mega.rollout.sampling import SamplingConfig
from oprd_mega.rollout.servers import LaunchConfig, ServerGroup
from oprd_mega.rollout.weight_sync import DiskWeightSync, DistributedWeightSync, ProbeConfig
from tests.config.helpers import minimal

pytestmark = pytest.mark.filterwarnings("error")


def test_fields_hold_the_existing_dataclasses() -> None:
    config = minimal("evaluation.sampling.top_p=0.9")
    assert isinstance(config.parallel, ParallelLayout)
    assert isinstance(config.rollout.launch, LaunchConfig)
    assert isinstance(config.rollout.client, ClientConfig)
    assert isinstance(config.rollout.sampling, SamplingConfig)
    assert isinstance(config.rollout.weight_sync.probe, ProbeConfig)
    assert isinstance(config.distillation.positions, PositionSpec)
    assert isinstance(config.evaluation.sampling, SamplingConfig)
    assert isinstance(config.distillation.kernel, KernelOptions)


def test_sampling_goes_through_sglangs_checks() -> None:
    config = minimal("rollout.sampling.top_k=1073741824", "rollout.sampling.stop=[END]")
    assert config.rollout.sampling.top_k == -1  # SGLang's TOP_K_ALL is its "all", -1
    assert config.rollout.sampling.stop == ("END",)
    with pytest.raises(ConfigError, match=r"rollout\.sampling\.top_k = 0: .*-1 \(disable\) or at"):
        minimal("rollout.sampling.top_k=0")  # SGLang refuses 0 (unless greedy)


def test_kernel_options_share_the_normalize_switch() -> None:
    config = minimal("distillation.normalize=true", "distillation.kernel.recompute=true")
    assert config.distillation.kernel == KernelOptions(normalize=True, recompute=True)
    assert "normalize" not in to_yaml(config).split("kernel:")[1].split("opd")[0]


def test_projection_section_is_projection_spec_without_normalize() -> None:
    spec = {f.name: f.default for f in dataclasses.fields(ProjectionSpec)}
    assert spec.pop("normalize") is False  # distillation.normalize
    assert {n: f.default for n, f in ProjectionSection.model_fields.items()} == spec


def test_distillation_section_carries_every_step_option() -> None:
    section = DistillationSection.model_fields
    for field in dataclasses.fields(StepOptions):
        if field.name == "kernel":
            assert section["kernel"].default == field.default_factory()  # type: ignore[misc]
        elif field.name == "target_dtype":
            assert field.default == getattr(torch, section["target_dtype"].default)
        else:
            assert section[field.name].default == field.default, field.name


def _parameters(function: object) -> dict[str, object]:
    return {
        name: p.default
        for name, p in inspect.signature(function).parameters.items()  # type: ignore[arg-type]
    }


@pytest.mark.parametrize(
    "section, function, renamed, own",
    [
        (PromptsSection, load_prompts, {}, {"format", "shuffle", "teacher_field"}),
        (BatchSection, schedule_microbatches, {}, {"prompts_per_step", "pack_sequences"}),
        (AttachSection, ServerGroup.attach, {}, {"tp_size"}),  # tp_size: the weight sync's
        (DiskSyncSection, DiskWeightSync.__init__, {}, set()),
        (DistributedSyncSection, DistributedWeightSync.__init__, {}, set()),
    ],
)
def test_sections_match_the_functions_they_feed(
    section: type, function: object, renamed: dict[str, str], own: set[str]
) -> None:
    parameters = _parameters(function)
    for name, field in section.model_fields.items():  # type: ignore[attr-defined]
        if name in own:
            continue
        assert name in parameters, f"{section.__name__}.{name} is not a parameter of {function}"
        default = parameters[name]
        if default is not inspect.Parameter.empty and name not in ("path", "urls"):
            assert field.default == default or name in ("max_prompt_length",), name


def test_prompts_section_passes_every_load_prompts_keyword() -> None:
    data = minimal("data.max_prompt_length=64", "data.system_prompt=hi").data
    keywords = set(_parameters(load_prompts)) - {"path", "tokenizer"}
    assert set(data.load_options()) == keywords
    assert data.load_options()["max_prompt_length"] == 64
    assert data.rendering_options() == {
        "prompt_key": "prompt",
        "chat_template": True,
        "system_prompt": "hi",
    }


def test_optimizer_section_builds_the_optimizer_options() -> None:
    section = minimal("optimizer.lr=0.002", "optimizer.betas=[0.8,0.9]").optimizer
    options = section.options()
    assert isinstance(options, OptimizerOptions)
    assert set(OptimizerSection.model_fields) - {"name", "min_lr"} == {
        f.name for f in dataclasses.fields(OptimizerOptions)
    }
    assert options == OptimizerOptions(
        lr=0.002, weight_decay=0.01, betas=(0.8, 0.9), eps=1e-8, clip_grad=1.0
    )


def test_kernel_options_are_projected_mse_keywords() -> None:
    parameters = _parameters(projected_mse)
    for field in dataclasses.fields(KernelOptions):
        assert field.name in parameters, field.name
        if field.name != "normalize":  # the kernel defaults to true, the step to plain MSE
            assert parameters[field.name] == field.default, field.name


def test_dtypes_are_the_ones_the_model_builder_accepts() -> None:
    source = Path(inspect.getfile(PromptsSection)).parents[1] / "models" / "builder.py"
    tree = ast.parse(source.read_text())
    names = next(
        {key.value for key in node.value.keys}  # type: ignore[union-attr]
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign)
        and any(getattr(t, "id", None) == "_DTYPES" for t in node.targets)
    )
    assert set(get_args(DType)) == names


@pytest.mark.parametrize(
    "overrides, world, dp",
    [
        ([], 1, 1),
        ([], 8, 8),
        (["parallel.tp=2"], 8, 4),
        (["parallel.tp=2", "parallel.pp=2"], 16, 4),
        (["parallel.cp=2"], 8, 4),
        (["parallel.tp=2", "parallel.cp=2"], 8, 2),
    ],
)
def test_data_parallel_size(overrides: list[str], world: int, dp: int) -> None:
    assert data_parallel_size(minimal(*overrides), world) == dp


def test_world_size_not_divisible_names_tp_and_pp() -> None:
    with pytest.raises(ConfigError) as info:
        data_parallel_size(minimal("parallel.tp=2", "parallel.pp=2"), 6)
    (problem,) = info.value.problems
    assert "parallel.tp = 2, parallel.pp = 2" in problem
    assert "must divide the world size 6" in problem


def test_world_size_not_divisible_names_cp() -> None:
    with pytest.raises(ConfigError) as info:
        data_parallel_size(minimal("parallel.tp=2", "parallel.cp=2"), 6)
    (problem,) = info.value.problems
    assert "parallel.tp = 2, parallel.pp = 1, parallel.cp = 2: tp * pp * cp = 4" in problem


def test_too_few_samples_for_the_ranks_names_prompts_per_step() -> None:
    config = minimal("batch.prompts_per_step=3", "batch.microbatch_multiple=2")
    assert data_parallel_size(config, 3) == 3  # 6 samples fill 3 ranks x 2
    with pytest.raises(ConfigError) as info:
        data_parallel_size(config, 4)
    (problem,) = info.value.problems
    assert problem.startswith("batch.prompts_per_step = 3:")
    assert "use at least 4 prompts per step" in problem


def test_check_paths_names_every_missing_input(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "student").mkdir(parents=True)
    (tmp_path / "p.jsonl").write_text("{}\n")
    config = minimal("evaluation.prompts=held.jsonl")
    with pytest.raises(ConfigError) as info:
        check_paths(config)
    assert info.value.problems == [
        "teacher.path = 'models/teacher': no such file or directory",
        "evaluation.prompts = 'held.jsonl': no such file or directory",
    ]
    (tmp_path / "models" / "teacher").mkdir()
    (tmp_path / "held.jsonl").write_text("{}\n")
    check_paths(config)
