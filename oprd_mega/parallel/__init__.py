"""Distributed start-up (torchrun -> NCCL/gloo -> Megatron parallel_state) and CPU patches."""

from oprd_mega.parallel.cpu_patches import applied_patches, apply_cpu_patches, patch_names
from oprd_mega.parallel.distributed import (
    DistributedInfo,
    barrier,
    destroy_distributed,
    global_rank,
    init_distributed,
    reset_model_parallel,
)
from oprd_mega.parallel.layout import ParallelLayout

__all__ = [
    "DistributedInfo",
    "ParallelLayout",
    "applied_patches",
    "apply_cpu_patches",
    "barrier",
    "destroy_distributed",
    "global_rank",
    "init_distributed",
    "patch_names",
    "reset_model_parallel",
]
