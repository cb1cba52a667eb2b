"""tools/sweep_table.py: the OPD baseline tables from runs written through the trainer's own
metrics writer and config dump; expected cells are worked out by hand here."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from oprd_mega.config import dump_config
from oprd_mega.train.metrics import MetricsWriter
from tests.config.helpers import minimal
from tools.quickstart_summary import format_rate, run_config
from tools.sweep_table import best_runs, load_runs, main


def _write_run(
    root: Path,
    name: str,
    lr: float,
    curve: dict[int, float],
    *overrides: str,
    steps: int = 4,
    rewards: tuple[float, ...] = (-1.0, -2.0, -3.0, -4.0),
) -> None:
    shutil.rmtree(root / name, ignore_errors=True)
    logs = root / name / "logs"
    config = minimal(
        f"optimizer.lr={lr}", "optimizer.min_lr=0", f"schedule.steps={steps}", *overrides
    )
    dump_config(config, logs / "config.yaml")
    with MetricsWriter(logs, sinks=("jsonl",)) as writer:
        for step in range(steps + 1):
            if step in curve:
                writer.log(step, {"eval/avg_at_k": curve[step], "eval/k": 1.0}, kind="eval")
            if step < steps:
                record = {"loss": 0.5 * (step + 1), "opd/reward": rewards[step % len(rewards)]}
                writer.log(step + 1, record)


def _sweep(root: Path) -> None:
    top1 = ("distillation.method=opd-top1",)
    top16 = ("distillation.method=opd-topk", "distillation.top_k=16")
    _write_run(root, "opd-top1-lr1e-3", 1e-3, {0: 0.1, 2: 0.0, 4: 0.01}, *top1)
    _write_run(root, "opd-top1-lr3e-4", 3e-4, {0: 0.1, 2: 0.3, 4: 0.25}, *top1)
    _write_run(root, "opd-top1-lr1e-4", 1e-4, {0: 0.1, 2: 0.2, 4: 0.25}, *top1)
    _write_run(root, "opd-top16-lr1e-3", 1e-3, {0: 0.1, 2: 0.5, 4: 0.6}, *top16)
    _write_run(root, "oprd", 1e-3, {0: 0.1, 2: 0.5, 4: 0.9})  # not a baseline: left out


def test_tables_and_best_rate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _sweep(tmp_path)
    runs = load_runs(tmp_path)
    assert [(r.method, r.lr) for r in runs] == [
        ("opd-top1", 1e-4), ("opd-top1", 3e-4), ("opd-top1", 1e-3), ("opd-top16", 1e-3)
    ]  # fmt: skip
    # 1e-4 and 3e-4 end equal (25%); 3e-4's best (30% at step 2) breaks the tie.
    best = best_runs(runs)
    assert best["opd-top1"].name == "opd-top1-lr3e-4" and best["opd-top16"].lr == 1e-3
    teacher = tmp_path / "teacher.json"
    teacher.write_text('{"eval/avg_at_k": 0.95}', encoding="utf-8")
    assert main([str(tmp_path), "--best-runs"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        str(tmp_path / "opd-top1-lr3e-4"), str(tmp_path / "opd-top16-lr1e-3")
    ]  # fmt: skip
    assert main([str(tmp_path), "--teacher", str(teacher), "--window", "2"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "| run | method | peak lr | step 0 | step 2 | step 4 | final | best (step) |" in lines
    assert (
        "| opd-top1-lr3e-4 | opd-top1 | 3e-4 | 10.0% | 30.0% | 25.0% | **25.0%** | 30.0% (2) |"
        in lines
    )
    assert (
        "| opd-top1-lr1e-3 | opd-top1 | 1e-3 | 10.0% | 0.0% | 1.0% | **1.0%** | 10.0% (0) |"
        in lines
    )
    assert "Teacher: 95.0%." in lines
    assert "Best opd-top1: peak lr 3e-4 (final 25.0%, best 30.0% at step 2)." in lines
    assert "Best opd-top16: peak lr 1e-3 (final 60.0%, best 60.0% at step 4)." in lines
    # Window 2 of losses 0.5, 1.0, 1.5, 2.0 and rewards -1..-4: first two and last two means.
    signals = [line for line in lines if line.startswith("| opd-top16-lr1e-3 |")][-1]
    assert signals.startswith("| opd-top16-lr1e-3 | 0.750 -> 1.750 | -1.500 -> -3.500 | - -> - |")


def test_runs_off_budget_are_named(tmp_path: Path) -> None:
    top1 = "distillation.method=opd-top1"
    _write_run(tmp_path, "a", 1e-3, {0: 0.1, 2: 0.2, 4: 0.3}, top1)
    _write_run(tmp_path, "b", 1e-4, {0: 0.1, 4: 0.3}, top1)
    with pytest.raises(SystemExit, match=r"run b has 4 steps, evaluations at \[0, 4\]"):
        load_runs(tmp_path)
    _write_run(tmp_path, "b", 1e-4, {0: 0.1, 2: 0.2}, top1, steps=4)
    with pytest.raises(SystemExit, match="run b stopped before its last step"):
        load_runs(tmp_path)


def test_no_runs_and_missing_config_are_named(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=f"{tmp_path} has no OPD runs"):
        load_runs(tmp_path)
    with pytest.raises(SystemExit, match=r"config\.yaml does not exist"):
        run_config(tmp_path / "logs")


def test_format_rate() -> None:
    assert [format_rate(x) for x in (1e-3, 3e-4, 0.0001, 2.5e-4, 1.0)] == [
        "1e-3", "3e-4", "1e-4", "2.5e-4", "1e0"
    ]  # fmt: skip


SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def _lr_overrides(rate: str) -> subprocess.CompletedProcess[str]:
    venv = Path(sys.executable).parents[1]  # the library's python is $VENV/bin/python
    command = f'VENV="{venv}"; source "{SCRIPTS}/quickstart_lib.sh"; lr_overrides "$1" X'
    return subprocess.run(
        ["bash", "-c", command, "bash", rate], capture_output=True, text=True, check=False
    )


def test_lr_overrides_keep_the_quickstart_schedule_shape() -> None:
    words = _lr_overrides("3e-4").stdout.split()
    assert words == ["optimizer.lr=0.0003", "optimizer.min_lr=3e-05"]
    config = minimal(*words)
    assert config.optimizer.lr == 3e-4 and config.optimizer.min_lr == pytest.approx(3e-5)
    bad = _lr_overrides("3e-4x")
    assert bad.returncode != 0 and "X: learning rate '3e-4x' is not a positive number" in bad.stderr


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("SWEEP_RATES", "1e-4 -1", "SWEEP_RATES: learning rate '-1'"),
        ("SWEEP_METHODS", "opd-top1 opd-top3", "SWEEP_METHODS: unknown method 'opd-top3'"),
    ],
)
def test_sweep_refuses_bad_settings_before_any_run(
    tmp_path: Path, variable: str, value: str, message: str
) -> None:
    out = tmp_path / "runs"
    env = {**os.environ, "QUICKSTART_DIR": str(out), "VENV": str(Path(sys.executable).parents[1]),
           variable: value}  # fmt: skip
    result = subprocess.run(
        [str(SCRIPTS / "opd_sweep.sh")], env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode != 0 and message in result.stderr
    assert not out.exists()
