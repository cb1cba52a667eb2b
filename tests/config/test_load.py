"""Loading, overrides and the dump round trip."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from oprd_mega.config import (
    ConfigError,
    TrainConfig,
    apply_override,
    dump_config,
    load_config,
    to_yaml,
)
from oprd_mega.config.loader import parse_value
from oprd_mega.distill.positions import PositionSpec
from oprd_mega.rollout.sampling import SamplingConfig
from tests.config.helpers import minimal

NON_DEFAULT = [
    "seed=7",
    "parallel.tp=2",
    "parallel.sp=true",
    "rollout.launch.backend=embedded",
    "rollout.launch.extra_args=[--foo, '1']",
    "rollout.launch.env={A: b}",
    "rollout.sampling.stop_token_ids=[9, 3, 5]",
    "rollout.sampling.stop=[END]",
    "rollout.sampling.top_k=1073741824",  # SGLang's TOP_K_ALL
    "rollout.weight_sync.method=distributed",
    "rollout.weight_sync.probe.prompt_ids=[4, 5]",
    "distillation.method=combined",
    "distillation.opd=opd-topk",
    "distillation.kernel.recompute=true",
    "distillation.projection.init_std=0.02",
    "distillation.layers=[4, 2]",
    "distillation.positions={mode: first_k, k: 7}",
    "distillation.normalize=true",
    "distillation.projection.mode=bridge",
    "distillation.projection.bridge_path=bridge.pt",
    "optimizer.betas=[0.8, 0.95]",
    "schedule.warmup_steps=4",
    "metrics.sinks=[wandb]",
    "evaluation.prompts=eval.jsonl",
    "evaluation.interval=10",
    "evaluation.k=4",
    "evaluation.sampling.temperature=0.5",
]


def test_defaults_follow_the_paper() -> None:
    config = minimal()
    assert config.rollout.sampling.n == 2
    assert config.rollout.sampling.temperature == 1.0
    assert config.rollout.sampling.max_new_tokens == 16384
    assert config.batch.prompts_per_step == 8
    assert config.optimizer.lr == 1e-5
    assert config.schedule.warmup_fraction == 0.03
    assert config.schedule.decay == "cosine"
    assert config.schedule.warmup == 15  # ceil(0.03 * 500)
    assert config.distillation.layers == "all"
    assert config.distillation.positions == PositionSpec("last_k", 2000)
    assert config.distillation.method == "oprd"
    assert config.rollout.launch is not None
    assert config.rollout.launch.model_path == "models/student"


@pytest.mark.parametrize("overrides", [[], NON_DEFAULT], ids=["defaults", "non-default"])
def test_dump_loads_to_an_equal_object(tmp_path: Path, overrides: list[str]) -> None:
    config = minimal(*overrides)
    path = dump_config(config, tmp_path / "run" / "config.yaml")
    again = load_config(path)
    assert again == config
    assert to_yaml(again) == to_yaml(config)
    assert not list(path.parent.glob("*.tmp"))


def test_dump_is_plain_yaml_with_every_key(tmp_path: Path) -> None:
    config = minimal(*NON_DEFAULT)
    data = yaml.safe_load(to_yaml(config))
    assert data["rollout"]["sampling"]["stop_token_ids"] == [3, 5, 9]  # sorted set
    assert data["rollout"]["sampling"]["top_k"] == -1  # normalised like SGLang
    assert data["distillation"]["layers"] == [4, 2]
    assert data["schedule"]["warmup_fraction"] is None
    assert set(data) == set(TrainConfig.model_fields)


def test_overrides_nested_lists_booleans_nulls() -> None:
    config = minimal(
        "distillation.positions.mode=last",
        "distillation.layers=[1,3]",
        "parallel.tp=2",
        "parallel.sp=True",
        "data.max_prompt_length=null",
        "data.system_prompt=",
        "optimizer.lr=3e-4",
        "rollout.attach.urls=[http://a:1, http://b:2]",
    )
    assert config.distillation.positions.mode == "last"
    assert config.distillation.layers == (1, 3)
    assert config.parallel.sp is True
    assert config.data.max_prompt_length is None
    assert config.data.system_prompt is None
    assert config.optimizer.lr == pytest.approx(3e-4)
    assert config.rollout.attach.urls == ("http://a:1", "http://b:2")


def test_overrides_apply_in_order_over_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "student: {path: s}\nteacher: {path: t}\ndata: {path: d.jsonl}\n"
        "optimizer: {lr: 2e-5, weight_decay: 0.1}\n"
    )
    config = load_config(path, ["optimizer.lr=1e-4", "optimizer.lr=5e-5"])
    assert config.optimizer.lr == pytest.approx(5e-5)  # the last one wins
    assert config.optimizer.weight_decay == pytest.approx(0.1)  # siblings kept


def test_a_null_section_can_be_overridden_and_nulled() -> None:
    config = minimal("evaluation.sampling=null")
    assert config.evaluation.sampling is None
    config = minimal("evaluation.sampling=null", "evaluation.sampling.top_p=0.5")
    assert config.evaluation.sampling is not None
    assert config.evaluation.sampling.top_p == 0.5
    assert config.evaluation.sampling.n == config.evaluation.k


def test_apply_override_copies_and_creates_sections() -> None:
    data = {"a": {"b": 1}}
    result = apply_override(data, "a.c.d=[1, x]")
    assert result == {"a": {"b": 1, "c": {"d": [1, "x"]}}}
    assert data == {"a": {"b": 1}}


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("noequals", "expected dotted.key=value"),
        ("=3", "expected dotted.key=value"),
        ("a..b=3", "expected dotted.key=value"),
        ("seed.x=3", "seed = 1 is a value, not a section"),
    ],
)
def test_malformed_overrides(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match="override") as info:
        apply_override({"seed": 1}, override)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    "text, value",
    [
        ("3", 3),
        ("1e-5", 1e-5),
        ("-2.5E3", -2500.0),
        ("true", True),
        ("False", False),
        ("null", None),
        ("~", None),
        ("", None),
        ("[1, 2]", [1, 2]),
        ("[]", []),
        ("{a: 1}", {"a": 1}),
        ("hello", "hello"),
        ("'007'", "007"),
        ("a: b: c", "a: b: c"),  # not YAML: kept as text
    ],
)
def test_override_values_are_yaml(text: str, value: object) -> None:
    assert parse_value(text) == value


def test_the_objects_are_frozen() -> None:
    config = minimal()
    with pytest.raises(ValueError, match="frozen"):
        config.seed = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.rollout.sampling.n = 3  # type: ignore[misc]


def test_reused_types_are_the_existing_ones() -> None:
    config = minimal()
    assert type(config.rollout.sampling) is SamplingConfig
    assert type(config.distillation.positions) is PositionSpec


def test_yaml_and_file_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("student: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml") as info:
        load_config(broken)
    assert "line" in str(info.value)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(listed)


def test_empty_file_reports_the_required_keys(tmp_path: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError) as info:
        load_config(empty)
    text = str(info.value)
    assert "empty.yaml" in text
    for key in ("student: required key is missing", "teacher:", "data:"):
        assert key in text
