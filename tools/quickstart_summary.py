"""The CPU quickstart's summary line from its two runs' metrics and the teacher's evaluation.

    python tools/quickstart_summary.py --oprd RUN/oprd/logs --opd RUN/opd-top1/logs \
        --teacher RUN/teacher_eval.json

prints (last line, read by checks):
``quickstart: teacher T%, student before B% -> after A% (gap closed G%); opd-top1 (lr R) after O%``
where B and A are the OPRD run's first and last held-out Avg@k, O the OPD top-1 run's last,
R its peak learning rate (from its saved config) and G = (A - B) / (T - B).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from oprd_mega.config import ConfigError, TrainConfig, load_config
from oprd_mega.train.metrics import read_metrics

KEY = "eval/avg_at_k"


def evaluations(logs: str | Path) -> list[tuple[int, float]]:
    """``(step, Avg@k)`` of every evaluation a run logged, in order."""
    out = [(int(r["step"]), float(r[KEY])) for r in read_metrics(logs, kind="eval")]
    if not out:
        raise SystemExit(f"error: {logs} has no evaluation records ({KEY})")
    return out


def run_config(logs: str | Path) -> TrainConfig:
    """The config a run saved in its metrics directory (``logs/config.yaml``)."""
    path = Path(logs) / "config.yaml"
    if not path.is_file():
        raise SystemExit(f"error: {path} does not exist (the run saves its config there)")
    try:
        return load_config(path)
    except ConfigError as exc:
        raise SystemExit(f"error: {path}: {exc}") from exc


def format_rate(lr: float) -> str:
    """A learning rate as written in configs and docs: 0.0003 -> '3e-4', 0.00025 -> '2.5e-4'."""
    mantissa, exponent = f"{lr:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def gap_closed(teacher: float, before: float, after: float) -> float:
    """Fraction of the student's gap to the teacher closed (1.0 = reached the teacher)."""
    if teacher <= before:
        raise SystemExit(
            f"error: the student ({100 * before:.1f}%) is not behind the teacher "
            f"({100 * teacher:.1f}%); there is no gap to close"
        )
    return (after - before) / (teacher - before)


def summary_line(
    teacher: float, oprd: list[tuple[int, float]], opd: list[tuple[int, float]], opd_lr: float
) -> str:
    """The quickstart's summary line (percentages with one decimal)."""
    before, after = oprd[0][1], oprd[-1][1]
    gap = gap_closed(teacher, before, after)
    return (
        f"quickstart: teacher {100 * teacher:.1f}%, student before {100 * before:.1f}% -> "
        f"after {100 * after:.1f}% (gap closed {100 * gap:.1f}%); "
        f"opd-top1 (lr {format_rate(opd_lr)}) after {100 * opd[-1][1]:.1f}%"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Print each run's evaluation curve, then the summary line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--oprd", required=True, help="metrics directory of the OPRD run")
    parser.add_argument("--opd", required=True, help="metrics directory of the OPD top-1 run")
    parser.add_argument("--teacher", required=True, help="JSON of `oprd-mega evaluate --json`")
    args = parser.parse_args(argv)
    teacher = float(json.loads(Path(args.teacher).read_text(encoding="utf-8"))[KEY])
    oprd, opd = evaluations(args.oprd), evaluations(args.opd)
    for name, curve in (("oprd", oprd), ("opd-top1", opd)):
        points = ", ".join(f"step {step}: {100 * value:.1f}%" for step, value in curve)
        print(f"{name:9s} held-out accuracy: {points}")
    print(summary_line(teacher, oprd, opd, run_config(args.opd).optimizer.lr))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
