"""``python -m oprd_mega.config`` (run in-process): resolved YAML, or errors and exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from oprd_mega.config import load_config
from oprd_mega.config.__main__ import main

EXAMPLE = str(Path(__file__).resolve().parents[2] / "examples" / "tiny_cpu.yaml")


def test_prints_the_resolved_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([EXAMPLE, "schedule.steps=7"]) == 0
    data = yaml.safe_load(capsys.readouterr().out)
    assert data["schedule"]["steps"] == 7
    assert data["rollout"]["launch"]["model_path"] == data["student"]["path"]


def test_dump_writes_a_loadable_file(tmp_path: Path) -> None:
    out = tmp_path / "resolved.yaml"
    assert main([EXAMPLE, "--dump", str(out)]) == 0
    assert load_config(out) == load_config(EXAMPLE)


def test_errors_exit_2_and_name_the_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([EXAMPLE, "optimizer.lr=-1"]) == 2
    assert "optimizer.lr = -1: Input should be greater than 0" in capsys.readouterr().err
    assert main([EXAMPLE, "--world-size", "3"]) == 2
    assert "must divide the world size 3" in capsys.readouterr().err


def test_an_unwritable_dump_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([EXAMPLE, "--dump", "/proc/x.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("oprd-mega config: error: --dump /proc/x.yaml: cannot write it: ")
    assert err.count("\n") == 1


@pytest.fixture(scope="module")
def model_run(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """A config's required keys pointing at real (tiny, 3-layer) model directories and data."""
    from tools.tiny_hf import make_tiny_model_dir

    root = tmp_path_factory.mktemp("models")
    student = make_tiny_model_dir(root / "student", layers=3)
    teacher = make_tiny_model_dir(root / "teacher", layers=3, seed=1)
    data = root / "prompts.jsonl"
    data.write_text('{"prompt": "a b"}\n', encoding="utf-8")
    return [EXAMPLE, f"student.path={student}", f"teacher.path={teacher}", f"data.path={data}"]


@pytest.mark.parametrize(
    "layout",
    [
        # 3 layers over 2 stages hold 2 | 1: chunks of 2 do not divide the last stage
        ["parallel.tp=1", "parallel.pp=2", "training.recompute.granularity=full",
         "training.recompute.method=uniform", "training.recompute.num_layers=2"],
        # all 3 layers on the first of 2 stages leaves the last one empty
        ["parallel.tp=1", "parallel.pp=2", "student.pipeline_split={first: 3}"],
    ],
    ids=["recompute-chunk", "empty-stage"],
)  # fmt: skip
def test_config_with_world_size_refuses_exactly_what_train_refuses(
    model_run: list[str],
    layout: list[str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from oprd_mega.train.cli import main as train_main

    assert main([*model_run, *layout, "--world-size", "2"]) == 2
    checked = [line for line in capsys.readouterr().err.splitlines() if line.startswith("  - ")]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    config, *overrides = model_run
    assert train_main(["--config", config, *overrides, *layout]) == 2  # before any process group
    refused = [line for line in capsys.readouterr().err.splitlines() if line.startswith("  - ")]
    assert checked and checked == refused
    assert "middle" not in " ".join(checked)  # pp = 2 has no middle stage
