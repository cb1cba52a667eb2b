"""``oprd-mega plot``: the plotted arrays equal the inputs' numbers (read here independently of
the plot module), bad inputs are named, nothing is overwritten without --force."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from oprd_kernels.benchmark import Case, Result
from oprd_mega.cli import main
from oprd_mega.train.metrics import MetricsWriter
from oprd_mega.train.plot import PlotInputError, build_figure

pytest.importorskip("matplotlib")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_run(logs: Path, offset: float, layers: bool, named_set: bool = False) -> Path:
    """A run's metrics through the trainer's own writer: 4 steps, evaluations at 0, 2, 4."""
    with MetricsWriter(logs, sinks=("jsonl",)) as writer:
        for step in (0, 2, 4):
            evaluation = {"eval/avg_at_k": 0.1 * step + offset, "eval/k": 4.0,
                          "eval/best_at_k": 0.15 * step + offset}  # fmt: skip
            if named_set:
                evaluation |= {"eval/aime/avg_at_k": 0.05 * step, "eval/aime/k": 1.0,
                               "eval/aime/best_at_k": 0.05 * step}  # fmt: skip
            writer.log(step, evaluation, kind="eval")
            if step == 4:
                break
            for inner in (step + 1, step + 2):
                record: dict[str, float] = {"loss": 1.0 / inner + offset, "lr": 1e-3}
                if layers:
                    for layer in (1, 2):
                        record[f"rep/loss/layer_{layer}"] = 0.5 / (inner * layer)
                        record[f"rep/cosine_similarity/layer_{layer}"] = 1 - 0.1 / inner
                if inner == 3:
                    record["loss"] = math.nan  # a skipped step reads back as null
                writer.log(inner, record)
    return logs / "metrics.jsonl"


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _series(records: list[dict[str, Any]], kind: str, key: str) -> tuple[list[int], list[float]]:
    rows = [r for r in records if r["kind"] == kind and key in r]
    return [r["step"] for r in rows], [math.nan if r[key] is None else r[key] for r in rows]


def _lines(ax: Any) -> dict[str, tuple[list[float], list[float]]]:
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.lines}


def _same(actual: tuple[list[float], list[float]], expected: tuple[list[int], list[float]]):
    assert actual[0] == expected[0]
    assert actual[1] == pytest.approx(expected[1], nan_ok=True)


def test_runs_side_by_side(tmp_path: Path) -> None:
    oprd = _write_run(tmp_path / "oprd" / "logs", 0.0, layers=True, named_set=True)
    opd = _write_run(tmp_path / "opd-top1" / "logs", 0.01, layers=False)
    # A run folder and a logs folder are both accepted.
    figure = build_figure([tmp_path / "oprd", tmp_path / "opd-top1" / "logs"])
    accuracy, loss, layer_loss, layer_cosine = figure.axes
    ours, theirs = _records(oprd), _records(opd)

    lines = _lines(accuracy)
    assert sorted(lines) == [
        "opd-top1 Avg@4", "opd-top1 Best@4", "oprd Avg@4", "oprd Best@4", "oprd aime Avg@1",
    ]  # fmt: skip
    for name, records in (("oprd", ours), ("opd-top1", theirs)):
        steps, values = _series(records, "eval", "eval/avg_at_k")
        _same(lines[f"{name} Avg@4"], (steps, [100 * v for v in values]))
        steps, values = _series(records, "eval", "eval/best_at_k")
        _same(lines[f"{name} Best@4"], (steps, [100 * v for v in values]))
    steps, values = _series(ours, "eval", "eval/aime/avg_at_k")
    _same(lines["oprd aime Avg@1"], (steps, [100 * v for v in values]))

    lines = _lines(loss)
    _same(lines["oprd"], _series(ours, "train", "loss"))
    _same(lines["opd-top1"], _series(theirs, "train", "loss"))
    assert math.isnan(lines["oprd"][1][2])  # step 3's null stays a gap

    assert sorted(_lines(layer_loss)) == ["oprd layer 1", "oprd layer 2"]  # OPD has none
    for layer in (1, 2):
        _same(_lines(layer_loss)[f"oprd layer {layer}"],
              _series(ours, "train", f"rep/loss/layer_{layer}"))  # fmt: skip
        _same(_lines(layer_cosine)[f"oprd layer {layer}"],
              _series(ours, "train", f"rep/cosine_similarity/layer_{layer}"))  # fmt: skip


def test_several_teachers_per_layer_per_teacher(tmp_path: Path) -> None:
    """A run with several teachers logs its per-layer alignment only per teacher
    (``teacher/NAME/rep/...``): each teacher's layers are drawn, named."""
    logs = tmp_path / "routed" / "logs"
    with MetricsWriter(logs, sinks=("jsonl",)) as writer:
        for step in (1, 2):
            record = {"loss": 1.0 / step, "rep/cosine_similarity": 0.5}
            for teacher in ("add", "fwd"):
                record[f"teacher/{teacher}/rep/loss/layer_1"] = 0.3 * step
                record[f"teacher/{teacher}/rep/cosine_similarity/layer_1"] = 0.2 * step
            writer.log(step, record)
    records = _records(logs / "metrics.jsonl")
    figure = build_figure([tmp_path / "routed"])
    assert sorted(_lines(figure.axes[2])) == ["add layer 1", "fwd layer 1"]
    for teacher in ("add", "fwd"):
        for ax, metric in ((figure.axes[2], "loss"), (figure.axes[3], "cosine_similarity")):
            key = f"teacher/{teacher}/rep/{metric}/layer_1"
            _same(_lines(ax)[f"{teacher} layer 1"], _series(records, "train", key))


