"""Training checkpoints: student (+ projection) and optimizer through Megatron distributed
checkpointing, plus the trainer's own state (step, data position, RNG, weight version).

Layout of ``checkpoint.dir``::

    step-00000100/
        model/        torch_dist student, projection included (oprd_mega.convert.mcore_io)
        optimizer/    torch_dist optimizer state, sharded like the model (any TP/PP on load)
        rng/rank-00000.pt ...  every rank's RNG states
        trainer.json  step, data position, weight version, layout, the resolved config
    latest            the name of the newest complete step directory

A save writes everything into a hidden temporary directory, renames it into place, then
replaces ``latest`` (both renames are atomic), so a crash or a full disk at any point leaves the
previous checkpoint and pointer intact. Checkpoints beyond ``keep_last`` are deleted only
after the new one is in place, never the one ``latest`` names; those after it (left when
``latest`` was moved back before a resume) go before this run's own older ones.

A directory belongs to one run: a run that starts fresh refuses a directory that already holds
checkpoints (:func:`check_fresh_start`). A resume falls back from a damaged checkpoint to the
newest intact one (:func:`load_newest_intact`), and a checkpoint whose model or projection does
not fit the config is one line naming the config key (:func:`check_fits`).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel
from torch.distributed.checkpoint import CheckpointException

from oprd_mega.config import ConfigError, TrainConfig, config_diff, validate_config
from oprd_mega.convert.dcp_files import damaged_files
from oprd_mega.convert.mcore_io import (
    _sharded_metadata,
    load_mcore_checkpoint,
    read_mcore_args,
    save_mcore_checkpoint,
)
from oprd_mega.errors import CheckpointError
from oprd_mega.models.hf_config import HFModelArgs
from oprd_mega.models.running import unwrap
from oprd_mega.parallel.distributed import barrier, broadcast_object, global_rank

LATEST = "latest"
STATE_FILE = "trainer.json"
_STEP_DIR = re.compile(r"^step-(\d{8})$")

# What a failed save or load can raise: torch DCP's CheckpointException derives from
# BaseException (not Exception); KeyboardInterrupt and SystemExit still get through.
CHECKPOINT_FAILURES: tuple[type[BaseException], ...] = (Exception, CheckpointException)

# Config keys that decide which tensors (and shapes) a checkpoint holds besides the student's
# own architecture (compared through its saved model arguments): a change cannot be resumed.
STRUCTURAL_KEYS: tuple[str, ...] = (
    "teacher.path",
    "distillation.method",
    "distillation.layers",
    "distillation.projection.mode",
    "distillation.projection.per_layer",
    "optimizer.use_distributed_optimizer",
)


class CheckpointMismatchError(CheckpointError):
    """An intact checkpoint that does not fit this run's config (not damage: no fallback)."""


@dataclass(frozen=True)
class TrainerState:
    """What the trainer needs besides tensors to continue exactly."""

    step: int
    data: dict[str, Any]
    weight_version: str
    layout: dict[str, int]
    config: dict[str, Any]


def step_dir_name(step: int) -> str:
    """``step-00000100``."""
    return f"step-{step:08d}"


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# The distributed optimizer's state in the canonical per-parameter layout, so it reshards over
# TP, PP and DP alike (its default format is not supported by the torch_dist saver).
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def _optimizer_sharded(model: torch.nn.Module, optimizer: Any, is_loading: bool) -> dict:
    model_sharded = unwrap(model).sharded_state_dict(metadata=_sharded_metadata())
    return optimizer.sharded_state_dict(
        model_sharded, is_loading=is_loading, metadata=dict(OPTIMIZER_METADATA)
    )


def save_checkpoint(
    directory: str | Path,
    state: TrainerState,
    model: torch.nn.Module,
    optimizer: Any,
    args: HFModelArgs,
    hf_source: str | Path,
    keep_last: int,
) -> Path:
    """Save one checkpoint (collective); returns its directory. Raises after cleaning up when
    anything fails, leaving the previous checkpoint and ``latest`` untouched."""
    root = Path(directory)
    final = root / step_dir_name(state.step)
    tmp_name = ""
    if global_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        tmp_name = tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root)
    tmp = Path(broadcast_object(tmp_name))
    error: str | None = None
    try:
        save_mcore_checkpoint(unwrap(model), args, tmp / "model", hf_source=Path(hf_source))
        dist_checkpointing.save(_optimizer_sharded(model, optimizer, False), str(_mkdir(tmp)))
        (tmp / "rng").mkdir(exist_ok=True)
        torch.save(_rng_state(), tmp / "rng" / f"rank-{global_rank():05d}.pt")
        barrier()
        if global_rank() == 0:
            body = json.dumps(state.__dict__, indent=1, default=str) + "\n"
            (tmp / STATE_FILE).write_text(body, encoding="utf-8")
            if final.exists():  # a stale copy of this step (a run restarted before it)
                shutil.rmtree(final)
            os.replace(tmp, final)
            _write_latest(root, final.name)
            _prune(root, keep_last, final)
    except CHECKPOINT_FAILURES as exc:
        error = f"saving checkpoint {final} failed: {_one_line(exc)}"
    failed = _gather_errors(error)
    if failed:
        if global_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            failed[0] + f"; the previous checkpoint in {root} (see {LATEST}) is intact"
        )
    return final


