"""A torch.distributed group between a trainer and rollout servers, outside any default group.

The trainer already has its own default group (torchrun), and the servers have none, so the
weight-update group is made directly from a TCP store, the way SGLang's
``init_custom_process_group`` does it; both sides must create it the same way.
"""

from __future__ import annotations

import contextlib
from datetime import timedelta

import torch.distributed as dist
from torch.distributed.distributed_c10d import Backend, _new_process_group_helper, _world


def init_custom_process_group(
    master_address: str,
    master_port: int,
    rank: int,
    world_size: int,
    group_name: str,
    backend: str = "gloo",
    timeout_s: float = 300.0,
) -> dist.ProcessGroup:
    """Join (rank 0: host) a new process group of ``world_size`` ranks named ``group_name``."""
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(
        master_address, int(master_port), world_size, is_master=(rank == 0), timeout=timeout
    )
    group, _ = _new_process_group_helper(
        world_size, rank, [], Backend(backend), store, group_name=group_name, timeout=timeout
    )
    # Collectives translate global ranks through this map; in this group they are the same.
    _world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


def destroy_custom_process_group(group: dist.ProcessGroup) -> None:
    """Release a group made by :func:`init_custom_process_group`."""
    with contextlib.suppress(ValueError, RuntimeError, AssertionError, KeyError):
        dist.destroy_process_group(group)
    _world.pg_group_ranks.pop(group, None)