def _band(ax: Any, index: int) -> dict[float, tuple[float, float]]:
    """The lowest and highest y of the ``index``-th filled band at each x."""
    vertices = ax.collections[index].get_paths()[0].vertices
    band: dict[float, list[float]] = {}
    for x, y in vertices:
        band.setdefault(float(x), []).append(float(y))
    return {x: (min(ys), max(ys)) for x, ys in band.items()}


def test_a_group_is_its_mean_with_a_band_from_lowest_to_highest(tmp_path: Path) -> None:
    """``--group``: the seeds of a setting drawn as one line, their mean at every step all of
    them logged (NaN left out), with a band between the lowest and the highest seed."""
    offsets = (0.0, 0.2, 0.05)
    seeds = [_write_run(tmp_path / f"s{i}" / "logs", o, layers=True) for i, o in enumerate(offsets)]
    short = tmp_path / "short" / "logs"
    with MetricsWriter(short, sinks=("jsonl",)) as writer:  # a run that stopped at step 2
        writer.log(0, {"eval/avg_at_k": 0.5, "eval/k": 4.0, "eval/best_at_k": 0.5}, kind="eval")
        for step in (1, 2):
            writer.log(step, {"loss": 2.0})
        writer.log(2, {"eval/avg_at_k": 0.7, "eval/k": 4.0, "eval/best_at_k": 0.7}, kind="eval")
    _write_run(tmp_path / "single" / "logs", 0.3, layers=False)
    runs = ",".join(str(tmp_path / f"s{i}") for i in range(3))
    figure = build_figure(
        [tmp_path / "single"], [f"seeds={runs}", f"with short={tmp_path / 's0'},{short.parent}"]
    )
    accuracy, loss, layer_loss, _ = figure.axes
    each = [_records(path) for path in seeds]

    def mean(kind: str, key: str) -> tuple[list[int], list[float]]:
        steps = _series(each[0], kind, key)[0]
        columns = [_series(records, kind, key)[1] for records in each]
        values = []
        for row in zip(*columns, strict=True):
            finite = [v for v in row if not math.isnan(v)]
            values.append(sum(finite) / len(finite) if finite else math.nan)
        return steps, values

    lines = _lines(accuracy)
    steps, values = mean("eval", "eval/avg_at_k")
    _same(lines["seeds (mean of 3) Avg@4"], (steps, [100 * v for v in values]))
    band = _band(accuracy, 0)  # the single run has none; the groups' come in their order
    for step in steps:
        at = [_series(records, "eval", "eval/avg_at_k")[1][steps.index(step)] for records in each]
        assert band[step] == pytest.approx((100 * min(at), 100 * max(at)))
    _same(_lines(loss)["seeds (mean of 3)"], mean("train", "loss"))
    assert math.isnan(_lines(loss)["seeds (mean of 3)"][1][2])  # every seed skipped step 3
    _same(_lines(layer_loss)["seeds (mean of 3) layer 2"], mean("train", "rep/loss/layer_2"))
    # With a shorter member: only the steps both logged; the single run as it is.
    _same(lines["with short (mean of 2) Avg@4"], ([0, 2], [25.0, 45.0]))
    _same(lines["single Avg@4"], ([0, 2, 4], [30.0, 50.0, 70.0]))


def test_bad_groups_are_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _write_run(tmp_path / "run" / "logs", 0.0, layers=False)
    out = tmp_path / "out.png"
    for spec, needle in (
        ("no-label", "--group 'no-label': expected LABEL=RUN[,RUN...]"),
        ("a=", "--group 'a=': expected LABEL=RUN[,RUN...]"),
        (f"a={tmp_path / 'missing'}", "missing: no such file or directory"),
    ):
        assert main(["plot", "--group", spec, "-o", str(out)]) == 2
        assert needle in capsys.readouterr().err
    assert main(["plot", "-o", str(out)]) == 2
    assert "nothing to draw" in capsys.readouterr().err
    assert not out.exists()
    assert main(["plot", "--group", f"a={tmp_path / 'run'}", "-o", str(out)]) == 0
    assert out.read_bytes().startswith(PNG_MAGIC)


def test_one_run_names_layers_only(tmp_path: Path) -> None:
    _write_run(tmp_path / "run" / "logs", 0.0, layers=True)
    figure = build_figure([tmp_path / "run" / "logs" / "metrics.jsonl"])
    assert sorted(_lines(figure.axes[2])) == ["layer 1", "layer 2"]


