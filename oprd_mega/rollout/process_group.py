"""A torch.distributed group between a trainer and rollout servers, outside any default group.

The trainer already has its own default group (torchrun), and the servers have none, so the
weight-update group is made the way SGLang's ``init_custom_process_group``
(``sglang/srt/utils/common.py``) makes it, which slime, verl and OpenRLHF trainers use too:
``rendezvous("tcp://host:port")``, the store wrapped in ``PrefixStore(group_name)``, then
``_new_process_group_helper``. Every rank must build it exactly so: a group made any other way
(a store without the prefix) waits under other store keys and never forms with SGLang.

The store is the one ``rendezvous("tcp://...")`` makes outside torchelastic (rank 0 hosts a
multi-tenant ``TCPStore``, the others connect), built directly: under torchrun, ``rendezvous``
reads ``TORCHELASTIC_USE_AGENT_STORE`` and makes every rank a client of the agent's store,
which is not at this address, so the trainer's rank 0 would never host the group.
"""

from __future__ import annotations

import contextlib
from datetime import timedelta

import torch.distributed as dist
from torch.distributed.distributed_c10d import (
    Backend,
    PrefixStore,
    _new_process_group_helper,
    _world,
)


def tcp_init_method(master_address: str, master_port: int) -> str:
    """``tcp://host:port`` as SGLang's ``NetworkAddress`` writes it (IPv6 in brackets)."""
    host = master_address.strip("[]")
    if ":" in host:
        host = f"[{host}]"
    return f"tcp://{host}:{int(master_port)}"


def _rendezvous_store(
    master_address: str, master_port: int, rank: int, world_size: int, timeout: timedelta
) -> dist.TCPStore:
    """The store of ``rendezvous("tcp://...")`` without torchelastic's agent store."""
    if not 0 < int(master_port) < 2**16:
        raise ValueError(f"master_port must be in 1..65535, got {master_port}")
    return dist.TCPStore(
        master_address.strip("[]"),
        int(master_port),
        world_size,
        is_master=rank == 0,
        timeout=timeout,
        multi_tenant=True,
        use_libuv=True,
    )


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
    if not group_name:
        raise ValueError("group_name of a weight-update group must not be empty")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside the group's world_size {world_size}")
    timeout = timedelta(seconds=timeout_s)
    store = _rendezvous_store(master_address, master_port, rank, world_size, timeout)
    store.set_timeout(timeout)
    store = PrefixStore(group_name, store)
    group, _ = _new_process_group_helper(
        world_size,
        rank,
        [],
        Backend(backend),
        store,
        group_name=group_name,
        backend_options=None,
        timeout=timeout,
    )
    # Collectives translate global ranks through this map; in this group they are the same.
    _world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


def destroy_custom_process_group(group: dist.ProcessGroup) -> None:
    """Release a group made by :func:`init_custom_process_group`."""
    with contextlib.suppress(ValueError, RuntimeError, AssertionError, KeyError):
        dist.destroy_process_group(group)
    _world.pg_group_ranks.pop(group, None)
