"""The trainer's rollout side, on the rank that talks to the servers (rank 0).

It starts (or attaches to) the servers and checks them before any training work, samples each
step's responses with per-prompt seeds derived from the run's seed and the step (so a resumed
run samples what the uninterrupted one did), and owns the weight-sync transport that
:func:`oprd_mega.rollout.megatron_sync.sync_model_weights` drives.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

from oprd_mega.config.schema import TrainConfig
from oprd_mega.parallel.distributed import free_port
from oprd_mega.rollout.client import RolloutClient
from oprd_mega.rollout.samples import Sample, require_weight_version
from oprd_mega.rollout.sampling import SamplingConfig, sample_groups
from oprd_mega.rollout.servers import ServerGroup
from oprd_mega.rollout.weight_sync import DiskWeightSync, DistributedWeightSync, WeightSync


def local_trainer_gpus() -> int:
    """GPUs 0..N-1 of this node that the trainer's ranks use (none without CUDA)."""
    if not torch.cuda.is_available():
        return 0
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


class RolloutService:
    """Servers, client and weight sync of one run; methods run on this process's event loop."""

    def __init__(self, config: TrainConfig, loop: asyncio.AbstractEventLoop) -> None:
        self.config = config
        self.loop = loop
        self._start()

    def _start(self) -> None:
        rollout = self.config.rollout
        if rollout.mode == "launch":
            assert rollout.launch is not None
            launch = rollout.launch.for_trainer(
                local_trainer_gpus(), rollout.sampling.sampling_seed
            )
            self.servers = ServerGroup.launch(launch)
        else:
            attach = rollout.attach
            self.servers = ServerGroup.attach(
                attach.urls, attach.router_url, health_timeout_s=attach.health_timeout_s
            )
        try:
            self.client = RolloutClient(
                self.servers.urls, rollout.client, exit_code=self.servers.exit_code
            )
            self.weight_sync = self._weight_sync()
        except BaseException:
            self.servers.shutdown()
            raise

    def _weight_sync(self) -> WeightSync:
        options = self.config.rollout.weight_sync
        common: dict[str, Any] = {
            "control_urls": self.servers.control_urls,
            "bucket_bytes": options.bucket_bytes,
            "probe": options.probe,
        }
        if options.method == "disk":
            return DiskWeightSync(
                self.client,
                options.disk.directory,
                self.config.student.path,
                keep_last=options.disk.keep_last,
                **common,
            )
        distributed = options.distributed
        launch = self.config.rollout.launch
        return DistributedWeightSync(
            self.client,
            distributed.master_address,
            distributed.master_port or free_port(),
            group_name=distributed.group_name,
            backend=distributed.backend,
            server_tp_size=(
                launch.tp_size
                if self.config.rollout.mode == "launch" and launch is not None
                else self.config.rollout.attach.tp_size
            ),
            timeout_s=distributed.timeout_s,
            **common,
        )

    def run(self, coroutine: Any) -> Any:
        """Run ``coroutine`` to completion on the service's loop."""
        return self.loop.run_until_complete(coroutine)

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingConfig,
        step: int,
        version: str | None,
        first_group: int = 0,
        on_prompt_done: Callable[[], object] | None = None,
    ) -> list[list[Sample]]:
        """``sampling.n`` responses per prompt, seeded by (``sampling.sampling_seed``, step,
        prompt) when the config gives a seed; checked to come from weight ``version``.
        ``on_prompt_done`` is called as each prompt's responses arrive (progress)."""
        groups = self.run(
            sample_groups(self.client, prompts, sampling, step, first_group, on_prompt_done)
        )
        if version is not None:
            require_weight_version([s for group in groups for s in group], version)
        return groups

    def set_memory(self, action: str) -> None:
        """``"release"`` or ``"resume"`` the servers' weights and KV cache (SGLang's
        /release_memory_occupation, /resume_memory_occupation), as slime's colocated mode does
        around each training step; the weight sync after the step restores the weights."""
        if action not in ("release", "resume"):
            raise ValueError(f"set_memory: action must be 'release' or 'resume', got {action!r}")
        path = f"/{action}_memory_occupation"

        async def everywhere() -> None:
            calls = (self.client.call(u, "POST", path, {}) for u in self.servers.control_urls)
            await asyncio.gather(*calls)

        self.run(everywhere())

    def restart(self) -> None:
        """Stop the launched servers (whatever is left of them) and start them again; the
        caller re-syncs the weights."""
        if self.config.rollout.mode != "launch":
            raise RuntimeError("attached servers are not restarted by the trainer")
        self.close()
        self._start()

    def close(self) -> None:
        """Leave the sync group, close connections, stop launched servers."""
        try:
            if isinstance(self.weight_sync, DistributedWeightSync):
                self.run(self.weight_sync.close())
            self.run(self.client.aclose())
        finally:
            self.servers.shutdown()