def _gather_errors(error: str | None) -> list[str]:
    """Every rank's error (None: it succeeded), so that all ranks fail or go on together."""
    errors: list[str | None] = [error]
    if dist.is_initialized():
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
    return [e for e in errors if e is not None]


def _one_line(exc: BaseException) -> str:
    """``exc`` as one line: its type and first line (DCP puts a traceback per rank in it), plus
    the system's reason when an OS error lies inside (a full disk: "No space left on device")."""
    text = str(exc).strip().splitlines()
    line = f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")
    reason = _system_reason(exc)
    if reason and reason not in line:
        line += f" ({reason})"
    return line


_ERRNO_TEXT = re.compile(r"\[Errno \d+\] ([^\n\]\[']+)")


def _system_reason(exc: object, depth: int = 0) -> str | None:
    """The strerror of the first OS error in ``exc``, its causes, or what torch DCP's
    CheckpointException collected per rank (``failures``: (exception, traceback) pairs). A
    writer process's OSError reaches here only as text (Megatron: "Worker failure: [Errno 28]
    No space left on device"), so the text is read too."""
    if depth > 6 or exc is None:
        return None
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    inner: list[object] = []
    if isinstance(exc, BaseException):
        match = _ERRNO_TEXT.search(str(exc))
        if match:
            return match.group(1).strip()
        inner += [exc.__cause__, exc.__context__]
        failures = getattr(exc, "failures", None)
        if isinstance(failures, dict):
            inner += list(failures.values())
    elif isinstance(exc, tuple | list):
        inner += list(exc)
    for item in inner:
        if isinstance(item, BaseException | tuple | list):
            found = _system_reason(item, depth + 1)
            if found:
                return found
    return None


def _mkdir(tmp: Path) -> Path:
    path = tmp / "optimizer"
    if global_rank() == 0:
        path.mkdir(exist_ok=True)
    barrier()
    return path


def _write_latest(root: Path, name: str) -> None:
    pointer = root / f".{LATEST}.tmp"
    pointer.write_text(name + "\n", encoding="utf-8")
    os.replace(pointer, root / LATEST)


def complete_checkpoints(root: Path) -> list[Path]:
    """Step directories with a trainer state file, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=step_of)


def check_fresh_start(directory: str | Path) -> None:
    """A fresh run (``checkpoint.resume = never``) owns its directory: refuse one that holds
    another run's checkpoints, which pruning and ``latest`` would otherwise mix with this
    run's."""
    root = Path(directory)
    if not root.is_dir():
        return
    steps = sorted((p for p in root.iterdir() if _STEP_DIR.match(p.name)), key=step_of)
    if not steps and not (root / LATEST).exists():
        return
    held = f"{steps[0].name} .. {steps[-1].name}" if steps else f"a '{LATEST}' pointer"
    error = CheckpointError(
        f"checkpoint.dir = {str(root)!r} holds another run's checkpoints ({held}) and "
        "checkpoint.resume is 'never': resume that run (--resume auto), choose a new "
        "checkpoint.dir, or move those checkpoints away first"
    )
    error.shared = True  # every rank checks the same directory and raises this line
    raise error


def resume_candidates(directory: str | Path) -> list[Path]:
    """Checkpoints a resume may use, preferred first: the one ``latest`` names (or the newest
    complete one), then the older complete ones, newest first."""
    first = find_latest(directory)
    if first is None:
        return []
    older = [p for p in complete_checkpoints(Path(directory)) if step_of(p) < step_of(first)]
    return [first, *reversed(older)]


def step_of(path: Path) -> int:
    """The step of a ``step-00000100`` directory."""
    match = _STEP_DIR.match(path.name)
    if match is None:
        raise ValueError(f"{path} is not a step directory")
    return int(match.group(1))


def _prune(root: Path, keep_last: int, latest: Path) -> None:
    """Keep ``latest`` (just saved, named by the pointer) and the ``keep_last - 1`` newest
    steps before it; delete the rest. Steps after ``latest`` are left by a run whose ``latest``
    was moved back before it resumed: that timeline was abandoned, so they count toward
    ``keep_last`` after this run's own and go first (kept, they were more than ``keep_last``,
    and a resume without the pointer would pick one of them)."""
    complete = complete_checkpoints(root)
    before = sorted((p for p in complete if step_of(p) < step_of(latest)), key=step_of)
    after = sorted((p for p in complete if step_of(p) > step_of(latest)), key=step_of)
    preferred = [*reversed(before), *reversed(after)]  # this run's newest first
    for old in preferred[max(0, keep_last - 1) :]:
        shutil.rmtree(old, ignore_errors=True)
    for leftover in root.glob(".step-*.tmp-*"):  # temp dirs of saves that crashed
        shutil.rmtree(leftover, ignore_errors=True)


