"""Two teachers in one run, routed per prompt, through real torchrun launches: per-teacher
metrics, the weighted objective, and exact resume with both projections (a changed teacher list
is refused by check_fits: tests/train/test_checkpoint.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from oprd_mega.train.metrics import read_metrics
from tests.train.runs import comparable, make_task, require_success, task_config, train
from tools.tiny_hf import make_tiny_model_dir

# "same": the task's teacher (4 layers, the student's width, identity), on the student's
# layout; "wide": 3 layers, width 96, a learned map, loss weight 0.5, on a layout of its own
# (TP1 x DP2 under the student's TP2).
TEACHERS = [
    {"name": "same", "dtype": "float32", "projection": {"mode": "identity"}},
    {
        "name": "wide",
        "dtype": "float32",
        "layers": [2],
        "projection": {"mode": "full"},
        "parallel": {"tp": 1},
        "weight": 0.5,
    },
]


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_task(tmp_path_factory.mktemp("task"))
    make_tiny_model_dir(root / "wide", seed=2, layers=3, hidden=96)
    # a third of the prompts each: routed to "same", to "wide", or with no route (both)
    domains = ["same", "wide", None]
    with (root / "routed.jsonl").open("w") as handle:
        for i in range(40):
            row: dict[str, Any] = {"prompt": f"numbers {i % 10} and the fox {i}"}
            if domains[i % 3] is not None:
                row["domain"] = domains[i % 3]
            handle.write(json.dumps(row) + "\n")
    return root


def _config(task: Path, run: Path, teachers: list[dict[str, Any]] = TEACHERS) -> Path:
    paths = {"same": task / "teacher", "wide": task / "wide"}
    return task_config(
        task,
        run,
        teacher=None,
        teachers=[{**t, "path": str(paths[t["name"]])} for t in teachers],
        data={
            "path": str(task / "routed.jsonl"),
            "chat_template": False,
            "teacher_field": "domain",
        },
        routing={"default": ["same", "wide"]},
        schedule={"steps": 4, "warmup_steps": 1},
        evaluation={"interval": 0},
    )


def test_two_routed_teachers_train_log_and_resume_exactly(task: Path, tmp_path: Path) -> None:
    whole = _config(task, tmp_path / "whole")
    require_success(train(whole))
    split = _config(task, tmp_path / "split")
    require_success(train(split, "--stop-at-step", "2"))
    resumed = require_success(train(split))
    assert "resumed from" in resumed

    reference = read_metrics(tmp_path / "whole" / "logs", "train")
    assert comparable(read_metrics(tmp_path / "split" / "logs", "train")) == comparable(reference)
    assert len(reference) == 4
    for record in reference:
        for name in ("same", "wide"):
            assert record[f"teacher/{name}/supervised_tokens"] > 0, record
            assert record[f"teacher/{name}/rep/loss"] > 0
            assert -1 <= record[f"teacher/{name}/rep/cosine_similarity"] <= 1
            assert record[f"teacher/{name}/microbatches"] >= 1
            assert record[f"time/teacher/{name}"] > 0
        assert "teacher/wide/rep/loss/layer_2" in record
        assert "teacher/wide/rep/loss/layer_1" not in record  # it taps layer 2 only
        assert {"teacher/same/rep/loss/layer_1", "teacher/same/rep/loss/layer_2"} <= set(record)
        # the objective: each teacher's loss weighted (1 and 0.5)
        total = record["teacher/same/loss"] + 0.5 * record["teacher/wide/loss"]
        assert record["loss"] == pytest.approx(total, rel=1e-6)
        assert record["routing/unsupervised_samples"] == 0
        # every response token is supervised (positions: all) by each of its teachers
        assert (
            record["teacher/same/supervised_tokens"] + record["teacher/wide/supervised_tokens"]
            >= record["supervised_tokens"]
        )
    # prompts without a domain go to both teachers: their tokens count once for each
    shared = sum(
        r["teacher/same/supervised_tokens"]
        + r["teacher/wide/supervised_tokens"]
        - r["supervised_tokens"]
        for r in reference
    )
    assert shared > 0
