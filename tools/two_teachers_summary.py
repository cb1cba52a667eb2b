"""The summary of scripts/two_teachers.sh: each run's held-out accuracy per task, first and last.

    python tools/two_teachers_summary.py --accuracy OUT/models/accuracy.json RUN_DIR...

prints the models' accuracies the toy task recorded (``two_tasks`` in ``accuracy.json``), then
one line per run (its folder's name):
``NAME  held-out accuracy: add B% -> A%, fwd B% -> A% (steps S0 -> S1)``
from the run's ``eval/add/avg_at_k`` and ``eval/fwd/avg_at_k`` at its first and last evaluation.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from oprd_mega.train.metrics import read_metrics

TASKS = ("add", "fwd")


def run_line(run: Path) -> str:
    """One run's line: per task, Avg@k at its first and last evaluation."""
    key = f"eval/{TASKS[0]}/avg_at_k"
    records = [r for r in read_metrics(run / "logs", kind="eval") if key in r]
    if not records:
        raise SystemExit(f"error: {run}/logs has no evaluation records of the tasks {TASKS}")
    first, last = records[0], records[-1]
    cells = [
        f"{task} {100 * first[f'eval/{task}/avg_at_k']:.1f}% -> "
        f"{100 * last[f'eval/{task}/avg_at_k']:.1f}%"
        for task in TASKS
    ]
    steps = f"(steps {first['step']} -> {last['step']})"
    return f"{run.name:<11} held-out accuracy: {', '.join(cells)} {steps}"


def model_lines(path: Path) -> list[str]:
    """The toy task's models' accuracies on both tasks (``two_tasks`` of ``accuracy.json``)."""
    report = json.loads(path.read_text(encoding="utf-8"))["two_tasks"]["accuracy"]
    return [
        f"{name:<11} held-out accuracy: "
        + ", ".join(f"{task} {100 * by_task[task]:.1f}%" for task in TASKS)
        for name, by_task in report.items()
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--accuracy", type=Path, required=True, help="models/accuracy.json")
    parser.add_argument("runs", type=Path, nargs="+", help="run folders")
    args = parser.parse_args(argv)
    for line in model_lines(args.accuracy):
        print(line)
    for run in args.runs:
        print(run_line(run))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