def test_bridge_report(tmp_path: Path) -> None:
    fits = [
        {"student_layer": s, "teacher_layer": 2 * s, "rank": r, "explained_variance": r / 16,
         "cosine_before": 0.01 * r, "cosine_after": 1 - 1 / (r + s), "best_epoch": 3}
        for s in (1, 2) for r in (16, 1, 4)
    ]  # fmt: skip
    report = tmp_path / "bridge" / "report.json"
    report.parent.mkdir()
    report.write_text(json.dumps({"ranks": [1, 4, 16], "fits": fits}), encoding="utf-8")
    cosine, explained = build_figure([report]).axes
    lines = _lines(cosine)
    for s in (1, 2):
        name = f"student {s} -> teacher {2 * s}"
        rows = sorted((f for f in fits if f["student_layer"] == s), key=lambda f: f["rank"])
        ranks = [f["rank"] for f in rows]
        _same(lines[f"{name} (fitted)"], (ranks, [f["cosine_after"] for f in rows]))
        _same(lines[f"{name} (before)"], (ranks, [f["cosine_before"] for f in rows]))
        _same(_lines(explained)[name], (ranks, [f["explained_variance"] for f in rows]))
    assert cosine.get_xscale() == "log"


def _bench(impl: str, tokens: int, ms: float, mib: float, error: str = "") -> dict[str, Any]:
    case = Case(impl, "forward+backward", tokens, 64, 128, "float32", True, 0.0, "cpu", 1, 3)
    return asdict(
        Result(
            case,
            median_ms=ms,
            tflops=0.1,
            peak_above_inputs_mib=mib,
            peak_above_inputs_and_grads_mib=mib + 1,
            error=error,
        )
    )


def test_kernel_benchmark(tmp_path: Path) -> None:
    results = [
        _bench("naive", 2048, 8.0, 80.0), _bench("torch", 1024, 3.0, 10.0),
        _bench("naive", 1024, 4.0, 40.0), _bench("torch", 2048, 6.0, 11.0),
        _bench("triton", 1024, 0.0, 0.0, error="no CUDA"),
    ]  # fmt: skip
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps(results), encoding="utf-8")
    time_ax, memory_ax = build_figure([path]).axes
    assert sorted(_lines(time_ax)) == ["naive", "torch"]  # the failed case is left out
    _same(_lines(time_ax)["naive"], ([1024, 2048], [4.0, 8.0]))
    _same(_lines(time_ax)["torch"], ([1024, 2048], [3.0, 6.0]))
    _same(_lines(memory_ax)["naive"], ([1024, 2048], [40.0, 80.0]))
    _same(_lines(memory_ax)["torch"], ([1024, 2048], [10.0, 11.0]))


def test_command_writes_and_keeps_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _write_run(tmp_path / "run" / "logs", 0.0, layers=True)
    out = tmp_path / "figs" / "run.png"
    assert main(["plot", str(tmp_path / "run"), "-o", str(out)]) == 0
    assert out.read_bytes().startswith(PNG_MAGIC)
    out.write_bytes(b"keep")
    assert main(["plot", str(tmp_path / "run"), "-o", str(out)]) == 2
    assert "run.png exists; pass --force" in capsys.readouterr().err
    assert out.read_bytes() == b"keep"
    assert main(["plot", str(tmp_path / "run"), "-o", str(out), "--force"]) == 0
    assert out.read_bytes().startswith(PNG_MAGIC)
    assert sorted(p.name for p in out.parent.iterdir()) == ["run.png"]  # no temp file left
    plain = tmp_path / "plain"
    plain.write_text("made by open")  # the permissions of any file made here
    assert out.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777


def test_bad_inputs_are_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    empty_run = tmp_path / "empty_run"
    empty_run.mkdir()
    out = tmp_path / "out.png"
    assert main(["plot", str(empty_run), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert (
        f"{empty_run}: no metrics file" in err and str(empty_run / "logs" / "metrics.jsonl") in err
    )
    assert not out.exists()
    (empty_run / "metrics.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(PlotInputError, match=r"empty_run/metrics.jsonl: no training or evaluation"):
        build_figure([empty_run])
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"a": 1}), encoding="utf-8")
    with pytest.raises(PlotInputError, match=r"other.json: neither a run"):
        build_figure([other])
    bench = tmp_path / "b.json"
    bench.write_text(json.dumps([_bench("naive", 1024, 1.0, 1.0)]), encoding="utf-8")
    _write_run(tmp_path / "run" / "logs", 0.0, layers=False)
    with pytest.raises(PlotInputError, match=r"one kind of input at a time"):
        build_figure([tmp_path / "run", bench])
    with pytest.raises(PlotInputError, match=r"nowhere.json: no such file"):
        build_figure([tmp_path / "nowhere.json"])


def test_an_unwritable_output_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _write_run(tmp_path / "run" / "logs", 0.0, layers=False)
    assert main(["plot", str(tmp_path / "run"), "-o", "/proc/oprd-plot/x.png"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: -o /proc/oprd-plot/x.png: cannot write it: ")
    assert err.count("\n") == 1 and "Traceback" not in err
