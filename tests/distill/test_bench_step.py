"""tools/bench_step.py with a paper preset, shrunk to CPU size: the report and its MFU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from oprd_mega.data.microbatches import model_dims
from oprd_mega.models.hf_config import parse_hf_config
from oprd_mega.models.presets import preset, scaled
from oprd_mega.train.throughput import training_flops

TOOL = Path(__file__).resolve().parents[2] / "tools" / "bench_step.py"


def test_preset_run_reports_ratios_throughput_and_mfu(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    argv = [
        "--preset", "qwen3-8b-1.7b", "--scale", "0.0625", "--vocab", "256",
        "--sequences", "2", "--micro-batch-size", "1", "--seq-len", "48", "--prompt-len", "16",
        "--last-k", "8", "--steps", "1", "--methods", "oprd,oprd-overlap,opd-top16",
        "--peak-tflops", "0.5", "--recompute", "full", "--json", str(out),
    ]  # fmt: skip
    result = subprocess.run(
        [sys.executable, str(TOOL), *argv], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "# shape: Qwen3-8B -> Qwen3-1.7B x0.0625, 2 x 48 tokens, recompute full" in (
        result.stdout
    )
    assert "# dpeak per rank (MiB, cpu peak resident set size" in result.stdout
    assert result.stdout.strip().splitlines()[-1].startswith("ratio oprd/opd-top16 time=")
    assert "ratio oprd-overlap/oprd time=" in result.stdout
    report = json.loads(out.read_text())["results"]
    # The student's FLOPs, from transformers-free arithmetic on the scaled published shape.
    student = parse_hf_config(scaled(preset("qwen3-8b-1.7b").student, 0.0625, vocab_size=256))
    flops = training_flops(model_dims(student), [48, 48])
    assert report["oprd-overlap"]["overlap_teacher"] and not report["oprd"]["overlap_teacher"]
    for method in ("oprd", "oprd-overlap", "opd-top16"):
        row = report[method]
        assert row["student_tflops"] == pytest.approx(flops / 1e12)
        assert row["tokens_per_s"] == pytest.approx(96 / row["time"])
        assert row["mfu"] == pytest.approx(flops / row["time"] / 0.5e12)
        assert 0 < row["teacher_time"] < row["time"]
        assert row["dtype"] == "float32" and row["rank"] == 0
        assert row["recompute"] == "full" and row["dpeak_per_rank"] == [row["dpeak"]]


def test_bad_arguments_are_refused_by_name() -> None:
    result = subprocess.run(
        [sys.executable, str(TOOL), "--scale", "0.5"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2 and "--scale needs --preset" in result.stderr


def test_two_ranks_with_the_teacher_on_its_own_layout_report_every_rank(tmp_path: Path) -> None:
    """Student TP2 with the teacher at TP1 x DP2: one torchrun launch per method."""
    out = tmp_path / "bench.json"
    argv = [
        "--nproc", "2", "--tp", "2", "--teacher-tp", "1", "--methods", "oprd",
        "--layers", "2", "--hidden", "64", "--heads", "8", "--vocab", "512",
        "--seq-len", "64", "--prompt-len", "32", "--last-k", "16", "--steps", "1",
        "--json", str(out),
    ]  # fmt: skip
    temp = tmp_path / "tmp"  # the launches' temporary folders: none is left behind
    temp.mkdir()
    result = subprocess.run(
        [sys.executable, str(TOOL), *argv],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TMPDIR": str(temp)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert list(temp.iterdir()) == []
    assert "layout TP2PP1 (teacher TP1PP1) on 2 rank(s)" in result.stdout
    row = json.loads(out.read_text())["results"]["oprd"]
    assert row["layout"] == "TP2PP1 (teacher TP1PP1)" and row["rank"] == 0
    assert len(row["dpeak_per_rank"]) == 2 and row["dpeak"] == row["dpeak_per_rank"][0]
    assert 0 < row["teacher_time"] < row["time"]
    assert row["tokens_per_s"] == pytest.approx(2 * 64 / row["time"])


def test_a_second_teacher_runs_on_every_microbatch_or_on_those_routed_to_it(
    tmp_path: Path,
) -> None:
    """Two teachers on all 4 microbatches, then each on every other one: each teacher's share
    is counted by the step itself (16 supervised tokens a sequence)."""
    out = tmp_path / "bench.json"
    argv = [
        "--layers", "2", "--hidden", "64", "--heads", "8", "--vocab", "512",
        "--sequences", "4", "--micro-batch-size", "1", "--seq-len", "64", "--prompt-len", "32",
        "--last-k", "16", "--steps", "1", "--json", str(out),
        "--methods", "oprd,oprd-2teachers,oprd-2teachers-routed",
    ]  # fmt: skip
    result = subprocess.run(
        [sys.executable, str(TOOL), *argv], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())["results"]
    assert list(report["oprd"]["teachers"]) == ["teacher"]
    both, routed = report["oprd-2teachers"]["teachers"], report["oprd-2teachers-routed"]["teachers"]
    for name in ("teacher_a", "teacher_b"):
        assert both[name]["supervised_tokens"] == 64 and both[name]["microbatches"] == 4
        assert routed[name]["supervised_tokens"] == 32 and routed[name]["microbatches"] == 2
        assert 0 < routed[name]["time"] <= report["oprd-2teachers-routed"]["teacher_time"]
    for name in ("oprd-2teachers", "oprd-2teachers-routed"):
        assert f"ratio {name}/oprd time=" in result.stdout


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--nproc", "3", "--tp", "2"], "--nproc 3 with --tp/--pp/--cp/--sp"),
        (["--nproc", "2", "--teacher-tp", "3"], "world size 2 is not divisible by tp*pp*cp = 3"),
        (["--nproc", "2", "--cp", "2", "--seq-len", "66", "--prompt-len", "8"], "--seq-len (66)"),
        (["--nproc", "2", "--tp", "2", "--heads", "4"], "--tp 2: must divide the student's"),
        (["--nproc", "4", "--sequences", "2", "--methods", "oprd"], "--sequences 2 must be"),
        (
            ["--sequences", "2", "--methods", "oprd,oprd-2teachers-routed"],
            "--methods oprd-2teachers-routed routes each microbatch to one teacher: it needs at "
            "least 2 microbatches per data-parallel replica (got 1;",
        ),
    ],
)
def test_bad_layouts_are_refused_by_flag_before_any_launch(argv: list[str], message: str) -> None:
    result = subprocess.run(
        [sys.executable, str(TOOL), *argv], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2 and message in result.stderr, result.stderr[-1000:]
