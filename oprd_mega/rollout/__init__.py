"""Rollouts: the SGLang client, server management, the embedded server and weight sync."""

from oprd_mega.rollout.client import (
    ClientConfig,
    RolloutClient,
    RolloutError,
    ServerGoneError,
    ServerRequestError,
    WeightUpdateError,
)
from oprd_mega.rollout.samples import (
    MalformedResponseError,
    Sample,
    StaleRolloutError,
    require_weight_version,
)
from oprd_mega.rollout.servers import LaunchConfig, ServerGroup, ServerLaunchError
from oprd_mega.rollout.weight_sync import (
    DiskWeightSync,
    DistributedWeightSync,
    ProbeConfig,
    SyncReport,
    WeightSyncError,
)

__all__ = [
    "ClientConfig",
    "DiskWeightSync",
    "DistributedWeightSync",
    "LaunchConfig",
    "MalformedResponseError",
    "ProbeConfig",
    "RolloutClient",
    "RolloutError",
    "Sample",
    "ServerGoneError",
    "ServerGroup",
    "ServerLaunchError",
    "ServerRequestError",
    "StaleRolloutError",
    "SyncReport",
    "WeightSyncError",
    "WeightUpdateError",
    "require_weight_version",
]
