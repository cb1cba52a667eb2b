"""The trainer with the teacher on its own layout (parallel.teacher) against the teacher on the
student's: two real 2-rank launches, same task, same per-step metrics."""

from __future__ import annotations

from pathlib import Path

import pytest

from oprd_mega.train.metrics import read_metrics
from tests.train.runs import comparable, make_task, require_success, task_config, train

OVERRIDES = ("schedule.steps=2", "evaluation.interval=0")


def test_teacher_on_its_own_layout_gives_the_same_metrics(tmp_path: Path) -> None:
    task = make_task(tmp_path / "task")
    layout = {"tp": 2, "pp": 1}  # student TP2 on 2 ranks (DP1)
    same = task_config(task, tmp_path / "same", parallel=layout)
    require_success(train(same, *OVERRIDES, timeout=600))
    own = task_config(task, tmp_path / "own", parallel={**layout, "teacher": {"tp": 1}})
    out = require_success(train(own, *OVERRIDES, timeout=600))  # teacher TP1 x DP2
    assert "done: 2 steps" in out
    reference = _metrics(tmp_path / "same")
    got = _metrics(tmp_path / "own")
    assert [r["step"] for r in reference] == [1, 2]
    assert [sorted(r) for r in got] == [sorted(r) for r in reference]
    for mine, want in zip(got, reference, strict=True):
        for key, value in want.items():
            if isinstance(value, float):  # TP1 vs TP2 sums differ in float32 rounding only
                assert mine[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
            else:
                assert mine[key] == value, key


def _metrics(run: Path) -> list[dict]:
    records = comparable(read_metrics(run / "logs"))
    return [
        {k: v for k, v in r.items() if not k.startswith("memory/")}
        for r in records
        if r["kind"] == "train"
    ]
