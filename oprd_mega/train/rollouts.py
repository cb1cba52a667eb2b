"""The trainer's rollout side, on the rank that talks to the servers (rank 0).

It starts (or attaches to) the servers and checks them before any training work, samples each
step's responses with per-prompt seeds derived from the run's seed and the step (so a resumed
run samples what the uninterrupted one did), and owns the weight-sync transport that
:func:`oprd_mega.rollout.megatron_sync.sync_model_weights` drives.

Generation runs on an event loop of its own, in a thread, with a client of its own, so that
requests go on while the trainer's thread trains (``rollout.max_staleness``); control calls
and the weight sync use the trainer's loop and client.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import os
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
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


class BusyClock:
    """Seconds during which no generation request was in flight (thread-safe)."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._running = 0
        self._idle = 0.0
        self._idle_since: float | None = clock()

    def begin(self) -> None:
        with self._lock:
            if self._running == 0 and self._idle_since is not None:
                self._idle += self._clock() - self._idle_since
                self._idle_since = None
            self._running += 1

    def end(self) -> None:
        with self._lock:
            self._running -= 1
            if self._running == 0:
                self._idle_since = self._clock()

    def idle_seconds(self) -> float:
        """Idle seconds since the clock started."""
        with self._lock:
            now = self._clock()
            return self._idle + (now - self._idle_since if self._idle_since is not None else 0.0)


class RolloutService:
    """Servers, clients and weight sync of one run. Control calls run on ``loop`` (the
    trainer's); generation on a loop of its own in a thread (:meth:`submit`)."""

    def __init__(self, config: TrainConfig, loop: asyncio.AbstractEventLoop) -> None:
        self.config = config
        self.loop = loop
        self.busy = BusyClock()
        self._gen_loop = asyncio.new_event_loop()
        self._gen_thread = threading.Thread(
            target=self._gen_loop.run_forever, name="oprd-rollouts", daemon=True
        )
        self._gen_thread.start()
        try:
            self._start()
        except BaseException:
            self._stop_gen_loop()
            raise

    def _start(self) -> None:
        rollout = self.config.rollout
        if rollout.mode == "launch":
            assert rollout.launch is not None
            launch = rollout.launch.for_trainer(
                local_trainer_gpus(),
                rollout.sampling.sampling_seed,
                run_log_dir=str(Path(self.config.metrics.dir) / "rollout"),
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
            self.gen_client = RolloutClient(
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

    def _on_gen_loop(self, coroutine: Awaitable[Any]) -> cf.Future:
        async def tracked() -> Any:
            self.busy.begin()
            try:
                return await coroutine
            finally:
                self.busy.end()

        return asyncio.run_coroutine_threadsafe(tracked(), self._gen_loop)

    def submit(self, prompt_ids: Sequence[int], params: dict[str, Any], group: int) -> cf.Future:
        """Send one /generate (``params``: SGLang sampling params) on the generation thread;
        the future gives its samples."""
        return self._on_gen_loop(self.gen_client.generate(prompt_ids, params, group))

    def abort_all(self) -> None:
        """SGLang's /abort_request with abort_all on every server: running requests end now
        with ``finish_reason`` abort and the tokens they have."""
        self.run(self.client.call_all("POST", "/abort_request", {"abort_all": True}))

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
        groups = self._on_gen_loop(
            sample_groups(self.gen_client, prompts, sampling, step, first_group, on_prompt_done)
        ).result()
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
        """Abort this run's requests, leave the sync group, close connections, stop launched
        servers."""
        try:
            try:  # aborts every request still running on the servers
                self._on_gen_loop(self.gen_client.aclose()).result(timeout=30)
            finally:
                if isinstance(self.weight_sync, DistributedWeightSync):
                    self.run(self.weight_sync.close())
                self.run(self.client.aclose())
        finally:
            self.servers.shutdown()

    def shutdown(self) -> None:
        """:meth:`close`, then stop the generation thread."""
        try:
            self.close()
        finally:
            self._stop_gen_loop()

    def _stop_gen_loop(self) -> None:
        async def cancel_all() -> None:
            current = asyncio.current_task()
            tasks = [t for t in asyncio.all_tasks() if t is not current]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if self._gen_thread.is_alive():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(cancel_all(), self._gen_loop).result(timeout=30)
            self._gen_loop.call_soon_threadsafe(self._gen_loop.stop)
            self._gen_thread.join(timeout=30)
        if not self._gen_thread.is_alive():
            self._gen_loop.close()
