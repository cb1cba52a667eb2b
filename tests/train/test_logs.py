"""Logging set-up, the per-step line and progress, against hand-written expectations."""

from __future__ import annotations

import io
import logging
import re

import pytest

from oprd_mega.train.logs import Progress, StepLog, logger, setup_logging

STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"


@pytest.fixture(autouse=True)
def restore_logger():
    handlers, level, propagate = list(logger.handlers), logger.level, logger.propagate
    # Start from logging's defaults: an earlier test's setup_logging() leaves the logger
    # non-propagating, and pytest then attaches its capture handlers to it directly as well.
    logger.handlers.clear()
    logger.propagate = True
    yield
    logger.handlers[:] = handlers
    logger.setLevel(level)
    logger.propagate = propagate


def test_rank0_logs_with_timestamp_and_level() -> None:
    stream = io.StringIO()
    setup_logging("info", rank=0, stream=stream)
    logger.debug("hidden")
    logger.info("checkpoint saved")
    logger.warning("careful")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert re.fullmatch(rf"{STAMP} INFO \[oprd-mega\] checkpoint saved", lines[0])
    assert re.fullmatch(rf"{STAMP} WARNING \[oprd-mega\] careful", lines[1])
    setup_logging("DEBUG", rank=0, stream=stream)  # replaces, does not add, a handler
    logger.debug("now shown")
    assert len(logger.handlers) == 1 and stream.getvalue().endswith("DEBUG [oprd-mega] now shown\n")


def test_other_ranks_log_warnings_only() -> None:
    stream = io.StringIO()
    setup_logging("DEBUG", rank=3, stream=stream)
    logger.info("not from rank 3")
    logger.error("broken")
    assert re.fullmatch(rf"{STAMP} ERROR \[oprd-mega rank 3\] broken\n", stream.getvalue())


def test_unknown_level_is_named() -> None:
    with pytest.raises(ValueError, match="--log-level 'LOUD'"):
        setup_logging("LOUD")


def test_step_line() -> None:
    record = {
        "loss": 0.123456, "grad_norm": 0.5, "lr": 1e-3, "tokens_per_s": 1234.4,
        "time/rollout": 1.2, "time/teacher": 0.3, "time/student": 0.8, "time/sync": 0.1,
        "response_length/mean": 5.25, "skipped": 0,
    }  # fmt: skip
    log = StepLog(300)
    assert log.line(12, record) == (
        "step  12/300 | loss 0.1235 | grad norm 0.5 | lr 1.000e-03 | tokens/s 1234 | time "
        "rollout 1.20 s, teacher 0.30 s, student 0.80 s, sync 0.10 s | response length 5.2 | "
        "skipped 0"
    )
    skipped = {**record, "loss": float("nan"), "grad_norm": None, "skipped": 1}
    line = log.line(13, skipped)
    assert "loss nan | grad norm - |" in line and line.endswith("skipped 1")
    assert log.line(14, record).endswith("skipped 1")  # a count since the launch


def test_progress_lines_when_not_a_terminal(caplog: pytest.LogCaptureFixture) -> None:
    logger.propagate = True
    stream = io.StringIO()
    with (
        caplog.at_level(logging.INFO, logger="oprd_mega"),
        Progress(4, "step 1 rollouts", "prompt", interval_s=0.0, stream=stream) as bar,
    ):
        for _ in range(4):
            bar.update()
    assert stream.getvalue() == ""  # no bar off a terminal
    messages = [r.getMessage() for r in caplog.records]
    assert [m.split(" in ")[0] for m in messages] == [
        "step 1 rollouts: 1/4 prompts (25%)", "step 1 rollouts: 2/4 prompts (50%)",
        "step 1 rollouts: 3/4 prompts (75%)", "step 1 rollouts: 4/4 prompts (100%)",
        "step 1 rollouts: 4/4 prompts (100%)",
    ]  # fmt: skip
    caplog.clear()
    with (
        caplog.at_level(logging.INFO, logger="oprd_mega"),
        Progress(4, "quick", interval_s=3600.0, stream=io.StringIO()) as bar,
    ):
        bar.update(4)
    assert caplog.records == []  # fast work writes nothing


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_a_terminal(caplog: pytest.LogCaptureFixture) -> None:
    stream = _Terminal()
    logger.propagate = True
    with (
        caplog.at_level(logging.INFO, logger="oprd_mega"),
        Progress(3, "evaluation", "prompt", interval_s=0.0, stream=stream) as bar,
    ):
        bar.update(3)
        assert bar.bar is not None and bar.bar.n == 3
    assert "evaluation:" in stream.getvalue() and "/3 [" in stream.getvalue()  # tqdm's bar
    assert caplog.records == []