def find_latest(directory: str | Path) -> Path | None:
    """The checkpoint ``latest`` names, or the newest complete one when the pointer is missing
    or names an incomplete directory; None when there is none."""
    root = Path(directory)
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text(encoding="utf-8").strip()
        if (named / STATE_FILE).is_file():
            return named
    complete = complete_checkpoints(root)
    return complete[-1] if complete else None


def read_state(path: Path) -> TrainerState:
    """The trainer state of checkpoint ``path``."""
    file = path / STATE_FILE
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
        return TrainerState(**data)
    except (OSError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{file}: not a readable trainer state ({exc})") from exc


def saved_config(path: Path, state: TrainerState) -> TrainConfig:
    """The resolved config checkpoint ``path`` (trainer state ``state``) was saved with; raises
    :class:`CheckpointError` naming the state file when that config is not a valid one."""
    file = path / STATE_FILE
    if not isinstance(state.config, dict):
        raise CheckpointError(f"{file}: 'config' must be a mapping, got {state.config!r:.80}")
    try:
        return validate_config(state.config)
    except ConfigError as exc:
        problems = "\n".join(f"  - {p}" for p in exc.problems)
        raise CheckpointError(
            f"{file}: the checkpoint's saved config ('config') is not a valid configuration, "
            f"so this run cannot be checked against it:\n{problems}\nfix that file, or start "
            "without this checkpoint (checkpoint.resume=never or another checkpoint.dir)"
        ) from exc


def check_fits(
    path: Path, state: TrainerState, config: TrainConfig, student_args: HFModelArgs
) -> None:
    """Raise a one-line :class:`CheckpointError` when checkpoint ``path`` cannot be loaded
    into the models of ``config``: the student's architecture or a :data:`STRUCTURAL_KEYS`
    value differs (named with the checkpoint's value and this run's)."""
    saved = saved_config(path, state)
    changes = [
        f"{key} ({old!r} in the checkpoint, {new!r} now)"
        for key, old, new in config_diff(saved, config)
        if any(key == k or key.startswith(k + ".") for k in STRUCTURAL_KEYS)
    ]
    try:
        saved_args = read_mcore_args(path / "model").to_dict()
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path / 'model'}: no readable model arguments ({exc})") from exc
    current = student_args.to_dict()
    changes += [
        f"student.path's model {name} ({saved_args.get(name)!r} in the checkpoint, "
        f"{current.get(name)!r} now)"
        for name in current
        if name not in ("initializer_range", "dtype") and saved_args.get(name) != current.get(name)
    ]
    if changes:
        raise CheckpointMismatchError(
            f"cannot resume from {path}: " + "; ".join(changes) + ". Use the checkpoint's "
            "values, or start a new run in another checkpoint.dir"
        )


def load_newest_intact(
    candidates: list[Path],
    model: torch.nn.Module,
    optimizer: Any,
    check: Callable[[Path, TrainerState], None],
    report: Callable[[str], None],
) -> tuple[Path, TrainerState]:
    """Load the first of ``candidates`` (newest first) that loads on every rank (collective).

    ``check`` raises :class:`CheckpointError` for a checkpoint that does not fit the run (not
    damage: that error stops the resume). A damaged one (unreadable state, torch DCP or file
    errors) is reported by name through ``report`` and the next one is tried.
    """
    damaged: list[str] = []
    for path in candidates:
        error: str | None = None
        try:
            state = read_state(path)
            check(path, state)
        except CheckpointMismatchError as exc:
            exc.shared = True  # every rank reads the same files and raises the same line
            raise
        except CheckpointError as exc:
            error = str(exc)
        if error is None:
            try:
                load_checkpoint(path, model, optimizer)
            except CHECKPOINT_FAILURES as exc:
                damaged = damaged_files(path / "model") + damaged_files(path / "optimizer")
                error = "; ".join(damaged) if damaged else _one_line(exc)
        failed = _gather_errors(error)
        if not failed:
            return path, state
        damaged.append(f"{path} ({failed[0]})")
        later = "; trying the previous one" if path != candidates[-1] else ""
        report(f"checkpoint {path} is damaged: {failed[0]}{later}")
    error = CheckpointError(
        "no intact checkpoint to resume from: " + "; ".join(damaged) + ". Start fresh in a "
        "new checkpoint.dir (or checkpoint.resume=never after moving these away)"
    )
    error.shared = True  # gathered: every rank raises the same line
    raise error


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: Any) -> TrainerState:
    """Load model, optimizer and this rank's RNG states from ``path`` (collective)."""
    state = read_state(path)
    load_mcore_checkpoint(unwrap(model), path / "model")
    sharded = _optimizer_sharded(model, optimizer, True)
    optimizer.load_state_dict(dist_checkpointing.load(sharded, str(path / "optimizer")))
    rng_file = path / "rng" / f"rank-{global_rank():05d}.pt"
    if rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return state
