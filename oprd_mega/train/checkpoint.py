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
previous checkpoint and pointer intact. Older checkpoints beyond ``keep_last`` are deleted only
after the new one is in place.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel

from oprd_mega.config import ConfigError, TrainConfig, validate_config
from oprd_mega.convert.mcore_io import (
    _sharded_metadata,
    load_mcore_checkpoint,
    save_mcore_checkpoint,
)
from oprd_mega.models.hf_config import HFModelArgs
from oprd_mega.models.running import unwrap
from oprd_mega.parallel.distributed import barrier, broadcast_object, global_rank

LATEST = "latest"
STATE_FILE = "trainer.json"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not fit this run; the message names it."""


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
            _prune(root, keep_last)
    except Exception as exc:
        error = f"saving checkpoint {final} failed: {exc!r}"
    errors = [None] * (dist.get_world_size() if dist.is_initialized() else 1)
    if dist.is_initialized():
        dist.all_gather_object(errors, error)
    else:
        errors = [error]
    failed = [e for e in errors if e is not None]
    if failed:
        if global_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            failed[0] + f"; the previous checkpoint in {root} (see {LATEST}) is intact"
        )
    return final


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
    return sorted(found, key=lambda p: p.name)


def _prune(root: Path, keep_last: int) -> None:
    for old in complete_checkpoints(root)[:-keep_last]:
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
