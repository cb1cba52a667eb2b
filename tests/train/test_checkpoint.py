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

from oprd_mega.convert.mcore_io import FORMAT_FILE, HF_SUBDIR
from oprd_mega.models import load_hf_config
from oprd_mega.train.checkpoint import (
    LATEST,
    STATE_FILE,
    CheckpointError,
    CheckpointMismatchError,
    TrainerState,
    _prune,
    check_fits,
    check_fresh_start,
    read_state,
    resume_candidates,
    saved_config,
)
from tests.config.helpers import minimal
from tools.tiny_hf import make_tiny_model_dir

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
    # No step-2 directory and no temporary directory survived the failed save (step 4 is
    # saved later, for the fallback below).
    assert out["entries"] == ["latest", "step-00000001", "step-00000003", "step-00000004"]
    assert out["latest"] == "step-00000001" and out["loaded_step"] == 1
    assert out["changed_since"] and out["params_equal"] and out["optimizer_equal"]
    # A file-size limit inside torch DCP (its CheckpointException is a BaseException): the
    # temporary directory is gone, one line names the checkpoint, the previous one is intact.
    limit = out["limit_message"]
    assert limit is not None and "step-00000002" in limit and "intact" in limit
    assert "\n" not in limit and "CheckpointException" in limit
    assert "(File too large" in limit  # the system's reason, from inside DCP's exception
    assert out["limited_entries"] == ["latest", "step-00000001"]
    # A truncated shard in the newest checkpoint: the resume falls back to step 1 and says so.
    assert out["fallback"] == "step-00000001" and out["fallback_equal"]
    assert len(out["reports"]) == 1 and "step-00000004 is damaged" in out["reports"][0]
    assert out["truncated"] in out["reports"][0] and "is truncated (100 of" in out["reports"][0]
    assert "trying the previous one" in out["reports"][0]


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


def _fake_step(root: Path, step: int, config: Any = None) -> Path:
    """A complete-looking step directory (trainer state only) of ``step``."""
    path = root / f"step-{step:08d}"
    path.mkdir(parents=True)
    state = TrainerState(step, {}, f"v{step}", {"tp": 1, "pp": 1, "dp": 1}, config or {})
    (path / STATE_FILE).write_text(json.dumps(state.__dict__), encoding="utf-8")
    return path


def test_pruning_keeps_latest_and_counts_an_abandoned_timeline(tmp_path: Path) -> None:
    # A run resumed after its `latest` was moved back to step 3: steps 5 and 6 of the abandoned
    # timeline beside this run's 1..3. The just-saved step is never pruned (a probe once saw the
    # new step 1 pruned at once because names sorted the old run's after it), and keep_last
    # counts every checkpoint, the abandoned ones going first.
    for step in (1, 2, 3, 5, 6):
        _fake_step(tmp_path, step)
    _prune(tmp_path, keep_last=4, latest=tmp_path / "step-00000003")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step-00000001",
        "step-00000002",
        "step-00000003",
        "step-00000006",
    ]
    _prune(tmp_path, keep_last=2, latest=tmp_path / "step-00000003")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000002", "step-00000003"]
    _prune(tmp_path, keep_last=1, latest=tmp_path / "step-00000002")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000002"]


def test_a_fresh_run_refuses_a_directory_with_checkpoints(tmp_path: Path) -> None:
    check_fresh_start(tmp_path / "missing")  # nothing there: fine
    check_fresh_start(tmp_path)  # empty: fine
    _fake_step(tmp_path, 4)
    _fake_step(tmp_path, 6)
    with pytest.raises(CheckpointError) as info:
        check_fresh_start(tmp_path)
    message = str(info.value)
    assert "\n" not in message and str(tmp_path) in message
    assert "step-00000004 .. step-00000006" in message
    assert "--resume auto" in message and "new checkpoint.dir" in message
    for step in (4, 6):
        (tmp_path / f"step-{step:08d}" / STATE_FILE).unlink()
        (tmp_path / f"step-{step:08d}").rmdir()
    (tmp_path / LATEST).write_text("step-00000009\n")
    with pytest.raises(CheckpointError, match="a 'latest' pointer"):
        check_fresh_start(tmp_path)


