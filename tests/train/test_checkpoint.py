"""Checkpoint saves are atomic: a full disk or a crash mid-save leaves the previous checkpoint
intact, found and loadable (model and optimizer equal to what was saved)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from oprd_mega.train.checkpoint import (
    STATE_FILE,
    CheckpointError,
    TrainerState,
    read_state,
    saved_config,
)
from tests.config.helpers import minimal
from tests.tiny_hf import make_tiny_model_dir

WORKER = Path(__file__).with_name("workers") / "checkpoint_worker.py"


def test_failed_and_crashed_saves_leave_the_previous_checkpoint(tmp_path: Path) -> None:
    hf_dir = make_tiny_model_dir(tmp_path / "hf", layers=2, hidden=32)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(WORKER), str(tmp_path), str(hf_dir)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-6000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("RESULT "))
    out = json.loads(line[len("RESULT ") :])
    assert "No space left on device" in out["message"]
    assert "previous checkpoint" in out["message"] and "intact" in out["message"]
    # No step-2 directory and no temporary directory survived the failed save.
    assert out["entries"] == ["latest", "step-00000001", "step-00000003"]
    assert out["latest"] == "step-00000001" and out["loaded_step"] == 1
    assert out["changed_since"] and out["params_equal"] and out["optimizer_equal"]


def _state_with_config(directory: Path, config: Any) -> TrainerState:
    directory.mkdir(parents=True, exist_ok=True)
    state = TrainerState(2, {}, "step-2", {"tp": 1, "pp": 1, "dp": 1}, config)
    (directory / STATE_FILE).write_text(json.dumps(state.__dict__), encoding="utf-8")
    return read_state(directory)


def test_saved_config_reads_back_and_an_invalid_one_names_the_file(tmp_path: Path) -> None:
    config = minimal("optimizer.lr=0.01")
    saved = config.model_dump(mode="json")
    assert saved_config(tmp_path, _state_with_config(tmp_path, saved)) == config

    broken = {**saved, "optimizer": {**saved["optimizer"], "lr": "fast"}}
    with pytest.raises(CheckpointError) as info:
        saved_config(tmp_path / "a", _state_with_config(tmp_path / "a", broken))
    assert str(tmp_path / "a" / STATE_FILE) in str(info.value)
    assert "optimizer.lr" in str(info.value)

    with pytest.raises(CheckpointError, match="'config' must be a mapping"):
        saved_config(tmp_path / "b", _state_with_config(tmp_path / "b", "lost"))
