"""Metric sinks of the trainer (JSONL, TensorBoard, wandb), step timers and peak memory.

Used on the logging rank only. ``MetricsWriter`` takes the plain values of the config's
``metrics`` section, so this module does not depend on the config package.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import torch

SINKS: tuple[str, ...] = ("jsonl", "tensorboard", "wandb")
JSONL_NAME = "metrics.jsonl"
TENSORBOARD_SUBDIR = "tensorboard"
RESERVED_KEYS: tuple[str, ...] = ("step", "kind", "time")
"""Keys every JSONL line carries; metric names may not reuse them."""


class MetricsFileError(ValueError):
    """metrics.jsonl has a line, other than a torn last one, that is not a metrics record."""


# --- reading and truncating metrics.jsonl ----------------------------------------------------


def _parse_record(line: str, where: str) -> dict[str, Any]:
    record = json.loads(line)
    if not isinstance(record, dict) or not isinstance(record.get("step"), int):
        raise MetricsFileError(f"{where}: a metrics line must be a JSON object with an int step")
    return record


def _read_lines(path: Path) -> tuple[list[tuple[str, dict[str, Any]]], str | None]:
    """Each complete line of ``path`` with its record, and the torn last line (or None).

    A torn line is a last line that is not valid JSON: what a crash mid-write leaves.
    """
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    parsed: list[tuple[str, dict[str, Any]]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            parsed.append((line, _parse_record(line, f"{path}:{number}")))
        except json.JSONDecodeError as exc:
            if number == len(lines):
                return parsed, line
            raise MetricsFileError(f"{path}:{number}: invalid JSON ({exc.msg})") from exc
    return parsed, None


def _metrics_file(path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    return path / JSONL_NAME if path.is_dir() else path


def read_metrics(path: str | os.PathLike[str], kind: str | None = None) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl (``path`` is the file or its directory), in file order.

    ``kind`` keeps only that kind ('train', 'eval', ...). Non-finite values read back as None.
    A torn last line (a run writing or crashed mid-line) is skipped.
    """
    records = [record for _, record in _read_lines(_metrics_file(path))[0]]
    return [r for r in records if kind is None or r.get("kind") == kind]


