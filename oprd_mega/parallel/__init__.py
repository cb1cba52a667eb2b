"""Distributed start-up (torchrun -> NCCL/gloo -> Megatron parallel_state) and CPU patches."""

from oprd_mega.parallel.cpu_patches import applied_patches, apply_cpu_patches, patch_names
from oprd_mega.parallel.distributed import (
    DistributedInfo,
    RemoteError,
    barrier,
    broadcast_object,
    destroy_distributed,
    global_rank,
    init_distributed,
    on_rank0,
    reset_model_parallel,
)
from oprd_mega.parallel.layout import ParallelLayout

__all__ = [
    "DistributedInfo",
    "ParallelLayout",
    "RemoteError",
    "applied_patches",
    "apply_cpu_patches",
    "barrier",
    "broadcast_object",
    "destroy_distributed",
    "global_rank",
    "init_distributed",
    "on_rank0",
    "patch_names",
    "reset_model_parallel",
]
