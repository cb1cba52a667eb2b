"""Distributed start-up in one helper: torchrun's environment -> process group -> Megatron.

NCCL with CUDA, gloo without (then the CPU patches are applied). Without torchrun's variables
the process starts as a world of one on loopback, so tools run as plain commands too.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from oprd_mega.lifetime import die_with_parent, exit_within_after_signal
from oprd_mega.parallel.cpu_patches import apply_cpu_patches
from oprd_mega.parallel.layout import ParallelLayout

T = TypeVar("T")
# A rank's time, after SIGTERM (torchrun died or stops it), to exit through its handlers (rank 0
# stops its rollout servers) before a watchdog ends it: enough for the servers' own grace.
SIGTERM_GRACE_S = 30.0


@dataclass(frozen=True)
class DistributedInfo:
    """Where this process sits: global rank, world size, local rank, backend and device."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device
    layout: ParallelLayout


def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def global_rank() -> int:
    """This process's rank in the default group (0 without one)."""
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    """Wait for every rank of the default group (nothing without one)."""
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(value: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``value`` on every rank (a collective; ``value`` as is without a group)."""
    box = [value]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=src)
    return box[0]


class RemoteError(RuntimeError):
    """Rank 0 failed while this rank waited for its result (rank 0 raises the error itself)."""


def on_rank0(work: Callable[[], T], what: str) -> T:
    """Collective: ``work()`` runs on global rank 0 and every rank gets its result; an error
    there is raised on rank 0 and as :class:`RemoteError` elsewhere (``what`` says what rank 0
    was doing), so no rank waits forever. Without a group of several ranks it just runs."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return work()
    if dist.get_rank() == 0:
        try:
            result = work()
        except BaseException as exc:
            dist.broadcast_object_list([("error", f"{type(exc).__name__}: {exc}")], src=0)
            raise
        dist.broadcast_object_list([("ok", result)], src=0)
        return result
    box: list[Any] = [None]
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise RemoteError(f"rank 0 failed {what}: {value}")
    return value


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from exc


def init_distributed(
    layout: ParallelLayout | None = None, *, seed: int = 1234, timeout_minutes: int = 30
) -> DistributedInfo:
    """Initialise torch.distributed from torchrun's environment and Megatron's parallel_state.

    Idempotent for the same layout; raises if Megatron was already set up with another one.
    """
    from megatron.core import parallel_state, tensor_parallel

    from oprd_mega.parallel.writer_process import install as install_writer_process

    layout = layout or ParallelLayout()
    use_cuda = torch.cuda.is_available()
    backend = "nccl" if use_cuda else "gloo"
    if not use_cuda:
        apply_cpu_patches()

    if "TORCHELASTIC_RUN_ID" in os.environ:  # started by torchrun: stop when it dies
        die_with_parent()
        # ... within a bounded time, even from inside a collective whose peer is gone.
        exit_within_after_signal(SIGTERM_GRACE_S)
    install_writer_process()  # Megatron's checkpoint writer's helper dies with this process
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # a plain process: a world of one on loopback
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
            os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
        local_rank = _env_int("LOCAL_RANK", 0)
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(
            backend=backend,
            rank=_env_int("RANK", 0),
            world_size=_env_int("WORLD_SIZE", 1),
            timeout=timedelta(minutes=timeout_minutes),
        )
    world_size = dist.get_world_size()
    layout.data_parallel_size(world_size)  # raises when tp*pp*cp does not divide the world

    if parallel_state.model_parallel_is_initialized():
        current = (
            parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_pipeline_model_parallel_world_size(),
            parallel_state.get_context_parallel_world_size(),
        )
        if current != (layout.tp, layout.pp, layout.cp):
            raise RuntimeError(
                f"Megatron parallel_state is already initialised with TP{current[0]}PP{current[1]}"
                f"CP{current[2]}, cannot switch to {layout}; call destroy_distributed() first"
            )
    else:
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=layout.tp,
            pipeline_model_parallel_size=layout.pp,
            context_parallel_size=layout.cp,
            distributed_timeout_minutes=timeout_minutes,
        )
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    local_rank = _env_int("LOCAL_RANK", 0)
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return DistributedInfo(
        rank=dist.get_rank(),
        world_size=world_size,
        local_rank=local_rank,
        backend=backend,
        device=device,
        layout=layout,
    )


def reset_model_parallel() -> None:
    """Tear down Megatron's parallel_state and free every non-default process group.

    Megatron's own ``destroy_model_parallel`` only drops its references: the groups (about
    fifty per initialisation, each with its own gloo threads) live on, and a process that
    switches layouts a few dozen times ends up with thousands of polling threads. Call this
    before :func:`init_distributed` with another layout.
    """
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if not dist.is_initialized():
        return
    c10d = dist.distributed_c10d
    default = c10d._get_default_group()
    for group in list(c10d._world.pg_map):
        if group is not default:
            dist.destroy_process_group(group)


def destroy_distributed() -> None:
    """Tear down Megatron's parallel_state and every process group."""
    reset_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