def _atomic_write(path: Path, lines: Sequence[str]) -> None:
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.writelines(lines)
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates the file private (0600); keep the replaced file's permissions.
        os.chmod(temporary, path.stat().st_mode & 0o777)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _move_aside(path: Path, what: str) -> Path:
    """Rename ``path`` to an unused ``<name>.replaced-<UTC time>[-n]`` beside it and say so on
    stderr (``what``: a fresh run starts ..., the earlier run's ...)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    target = path.with_name(f"{path.name}.replaced-{stamp}")
    number = 1
    while target.exists():
        number += 1
        target = path.with_name(f"{path.name}.replaced-{stamp}-{number}")
    os.rename(path, target)
    print(f"[oprd-mega] {path}: {what} were moved to {target}", file=sys.stderr, flush=True)
    return target


def truncate_metrics(path: Path, resume_step: int | None) -> int:
    """Make ``path`` what an uninterrupted run would hold before step ``resume_step + 1``.

    Lines with step > ``resume_step`` (logged after the checkpoint the run resumes from) and
    a torn last line (with a warning) are dropped; ``resume_step`` None (a fresh run) drops
    every line, after moving the earlier run's file aside (``metrics.jsonl.replaced-<time>``,
    said on stderr: never replaced silently). The rewrite is atomic (temporary file, then
    ``os.replace``); kept lines are copied byte for byte. Returns the number of records
    dropped from ``path``.
    """
    if not path.exists():
        return 0
    records, torn = _read_lines(path)
    if torn is not None:
        warnings.warn(
            f"{path}: dropping a torn last line (the previous run crashed while writing it): "
            f"{torn[:80]!r}",
            stacklevel=2,
        )
    if resume_step is None and records:
        _move_aside(
            path,
            f"a fresh run starts a new metrics file; the {len(records)} records of an earlier run",
        )
        return len(records)
    kept = [line for line, r in records if resume_step is not None and r["step"] <= resume_step]
    if len(kept) < len(records) or torn is not None:
        if kept and not kept[-1].endswith("\n"):
            kept[-1] += "\n"
        _atomic_write(path, kept)
    return len(records) - len(kept)


# --- sinks -----------------------------------------------------------------------------------


class _Sink(Protocol):
    def log(self, step: int, kind: str, metrics: Mapping[str, int | float]) -> None: ...

    def close(self) -> None: ...


def _json_value(value: int | float) -> int | float | None:
    # JSON has no NaN or infinity; null keeps the line valid for every JSON reader.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class _JsonlSink:
    """One JSON object a line in ``<dir>/metrics.jsonl``, flushed line by line."""

    def __init__(self, directory: Path, resume_step: int | None) -> None:
        self.path = directory / JSONL_NAME
        truncate_metrics(self.path, resume_step)
        self._handle = self.path.open("a", encoding="utf-8")

    def log(self, step: int, kind: str, metrics: Mapping[str, int | float]) -> None:
        values = {name: _json_value(value) for name, value in metrics.items()}
        record = {"step": step, "kind": kind, "time": time.time(), **values}
        self._handle.write(json.dumps(record, allow_nan=False) + "\n")
        # Flushed per line so a crash of the process loses no complete record.
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


def tensorboard_tag(kind: str, name: str) -> str:
    """The TensorBoard/wandb name of metric ``name`` of ``kind``: ``kind/name``, unless
    ``name`` already starts with ``kind/`` (``eval/avg_at_k`` stays as it is)."""
    return name if name.startswith(f"{kind}/") else f"{kind}/{name}"


class _TensorBoardSink:
    """Scalars in ``<dir>/tensorboard``; on resume, events after the checkpoint are purged."""

    def __init__(self, directory: Path, resume_step: int | None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ImportError(
                "the 'tensorboard' metrics sink needs the tensorboard package: "
                "pip install tensorboard"
            ) from exc
        log_dir = directory / TENSORBOARD_SUBDIR
        earlier = sorted(log_dir.glob("events.out.tfevents.*")) if log_dir.is_dir() else []
        if resume_step is None and earlier:
            _move_aside(
                log_dir,
                f"a fresh run starts new TensorBoard events; the {len(earlier)} event file(s) "
                "of an earlier run",
            )
        # On resume, purge_step hides the events the interrupted run logged after the
        # checkpoint (step >= purge_step); a fresh run starts in an empty folder.
        purge_step = None if resume_step is None else resume_step + 1
        self._writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def log(self, step: int, kind: str, metrics: Mapping[str, int | float]) -> None:
        for name, value in metrics.items():
            self._writer.add_scalar(tensorboard_tag(kind, name), value, global_step=step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class _WandbSink:
    """A wandb run; its id is kept in ``<dir>/wandb_run_id`` so a resumed run continues it.

    wandb ignores steps it has already seen, so after a crash the steps logged between the
    checkpoint and the crash keep the interrupted run's values there (JSONL and TensorBoard
    are exact).
    """

    def __init__(
        self,
        directory: Path,
        resume_step: int | None,
        project: str,
        run_name: str | None,
        config: Mapping[str, Any] | None,
    ) -> None:
        try:
            import wandb
        except ImportError as exc:
            raise ImportError(
                "the 'wandb' metrics sink needs the wandb package: pip install wandb"
            ) from exc
        id_file = directory / "wandb_run_id"
        run_id = (
            id_file.read_text().strip() if resume_step is not None and id_file.exists() else None
        )
        self._run = wandb.init(
            project=project,
            name=run_name,
            config=dict(config) if config is not None else None,
            dir=str(directory),
            id=run_id,
            resume="allow" if run_id is not None else None,
        )
        id_file.write_text(self._run.id + "\n")

    def log(self, step: int, kind: str, metrics: Mapping[str, int | float]) -> None:
        self._run.log({tensorboard_tag(kind, n): v for n, v in metrics.items()}, step=step)

    def close(self) -> None:
        self._run.finish()


# --- the writer ------------------------------------------------------------------------------


def _as_number(name: str, value: Any) -> int | float:
    """An int stays an int (bools become 0/1); anything else (tensors, numpy) becomes a float."""
    if isinstance(value, int):
        return int(value)
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"metric {name!r} must be a number, got {type(value).__name__} {value!r}"
        ) from exc


class MetricsWriter:
    """Sends each step's metrics to the configured sinks (``metrics.sinks`` of the config).

    ``resume_step`` is the step of the checkpoint a resumed run starts from: whatever the
    interrupted run logged after it is dropped (JSONL) or purged (TensorBoard), so the logs
    equal an uninterrupted run's. None means a fresh run: an existing metrics.jsonl (see
    :func:`truncate_metrics`) and TensorBoard folder are moved aside (``.replaced-<time>``),
    each said on stderr.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        sinks: Sequence[str] = ("jsonl", "tensorboard"),
        *,
        wandb_project: str = "oprd-mega",
        wandb_run_name: str | None = None,
        config: Mapping[str, Any] | None = None,
        resume_step: int | None = None,
    ) -> None:
        unknown = [sink for sink in sinks if sink not in SINKS]
        if unknown or len(set(sinks)) != len(sinks):
            raise ValueError(f"metrics sinks {list(sinks)}: each must be one of {SINKS}, once")
        if resume_step is not None and resume_step < 0:
            raise ValueError(f"resume_step must be >= 0, got {resume_step}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._sinks: list[_Sink] = []
        try:
            for sink in sinks:
                self._sinks.append(
                    self._open(sink, resume_step, wandb_project, wandb_run_name, config)
                )
        except BaseException:
            self.close()
            raise

    def _open(
        self,
        sink: str,
        resume_step: int | None,
        wandb_project: str,
        wandb_run_name: str | None,
        config: Mapping[str, Any] | None,
    ) -> _Sink:
        if sink == "jsonl":
            return _JsonlSink(self.directory, resume_step)
        if sink == "tensorboard":
            return _TensorBoardSink(self.directory, resume_step)
        return _WandbSink(self.directory, resume_step, wandb_project, wandb_run_name, config)

    @property
    def jsonl_path(self) -> Path:
        """Where the JSONL sink writes (whether or not it is enabled)."""
        return self.directory / JSONL_NAME

    def log(self, step: int, metrics: Mapping[str, Any], kind: str = "train") -> None:
        """Record ``metrics`` of ``step``; ``kind`` ('train', 'eval', ...) groups them.

        Values are numbers (0-dim tensors and numpy scalars are converted). In JSONL the line
        is ``{"step", "kind", "time" (unix seconds), **metrics}`` with NaN and infinities
        written as null; TensorBoard and wandb get the values as they are, under
        ``tensorboard_tag(kind, name)``.
        """
        clash = [name for name in metrics if name in RESERVED_KEYS]
        if clash:
            raise ValueError(f"metric names {clash} are reserved for the line's own fields")
        values = {name: _as_number(name, value) for name, value in metrics.items()}
        for sink in self._sinks:
            sink.log(step, kind, values)

    def close(self) -> None:
        """Flush and close every sink; safe to call twice."""
        sinks, self._sinks = self._sinks, []
        for sink in sinks:
            sink.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


# --- timers and memory -----------------------------------------------------------------------


class StepTimer:
    """Seconds spent per phase of one step: ``with timer("rollout"): ...``, then ``pop()``.

    A phase entered several times in a step accumulates. With ``cuda_sync`` the timer waits
    for queued CUDA work at both ends of a phase, so GPU time lands in the phase that queued
    it (kernels run asynchronously otherwise).
    """

    def __init__(
        self, clock: Callable[[], float] = time.perf_counter, cuda_sync: bool = False
    ) -> None:
        self._clock = clock
        self._cuda_sync = cuda_sync and torch.cuda.is_available()
        self._seconds: dict[str, float] = {}

    def _sync(self) -> None:
        if self._cuda_sync:
            torch.cuda.synchronize()

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        """Time the body of the ``with`` block as part of ``phase``."""
        self._sync()
        start = self._clock()
        try:
            yield
        finally:
            self._sync()
            self._seconds[phase] = self._seconds.get(phase, 0.0) + self._clock() - start

    def pop(self) -> dict[str, float]:
        """``{"time/<phase>": seconds}`` in first-use order, and a fresh start for the next
        step."""
        seconds, self._seconds = self._seconds, {}
        return {f"time/{phase}": value for phase, value in seconds.items()}


def peak_memory_mib() -> float:
    """Peak memory in MiB: with CUDA, ``torch.cuda.max_memory_allocated`` of the current
    device (tensors only, since start or the last ``torch.cuda.reset_peak_memory_stats``);
    without, the process's peak resident set size (``ru_maxrss``: KiB on Linux, bytes on
    macOS)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def objective_records(part: Any, oprd: bool, prefix: str = "") -> dict[str, float]:
    """The objective's metrics of a step (a ``StepResult``) or of one teacher's share (a
    ``TeacherResult``) under ``prefix``: rep/loss, rep/cosine_similarity and both per student
    layer (with the representation loss, ``oprd``), and opd/*."""
    record: dict[str, float] = {}
    if oprd:
        record[prefix + "rep/loss"] = part.oprd_loss
        record[prefix + "rep/cosine_similarity"] = part.cosine
        for layer, value in part.layer_loss.items():
            record[f"{prefix}rep/loss/layer_{layer}"] = value
        for layer, value in part.layer_cosine.items():
            record[f"{prefix}rep/cosine_similarity/layer_{layer}"] = value
    for metric, value in part.opd.items():
        record[f"{prefix}opd/{metric}"] = value
    return record


def teacher_records(result: Any, oprd: bool) -> dict[str, float]:
    """A step's per-teacher metrics (a ``StepResult``'s ``teachers``), under teacher/NAME/:
    loss, :func:`objective_records`, supervised tokens and microbatches; its pass's seconds as
    time/teacher/NAME."""
    record: dict[str, float] = {}
    for name, part in result.teachers.items():
        prefix = f"teacher/{name}/"
        record[prefix + "loss"] = part.loss
        record |= objective_records(part, oprd, prefix)
        record[prefix + "supervised_tokens"] = part.supervised_tokens
        record[prefix + "microbatches"] = part.microbatches
        record[f"time/teacher/{name}"] = part.seconds
    return record
