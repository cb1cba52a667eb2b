"""Weight sync from the trainer to the rollout servers, in buckets, checked after every sync.

Both transports take an iterator of ``(hf_name, full_tensor)`` pairs: Hugging Face names and
unsharded tensors, on the rank that talks to the servers. Producing them from a Megatron model
(gathering tensor-parallel shards and pipeline stages, renaming through the one HF<->Megatron
mapping in ``oprd_mega.convert``) is the caller's part; the transports never rename anything.

- :class:`DiskWeightSync` writes the tensors as HF safetensors shards into a fresh directory
  (written under a temporary name, then renamed), then calls /update_weights_from_disk.
- :class:`DistributedWeightSync` joins the servers in a torch.distributed group
  (/init_weights_update_group) and broadcasts bucket by bucket
  (/update_weights_from_distributed).

After a sync, :meth:`WeightSync.check` asks every server for a greedy probe: the answer must
carry the new weight version, and its log-probs must match the trainer's own forward within
``ProbeConfig.atol``; otherwise :class:`WeightSyncError` stops training.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from oprd_mega.convert.hf_io import write_safetensors_shards
from oprd_mega.rollout.client import RolloutClient, WeightUpdateError
from oprd_mega.rollout.samples import parse_generate_output

DEFAULT_BUCKET_BYTES = 512 * 2**20
# Files of a model directory that are not weights and that a server needs to reload it.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")

NamedTensors = Iterable[tuple[str, torch.Tensor]]
# The trainer's own forward: token ids -> logits [tokens, vocab] (any float dtype).
TrainerForward = Callable[[Sequence[int]], torch.Tensor]


class WeightSyncError(RuntimeError):
    """A sync failed or its check found stale or different weights on a server."""


@dataclass(frozen=True)
class ProbeConfig:
    """The fixed greedy probe run after each sync.

    ``atol`` bounds ``max |server log-prob - trainer log-prob|`` over the probe's tokens. With
    float32 weights on both sides (CPU, the embedded server) 1e-3 holds with a wide margin (the
    observed difference is ~1e-6); with bf16 on GPU (SGLang vs Megatron kernels) about 0.1 is an
    estimate, not yet measured.
    """

    prompt_ids: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8)
    max_new_tokens: int = 8
    atol: float = 1e-3


@dataclass(frozen=True)
class SyncReport:
    """What one sync moved and how long it took."""

    version: str
    tensors: int
    bytes: int
    buckets: int
    seconds: float

    @property
    def seconds_per_mib(self) -> float:
        """Sync time per MiB of weights."""
        return self.seconds / max(self.bytes / 2**20, 1e-9)


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Size of a tensor's data in bytes."""
    return tensor.numel() * tensor.element_size()