def test_resume_candidates_start_at_latest_then_go_back(tmp_path: Path) -> None:
    for step in (2, 4, 6, 8):
        _fake_step(tmp_path, step)
    (tmp_path / LATEST).write_text("step-00000006\n")
    assert [p.name for p in resume_candidates(tmp_path)] == [
        "step-00000006",
        "step-00000004",
        "step-00000002",
    ]


def _checkpoint_of(root: Path, config: Any, model_dir: Path) -> tuple[Path, TrainerState]:
    """A step directory with the saved config and the model arguments of ``model_dir``."""
    path = _fake_step(root, 3, config.model_dump(mode="json"))
    model = path / "model"
    (model / HF_SUBDIR).mkdir(parents=True)
    (model / HF_SUBDIR / "config.json").write_bytes((model_dir / "config.json").read_bytes())
    (model / FORMAT_FILE).write_text("{}")
    (model / "metadata.json").write_text("{}")
    return path, read_state(path)


def test_a_changed_model_or_projection_is_one_line_naming_the_key(tmp_path: Path) -> None:
    shallow = make_tiny_model_dir(tmp_path / "shallow", layers=2, hidden=32)
    deep = make_tiny_model_dir(tmp_path / "deep", layers=4, hidden=32)
    saved = minimal(f"student.path={shallow}", "distillation.projection.mode=full")
    path, state = _checkpoint_of(tmp_path / "ckpt", saved, shallow)

    same = minimal(f"student.path={shallow}", "distillation.projection.mode=full", "seed=3")
    check_fits(path, state, same, load_hf_config(shallow))  # a non-structural change: fine

    other = minimal(f"student.path={deep}", "distillation.projection.mode=identity")
    with pytest.raises(CheckpointMismatchError) as info:
        check_fits(path, state, other, load_hf_config(deep))
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    assert "distillation.projection.mode ('full' in the checkpoint, 'identity' now)" in message
    assert "num_layers (2 in the checkpoint, 4 now)" in message


def test_another_teacher_list_is_refused_and_one_renamed_teacher_is_not(tmp_path: Path) -> None:
    student = make_tiny_model_dir(tmp_path / "student", layers=2, hidden=32)
    two = "teachers=[{name: a, path: ta}, {name: b, path: tb, projection: {mode: full}}]"
    saved = minimal(f"student.path={student}", "teacher=null", two)
    path, state = _checkpoint_of(tmp_path / "ckpt", saved, student)
    check_fits(path, state, saved, load_hf_config(student))
    for changed in (
        "teachers=[{name: a, path: ta}]",  # one dropped
        "teachers=[{name: a, path: ta}, {name: c, path: tb, projection: {mode: full}}]",
        "teachers=[{name: a, path: ta}, {name: b, path: tb, layers: last, "
        "projection: {mode: full}}]",
    ):
        config = minimal(f"student.path={student}", "teacher=null", changed)
        with pytest.raises(CheckpointMismatchError) as info:
            check_fits(path, state, config, load_hf_config(student))
        message = str(info.value)
        assert "\n" not in message and "the teacher list changed since the checkpoint" in message
        assert "b (tb, layers all, projection full)] in the checkpoint" in message
    # One teacher, as the teacher section or as a list of one under another name: its
    # projection is the model's own (not stored by name), so the run resumes.
    single = minimal(f"student.path={student}", "teacher.path=ta")
    path, state = _checkpoint_of(tmp_path / "single", single, student)
    renamed = minimal(f"student.path={student}", "teacher=null", "teachers=[{name: x, path: ta}]")
    check_fits(path, state, renamed, load_hf_config(student))
    moved = minimal(f"student.path={student}", "teacher=null", "teachers=[{name: x, path: tz}]")
    with pytest.raises(CheckpointMismatchError, match="teacher list changed"):
        check_fits(path, state, moved, load_hf_config(student))
