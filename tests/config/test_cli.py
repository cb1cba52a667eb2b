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