def iter_buckets(
    named_tensors: NamedTensors, bucket_bytes: int = DEFAULT_BUCKET_BYTES
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group consecutive tensors into buckets of at most ``bucket_bytes`` (order kept).

    A tensor larger than the bucket size travels alone. Names must be unique.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    seen: set[str] = set()
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named_tensors:
        if name in seen:
            raise WeightSyncError(f"tensor {name} appears twice in the weights to sync")
        seen.add(name)
        nbytes = tensor_bytes(tensor)
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def _with_last_flag(items: Iterable[Any]) -> Iterator[tuple[Any, bool]]:
    iterator = iter(items)
    try:
        current = next(iterator)
    except StopIteration:
        return
    for following in iterator:
        yield current, False
        current = following
    yield current, True


class WeightSync:
    """Common part of both transports: the post-sync check."""

    def __init__(
        self,
        client: RolloutClient,
        control_urls: Sequence[str] | None = None,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        probe: ProbeConfig | None = None,
    ) -> None:
        self.client = client
        self.control_urls = list(control_urls or client.urls)
        self.bucket_bytes = bucket_bytes
        self.probe = probe or ProbeConfig()

    async def check(self, version: str, trainer_forward: TrainerForward | None = None) -> None:
        """Probe every server: the version must be ``version`` and, given the trainer's forward,
        the greedy probe's log-probs must agree within ``probe.atol``."""
        await asyncio.gather(
            *(self._check_one(u, version, trainer_forward) for u in self.control_urls)
        )

    async def _check_one(self, url: str, version: str, forward: TrainerForward | None) -> None:
        body = {
            "input_ids": list(self.probe.prompt_ids),
            "sampling_params": {
                "max_new_tokens": self.probe.max_new_tokens,
                "temperature": 0.0,
                "ignore_eos": True,
            },
            "return_logprob": True,
        }
        answer = await self.client.call(url, "POST", "/generate", body)
        sample = parse_generate_output(answer, self.probe.prompt_ids, -1, 0, url)
        if sample.weight_version != version:
            raise WeightSyncError(
                f"{url} still answers with weight_version {sample.weight_version!r} after the "
                f"sync of {version!r}: its rollouts would come from stale weights"
            )
        if forward is None:
            return
        tokens = list(sample.prompt_ids + sample.response_ids)
        with torch.no_grad():
            logits = forward(tokens).double()
        logprobs = torch.log_softmax(logits, dim=-1)
        start = len(sample.prompt_ids) - 1
        want = [float(logprobs[start + i, t]) for i, t in enumerate(sample.response_ids)]
        diff = max(abs(a - b) for a, b in zip(sample.response_logprobs, want, strict=True))
        if not diff <= self.probe.atol:
            raise WeightSyncError(
                f"{url}: after the sync of {version!r} the probe's log-probs differ from the "
                f"trainer's by up to {diff:.3g} (tolerance {self.probe.atol}): the server's "
                "weights are not the trainer's"
            )


class DiskWeightSync(WeightSync):
    """Sync through a shared directory of HF safetensors and /update_weights_from_disk.

    ``base_model_dir`` supplies the non-weight files (config, tokenizer) copied next to the
    weights, since the servers reload a whole model directory.
    """

    def __init__(
        self,
        client: RolloutClient,
        directory: str | Path,
        base_model_dir: str | Path,
        control_urls: Sequence[str] | None = None,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        probe: ProbeConfig | None = None,
        keep_last: int = 1,
    ) -> None:
        super().__init__(client, control_urls, bucket_bytes, probe)
        self.directory = Path(directory)
        self.base_model_dir = Path(base_model_dir)
        self.keep_last = keep_last
        self._written: list[Path] = []

    def write(self, named_tensors: NamedTensors, version: str) -> tuple[Path, int, int, int]:
        """Write the shards atomically; return ``(path, tensors, bytes, shards)``."""
        if not version or "/" in version or version.startswith("."):
            raise WeightSyncError(f"weight version {version!r} cannot name a directory")
        final = self.directory / f"weights-{version}"
        if final.exists():
            raise WeightSyncError(f"{final} already exists: weight versions must be unique")
        tmp = self.directory / f".tmp-weights-{version}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for item in self.base_model_dir.iterdir():
            if (
                item.is_file()
                and not item.name.endswith(_WEIGHT_SUFFIXES)
                and not item.name.endswith(".index.json")
            ):
                shutil.copy2(item, tmp / item.name)
        # iter_buckets rejects a repeated name; its buckets are the shards the writer cuts.
        unique = itertools.chain.from_iterable(iter_buckets(named_tensors, self.bucket_bytes))
        shards = write_safetensors_shards(
            unique, tmp, max_shard_bytes=self.bucket_bytes, count_in_names=False
        )
        for file in tmp.iterdir():
            with file.open("rb") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, final)
        return final, shards.tensors, shards.total_bytes, len(shards.files)

    async def sync(self, named_tensors: NamedTensors, version: str) -> SyncReport:
        """Write the weights, make every server load them, report size and time."""
        start = time.perf_counter()
        path, count, total, shards = await asyncio.to_thread(self.write, named_tensors, version)
        try:
            await self.client.update_weights_from_disk(
                str(path), weight_version=version, urls=self.control_urls
            )
        except WeightUpdateError as exc:
            raise WeightSyncError(str(exc)) from exc
        self._written.append(path)
        while len(self._written) > self.keep_last:
            shutil.rmtree(self._written.pop(0), ignore_errors=True)
        return SyncReport(version, count, total, shards, time.perf_counter() - start)


