"""The OPD baseline sweep's tables (docs/baselines.md) from its runs' metrics.

    python tools/sweep_table.py RUNS_DIR [--teacher RUNS_DIR/teacher_eval.json]

Reads every run under RUNS_DIR whose saved config (``RUN/logs/config.yaml``) trains an OPD
baseline (``scripts/opd_sweep.sh`` makes them) and prints markdown: the held-out accuracy of
each method and peak learning rate at every evaluation, its final and best value, the best
rate per method (highest final accuracy, then highest best), and the OPD training signals at the
start and end of each run (loss, the sampled-token log-prob gap, entropies); with
``--best-runs``, only the best run's folder per method. Runs must share one budget (steps and
evaluation steps); a run that does not is named in the error.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from oprd_mega.train.metrics import read_metrics  # noqa: E402
from tools.quickstart_summary import KEY, evaluations, format_rate, run_config  # noqa: E402

# Per-step training metrics of an OPD run: (record key, column title).
SIGNALS = (
    ("loss", "loss"),
    ("opd/reward", "log p_S - log p_T (sampled)"),
    ("opd/student_entropy", "student entropy"),
    ("opd/teacher_entropy", "teacher entropy"),
    ("opd/top16_overlap", "top-16 overlap"),
)


@dataclass(frozen=True)
class SweepRun:
    """One baseline run: its method label ('opd-top1', 'opd-top16'), peak rate and metrics."""

    name: str
    method: str
    lr: float
    steps: int
    curve: list[tuple[int, float]]
    train: list[dict[str, Any]]

    @property
    def final(self) -> float:
        return self.curve[-1][1]

    @property
    def best(self) -> tuple[int, float]:
        """``(step, accuracy)`` of the best evaluation (the earliest among equals)."""
        return max(self.curve, key=lambda point: (point[1], -point[0]))


def load_runs(root: str | Path) -> list[SweepRun]:
    """The OPD runs under ``root``, by method then rate; an error if there is none."""
    runs = []
    for config_file in sorted(Path(root).glob("*/logs/config.yaml")):
        logs = config_file.parent
        config = run_config(logs)
        distillation = config.distillation
        if distillation.method not in ("opd-top1", "opd-topk"):
            continue
        method = "opd-top1" if distillation.method == "opd-top1" else f"opd-top{distillation.top_k}"
        runs.append(
            SweepRun(
                name=logs.parent.name,
                method=method,
                lr=config.optimizer.lr,
                steps=config.schedule.steps,
                curve=evaluations(logs),
                train=read_metrics(logs, kind="train"),
            )
        )
    if not runs:
        raise SystemExit(f"error: {root} has no OPD runs (RUN/logs/config.yaml with method opd-*)")
    check_same_budget(runs)
    return sorted(runs, key=lambda run: (run.method, run.lr))


def check_same_budget(runs: Sequence[SweepRun]) -> None:
    """Every run finished its steps and has the first run's steps and evaluation steps."""
    for run in runs:
        last = run.curve[-1][0]
        if last != run.steps:
            raise SystemExit(
                f"error: run {run.name} stopped before its last step ({run.steps}): its last "
                f"evaluation is at step {last}"
            )
    first = runs[0]
    first_steps = [step for step, _ in first.curve]
    for run in runs:
        eval_steps = [step for step, _ in run.curve]
        if run.steps != first.steps or eval_steps != first_steps:
            raise SystemExit(
                f"error: run {run.name} has {run.steps} steps, evaluations at {eval_steps}; "
                f"run {first.name} has {first.steps}, at {first_steps}"
            )


def best_runs(runs: Sequence[SweepRun]) -> dict[str, SweepRun]:
    """Per method, the run with the highest final accuracy (then the highest best)."""
    best: dict[str, SweepRun] = {}
    for run in runs:
        current = best.get(run.method)
        if current is None or (run.final, run.best[1]) > (current.final, current.best[1]):
            best[run.method] = run
    return best


def _percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def accuracy_table(runs: Sequence[SweepRun]) -> str:
    """Held-out accuracy (``eval/avg_at_k``) per method and rate at every evaluation."""
    steps = [step for step, _ in runs[0].curve]
    header = ["run", "method", "peak lr", *(f"step {s}" for s in steps), "final", "best (step)"]
    lines = [_row(header), _row(["---"] * len(header))]
    for run in runs:
        best_step, best_value = run.best
        lines.append(
            _row(
                [
                    run.name,
                    run.method,
                    format_rate(run.lr),
                    *(_percent(value) for _, value in run.curve),
                    f"**{_percent(run.final)}**",
                    f"{_percent(best_value)} ({best_step})",
                ]
            )
        )
    return "\n".join(lines)


def _window_mean(records: Sequence[dict[str, Any]], key: str) -> str:
    values = [float(r[key]) for r in records if r.get(key) is not None]
    return f"{fmean(values):.3f}" if values else "-"


def signal_table(runs: Sequence[SweepRun], window: int) -> str:
    """Mean of each training signal over a run's first and last ``window`` steps."""
    header = ["run", *(title for _, title in SIGNALS)]
    lines = [_row(header), _row(["---"] * len(header))]
    for run in runs:
        first, last = run.train[:window], run.train[-window:]
        cells = [f"{_window_mean(first, key)} -> {_window_mean(last, key)}" for key, _ in SIGNALS]
        lines.append(_row([run.name, *cells]))
    return "\n".join(lines)


def report(runs: Sequence[SweepRun], teacher: float | None, window: int) -> str:
    """The markdown the sweep prints: both tables and the best rate per method."""
    budget = f"{runs[0].steps} steps"
    parts = [f"Held-out accuracy ({KEY}), {budget} per run:", "", accuracy_table(runs), ""]
    if teacher is not None:
        parts += [f"Teacher: {_percent(teacher)}.", ""]
    for method, run in best_runs(runs).items():
        best_step, best_value = run.best
        parts.append(
            f"Best {method}: peak lr {format_rate(run.lr)} (final {_percent(run.final)}, "
            f"best {_percent(best_value)} at step {best_step})."
        )
    parts += [
        "",
        f"Training signals, mean over the first {window} steps -> the last {window}:",
        "",
        signal_table(runs, window),
    ]
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", help="folder holding the sweep's runs (QUICKSTART_DIR)")
    parser.add_argument("--teacher", help="JSON of `oprd-mega evaluate --json` on the teacher")
    parser.add_argument(
        "--window", type=int, default=25, help="steps averaged for the training signals"
    )
    parser.add_argument(
        "--best-runs",
        action="store_true",
        help="print only the folder of each method's best run, one per line (for `plot`)",
    )
    args = parser.parse_args(argv)
    runs = load_runs(args.root)
    if args.best_runs:
        for run in best_runs(runs).values():
            print(Path(args.root) / run.name)
        return 0
    teacher = None
    if args.teacher:
        teacher = float(json.loads(Path(args.teacher).read_text(encoding="utf-8"))[KEY])
    print(report(runs, teacher, args.window))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
