"""Metric sinks: JSONL content, exact resume, torn lines, TensorBoard scalars, timers, memory."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from oprd_mega.train.metrics import (
    MetricsFileError,
    MetricsWriter,
    StepTimer,
    peak_memory_mib,
    read_metrics,
    tensorboard_tag,
)


def _lines(directory: Path) -> list[dict[str, object]]:
    text = (directory / "metrics.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines()]


def _scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    accumulator = EventAccumulator(str(directory / "tensorboard"))
    accumulator.Reload()
    return {
        tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
        for tag in accumulator.Tags()["scalars"]
    }


def test_jsonl_lines(tmp_path: Path) -> None:
    before = time.time()
    with MetricsWriter(tmp_path, sinks=("jsonl",)) as writer:
        writer.log(1, {"loss": 0.5, "tokens": 128})
        writer.log(1, {"eval/avg_at_k": 0.25}, kind="eval")
        writer.log(2, {"loss": torch.tensor(0.25), "flag": True})
    lines = _lines(tmp_path)
    assert [{k: v for k, v in line.items() if k != "time"} for line in lines] == [
        {"step": 1, "kind": "train", "loss": 0.5, "tokens": 128},
        {"step": 1, "kind": "eval", "eval/avg_at_k": 0.25},
        {"step": 2, "kind": "train", "loss": 0.25, "flag": 1},
    ]
    assert isinstance(lines[0]["tokens"], int)
    assert all(before <= line["time"] <= time.time() for line in lines)  # type: ignore[operator]
    assert not (tmp_path / "tensorboard").exists()


def test_lines_are_flushed_before_close(tmp_path: Path) -> None:
    writer = MetricsWriter(tmp_path, sinks=("jsonl",))
    writer.log(3, {"loss": 1.0})
    assert _lines(tmp_path)[0]["step"] == 3
    writer.close()
    writer.close()


def test_non_finite_values_are_null(tmp_path: Path) -> None:
    with MetricsWriter(tmp_path, sinks=("jsonl",)) as writer:
        writer.log(1, {"nan": math.nan, "inf": math.inf, "ninf": -math.inf, "ok": 1.5})
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    line = _lines(tmp_path)[0]
    assert (line["nan"], line["inf"], line["ninf"], line["ok"]) == (None, None, None, 1.5)


def test_read_metrics_filters_kind(tmp_path: Path) -> None:
    with MetricsWriter(tmp_path, sinks=("jsonl",)) as writer:
        writer.log(1, {"loss": 2.0})
        writer.log(1, {"eval/avg_at_k": 0.5}, kind="eval")
        writer.log(2, {"loss": 1.0})
    assert [r["loss"] for r in read_metrics(tmp_path, kind="train")] == [2.0, 1.0]
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 1, 2]
    assert read_metrics(tmp_path, kind="eval")[0]["eval/avg_at_k"] == 0.5


def test_resume_drops_steps_after_the_checkpoint(tmp_path: Path) -> None:
    with MetricsWriter(tmp_path, sinks=("jsonl",)) as writer:
        for step in range(1, 6):
            writer.log(step, {"loss": float(step)})
    kept_bytes = b"".join((tmp_path / "metrics.jsonl").read_bytes().splitlines(True)[:3])
    with MetricsWriter(tmp_path, sinks=("jsonl",), resume_step=3) as writer:
        assert (tmp_path / "metrics.jsonl").read_bytes() == kept_bytes
        writer.log(4, {"loss": 40.0})
    records = read_metrics(tmp_path)
    assert [(r["step"], r["loss"]) for r in records] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    assert list(tmp_path.iterdir()) == [tmp_path / "metrics.jsonl"]  # no temporary file left


def test_resume_keeps_every_kind_up_to_the_checkpoint(tmp_path: Path) -> None:
    with MetricsWriter(tmp_path, sinks=("jsonl",)) as writer:
        for step in (0, 2, 4):
            writer.log(step, {"eval/avg_at_k": step / 10}, kind="eval")
            writer.log(step + 1, {"loss": float(step)})
    MetricsWriter(tmp_path, sinks=("jsonl",), resume_step=2).close()
    assert [(r["kind"], r["step"]) for r in read_metrics(tmp_path)] == [
        ("eval", 0),
        ("train", 1),
        ("eval", 2),
    ]


def test_resume_drops_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "kind": "train", "loss": 1.0}\n{"step": 2, "kind": "tr')
    with (
        pytest.warns(UserWarning, match="torn last line"),
        MetricsWriter(tmp_path, sinks=("jsonl",), resume_step=5) as writer,
    ):
        writer.log(2, {"loss": 2.0})
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [(1, 1.0), (2, 2.0)]


def test_read_metrics_skips_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "kind": "train"}\n{"step": 2, "ki')
    assert read_metrics(path) == [{"step": 1, "kind": "train"}]


def test_invalid_line_inside_the_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "kind": "train"}\nnot json\n{"step": 2, "kind": "train"}\n')
    with pytest.raises(MetricsFileError, match=r"metrics.jsonl:2: invalid JSON"):
        MetricsWriter(tmp_path, sinks=("jsonl",), resume_step=1)
    with pytest.raises(MetricsFileError, match=r":1: .*int step"):
        path.write_text('{"kind": "train"}\n')
        read_metrics(path)


def test_fresh_run_moves_an_earlier_file_aside_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with MetricsWriter(tmp_path, sinks=("jsonl",)) as writer:
        writer.log(1, {"loss": 1.0})
    earlier = (tmp_path / "metrics.jsonl").read_bytes()
    for loss in (9.0, 7.0):  # twice: the second move-aside needs a name of its own
        with MetricsWriter(tmp_path, sinks=("jsonl",)) as writer:
            writer.log(1, {"loss": loss})
    assert [r["loss"] for r in read_metrics(tmp_path)] == [7.0]
    aside = sorted(tmp_path.glob("metrics.jsonl.replaced-*"))
    assert len(aside) == 2 and aside[0].read_bytes() == earlier
    assert [r["loss"] for r in read_metrics(aside[1])] == [9.0]
    err = capsys.readouterr().err
    assert err.count("records of an earlier run were moved to") == 2
    assert str(aside[0]) in err


def test_tensorboard_scalars(tmp_path: Path) -> None:
    with MetricsWriter(tmp_path, sinks=("jsonl", "tensorboard")) as writer:
        writer.log(1, {"loss": 0.5, "rep/loss": 0.25})
        writer.log(2, {"loss": 0.125, "rep/loss": math.nan})
        writer.log(2, {"eval/avg_at_k": 0.75}, kind="eval")
    scalars = _scalars(tmp_path)
    assert set(scalars) == {"train/loss", "train/rep/loss", "eval/avg_at_k"}
    assert scalars["train/loss"] == [(1, 0.5), (2, 0.125)]
    assert scalars["eval/avg_at_k"] == [(2, 0.75)]
    rep = scalars["train/rep/loss"]
    assert rep[0] == (1, 0.25) and rep[1][0] == 2 and math.isnan(rep[1][1])


def test_tensorboard_resume_purges_steps_after_the_checkpoint(tmp_path: Path) -> None:
    with MetricsWriter(tmp_path, sinks=("tensorboard",)) as writer:
        for step in range(1, 6):
            writer.log(step, {"loss": float(step)})
    _age_event_files(tmp_path)
    with MetricsWriter(tmp_path, sinks=("tensorboard",), resume_step=3) as writer:
        writer.log(4, {"loss": 40.0})
    assert _scalars(tmp_path)["train/loss"] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]


def test_a_fresh_run_moves_earlier_tensorboard_events_aside_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with MetricsWriter(tmp_path, sinks=("tensorboard",)) as writer:
        for step in range(1, 4):
            writer.log(step, {"loss": float(step)})
    _age_event_files(tmp_path)
    with MetricsWriter(tmp_path, sinks=("tensorboard",)) as writer:
        writer.log(1, {"loss": 10.0})
    assert _scalars(tmp_path)["train/loss"] == [(1, 10.0)]
    aside = list(tmp_path.glob("tensorboard.replaced-*"))
    assert len(aside) == 1
    older = EventAccumulator(str(aside[0]))
    older.Reload()
    assert [(e.step, e.value) for e in older.Scalars("train/loss")] == [
        (1, 1.0),
        (2, 2.0),
        (3, 3.0),
    ]
    err = capsys.readouterr().err
    assert "1 event file(s) of an earlier run were moved to" in err and str(aside[0]) in err


def _age_event_files(directory: Path, seconds: int = 100) -> None:
    """Backdate event file names: TensorBoard reads files in name order (the name starts with
    the creation second), and two writers of one test may share a second."""
    for path in (directory / "tensorboard").glob("events.out.tfevents.*"):
        events, out, tfevents, stamp, rest = path.name.split(".", 4)
        older = f"{events}.{out}.{tfevents}.{int(stamp) - seconds:010d}.{rest}"
        path.rename(path.with_name(older))


def test_tensorboard_tag() -> None:
    assert tensorboard_tag("train", "loss") == "train/loss"
    assert tensorboard_tag("eval", "eval/avg_at_k") == "eval/avg_at_k"
    assert tensorboard_tag("train", "time/rollout") == "train/time/rollout"


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sinks"):
        MetricsWriter(tmp_path, sinks=("csv",))
    with pytest.raises(ValueError, match="sinks"):
        MetricsWriter(tmp_path, sinks=("jsonl", "jsonl"))
    with pytest.raises(ValueError, match="resume_step"):
        MetricsWriter(tmp_path, sinks=("jsonl",), resume_step=-1)
    with MetricsWriter(tmp_path, sinks=("jsonl",)) as writer:
        with pytest.raises(ValueError, match="reserved"):
            writer.log(1, {"step": 1.0})
        with pytest.raises(TypeError, match="'loss' must be a number"):
            writer.log(1, {"loss": "low"})


def test_wandb_missing_names_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ImportError, match="pip install wandb"):
        MetricsWriter(tmp_path, sinks=("jsonl", "wandb"))


def test_step_timer_accumulates_per_phase() -> None:
    ticks = iter([0.0, 1.0, 1.0, 1.5, 2.0, 4.0, 10.0, 10.25])
    timer = StepTimer(clock=lambda: next(ticks))
    with timer("rollout"):
        pass
    with timer("train"):
        pass
    with timer("rollout"):
        pass
    assert timer.pop() == {"time/rollout": 3.0, "time/train": 0.5}
    with timer("sync"):
        pass
    assert timer.pop() == {"time/sync": 0.25}
    assert timer.pop() == {}


def test_step_timer_counts_a_phase_that_raises() -> None:
    timer = StepTimer()
    with pytest.raises(RuntimeError), timer("rollout"):
        time.sleep(0.01)
        raise RuntimeError
    seconds = timer.pop()["time/rollout"]
    assert 0.01 <= seconds < 1.0


def test_peak_memory_mib() -> None:
    peak = peak_memory_mib()
    assert peak > 0
    if not torch.cuda.is_available():
        # This process has imported torch: well over 10 MiB resident, and far below 1 TiB.
        assert 10 < peak < 2**20