class DistributedWeightSync(WeightSync):
    """Sync by broadcasting buckets over a torch.distributed group shared with the servers.

    The trainer is rank 0; server ``i`` (tensor-parallel size ``server_tp_size``) takes ranks
    ``1 + i * server_tp_size`` onwards. ``backend`` is ``"gloo"`` on CPU, ``"nccl"`` on GPU.
    """

    def __init__(
        self,
        client: RolloutClient,
        master_address: str,
        master_port: int,
        control_urls: Sequence[str] | None = None,
        group_name: str = "oprd_weight_sync",
        backend: str = "gloo",
        server_tp_size: int = 1,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        probe: ProbeConfig | None = None,
        timeout_s: float = 300.0,
    ) -> None:
        super().__init__(client, control_urls, bucket_bytes, probe)
        self.master_address = master_address
        self.master_port = master_port
        self.group_name = group_name
        self.backend = backend
        self.server_tp_size = server_tp_size
        self.timeout_s = timeout_s
        self.group: Any = None

    @property
    def world_size(self) -> int:
        """Trainer plus every server rank."""
        return 1 + len(self.control_urls) * self.server_tp_size

    async def connect(self) -> None:
        """Create the group: the servers join over HTTP while this process hosts rank 0."""
        from oprd_mega.rollout.process_group import init_custom_process_group

        offsets = [1 + i * self.server_tp_size for i in range(len(self.control_urls))]
        joined = asyncio.create_task(
            self.client.init_weights_update_group(
                self.master_address,
                self.master_port,
                self.world_size,
                self.group_name,
                self.backend,
                offsets,
                urls=self.control_urls,
            )
        )
        try:
            self.group = await asyncio.to_thread(
                init_custom_process_group,
                self.master_address,
                self.master_port,
                0,
                self.world_size,
                self.group_name,
                self.backend,
                self.timeout_s,
            )
        except BaseException as exc:
            joined.cancel()
            raise WeightSyncError(
                f"could not create weight-update group {self.group_name!r} at "
                f"{self.master_address}:{self.master_port}: {exc}"
            ) from exc
        try:
            await joined
        except WeightUpdateError as exc:
            raise WeightSyncError(str(exc)) from exc

    async def sync(self, named_tensors: NamedTensors, version: str) -> SyncReport:
        """Broadcast every bucket; the last bucket carries the new weight version."""
        if self.group is None:
            await self.connect()
        start = time.perf_counter()
        count = total = buckets = 0
        for bucket, last in _with_last_flag(iter_buckets(named_tensors, self.bucket_bytes)):
            buckets += 1
            tensors = [(n, t.detach().contiguous()) for n, t in bucket]
            announce = self.client.update_weights_from_distributed(
                names=[n for n, _ in tensors],
                dtypes=[str(t.dtype).removeprefix("torch.") for _, t in tensors],
                shapes=[list(t.shape) for _, t in tensors],
                group_name=self.group_name,
                weight_version=version if last else None,
                urls=self.control_urls,
            )
            results = await asyncio.gather(
                announce,
                asyncio.to_thread(self._broadcast, [t for _, t in tensors]),
                return_exceptions=True,
            )
            for result in results:
                if isinstance(result, BaseException):
                    raise WeightSyncError(
                        f"sync of {version!r}, bucket {buckets}: {result}"
                    ) from result
            count += len(tensors)
            total += sum(tensor_bytes(t) for _, t in tensors)
        return SyncReport(version, count, total, buckets, time.perf_counter() - start)

    def _broadcast(self, tensors: list[torch.Tensor]) -> None:
        import torch.distributed as dist

        for tensor in tensors:
            dist.broadcast(tensor, src=0, group=self.group)

    async def close(self) -> None:
        """Leave the group on both sides."""
        from oprd_mega.rollout.process_group import destroy_custom_process_group

        if self.group is None:
            return
        await asyncio.gather(
            *(
                self.client.call(
                    u, "POST", "/destroy_weights_update_group", {"group_name": self.group_name}
                )
                for u in self.control_urls
            ),
            return_exceptions=True,
        )
        destroy_custom_process_group(self.group)
        self.group = None
