"""Readable logs: the ``oprd_mega`` logger, one text line per training step, and progress.

Events go through :mod:`logging` with timestamps and levels; rank 0 logs from ``--log-level``
up, the other ranks only warnings and errors (prefixed with their rank). Each training step
writes one line in the manner of Megatron's ``iteration N | lm loss | grad norm | lr``. Long
work inside a step (rollouts, evaluation) and ``oprd-mega evaluate`` report progress: a bar on
a terminal, a line every ``interval_s`` seconds otherwise (cluster logs).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Mapping
from types import TracebackType
from typing import IO, Any

from tqdm.auto import tqdm

LOGGER_NAME = "oprd_mega"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMAT = "%(asctime)s %(levelname)s [oprd-mega%(rank)s] %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"

logger = logging.getLogger(LOGGER_NAME)


class _RankFilter(logging.Filter):
    """Adds ``rank`` (empty on rank 0, `` rank N`` elsewhere) to every record."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = "" if rank == 0 else f" rank {rank}"

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return True


def setup_logging(
    level: str = "INFO", rank: int | None = None, stream: IO[str] | None = None
) -> None:
    """Send the ``oprd_mega`` logger to ``stream`` (standard output) with timestamps and levels.

    ``rank`` (default: the ``RANK`` environment variable, else 0): rank 0 logs from ``level``
    up, other ranks from WARNING up. Calling it again replaces the earlier set-up.
    """
    if level.upper() not in LEVELS:
        raise ValueError(f"--log-level {level!r}: use one of {', '.join(LEVELS)}")
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(logging.Formatter(LOG_FORMAT, DATE_FORMAT))
    handler.addFilter(_RankFilter(rank))
    for old in list(logger.handlers):
        logger.removeHandler(old)
    logger.addHandler(handler)
    chosen = logging.getLevelName(level.upper())
    logger.setLevel(chosen if rank == 0 else max(chosen, logging.WARNING))
    logger.propagate = False


def ensure_logging() -> None:
    """:func:`setup_logging` with its defaults, unless the logger already has a handler."""
    if not logger.handlers:
        setup_logging()


def add_log_level_argument(parser: Any) -> None:
    """The ``--log-level`` flag of the commands that log."""
    parser.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=LEVELS,
        help="least severe log level shown on rank 0 (other ranks: WARNING); default INFO",
    )


def _number(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "nan" if value is not None else "-"
    return format(value, spec)


class StepLog:
    """The per-step text line; counts skipped steps itself (since this launch)."""

    PHASES = ("rollout", "teacher", "student", "sync")

    def __init__(self, total_steps: int) -> None:
        self.total_steps = total_steps
        self.skipped = 0

    def line(self, step: int, record: Mapping[str, Any]) -> str:
        """``step 12/300 | loss 0.1234 | grad norm 0.5 | lr 1.00e-03 | tokens/s 1234 | time
        rollout 1.20 s, teacher 0.30 s, student 0.80 s, sync 0.10 s | response length 5.2 |
        skipped 0`` from the trainer's step record."""
        self.skipped += int(record.get("skipped", 0) or 0)
        times = ", ".join(
            f"{phase} {_number(record.get(f'time/{phase}'), '.2f')} s" for phase in self.PHASES
        )
        width = len(str(self.total_steps))
        return " | ".join(
            [
                f"step {step:{width}d}/{self.total_steps}",
                f"loss {_number(record.get('loss'), '.4g')}",
                f"grad norm {_number(record.get('grad_norm'), '.3g')}",
                f"lr {_number(record.get('lr'), '.3e')}",
                f"tokens/s {_number(record.get('tokens_per_s'), '.0f')}",
                f"time {times}",
                f"response length {_number(record.get('response_length/mean'), '.1f')}",
                f"skipped {self.skipped}",
            ]
        )


class Progress:
    """Progress of ``total`` units of work: a tqdm bar when ``stream`` is a terminal, else a
    log line at most every ``interval_s`` seconds (and a last one when any was written)."""

    def __init__(
        self,
        total: int,
        desc: str,
        unit: str = "it",
        interval_s: float = 30.0,
        stream: IO[str] | None = None,
        enabled: bool = True,
    ) -> None:
        self.total, self.desc, self.unit, self.interval_s = total, desc, unit, interval_s
        self.done = 0
        self.lines = 0
        stream = stream or sys.stderr
        self.start = self.last = time.monotonic()
        terminal = enabled and hasattr(stream, "isatty") and stream.isatty()
        self.bar = tqdm(
            total=total, desc=desc, unit=unit, file=stream, leave=False, dynamic_ncols=True
        ) if terminal else None  # fmt: skip
        self.enabled = enabled

    def update(self, n: int = 1) -> None:
        """``n`` more units done."""
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if self.enabled and now - self.last >= self.interval_s:
            self.last = now
            self._line(now)

    def _line(self, now: float) -> None:
        self.lines += 1
        percent = 100 * self.done / self.total if self.total else 100.0
        logger.info(
            f"{self.desc}: {self.done}/{self.total} {self.unit}s ({percent:.0f}%) in "
            f"{now - self.start:.0f} s"
        )

    def close(self) -> None:
        """Close the bar, or write the last line when periodic lines were written."""
        if self.bar is not None:
            self.bar.close()
        elif self.lines:
            self._line(time.monotonic())

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
