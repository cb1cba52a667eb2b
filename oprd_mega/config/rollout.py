"""Rollout servers (launched or attached), the client, sampling and weight sync."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from oprd_mega.config.adopt import adopt, plain
from oprd_mega.config.base import Section, invalid
from oprd_mega.rollout.client import ClientConfig
from oprd_mega.rollout.sampling import SamplingConfig, parse_sampling_params
from oprd_mega.rollout.servers import LaunchConfig
from oprd_mega.rollout.weight_sync import DEFAULT_BUCKET_BYTES, ProbeConfig

SAMPLING_DOCS = {
    "max_new_tokens": "Most tokens generated per response (paper: 16,384); null: no limit.",
    "temperature": "Sampling temperature (paper: 1.0); 0 is greedy.",
    "top_p": "Nucleus sampling mass, in (0, 1].",
    "top_k": "Keep the k most likely tokens; -1 keeps all.",
    "min_p": "Drop tokens below min_p times the most likely token's probability, in [0, 1].",
    "min_new_tokens": "Least tokens generated before a stop is honoured.",
    "n": "Responses sampled per prompt (paper: 2).",
    "stop": "Stop strings.",
    "stop_token_ids": "Token ids that end a response (besides EOS).",
    "ignore_eos": "Keep generating past EOS.",
    "skip_special_tokens": "Drop special tokens from the returned text.",
    "no_stop_trim": "Keep the stop string in the returned text.",
    "sampling_seed": "Seed of the server's sampler; null: the server's own.",
}


def _check_sampling(config: SamplingConfig) -> SamplingConfig:
    """SGLang's own checks (the rollout module's parser), normalising e.g. top_k=0 to -1."""
    return parse_sampling_params(plain(config))


Sampling = adopt(
    SamplingConfig,
    SAMPLING_DOCS,
    defaults={"n": 2, "temperature": 1.0, "max_new_tokens": 16384},
    check=_check_sampling,
)
PAPER_SAMPLING = SamplingConfig(n=2, temperature=1.0, max_new_tokens=16384)


Launch = adopt(
    LaunchConfig,
    {
        "model_path": "Model directory the servers load; defaults to student.path.",
        "num_servers": "Servers to start, on consecutive ports from base_port.",
        "backend": "'sglang' (python -m sglang.launch_server), 'embedded' (the CPU server) or "
        "'auto' (SGLang when installed).",
        "tp_size": "Tensor-parallel size of each SGLang server.",
        "host": "Address the servers bind to.",
        "base_port": "Port of the first server (the others follow); null: free ports. A taken "
        "port is an error naming its owner.",
        "mem_fraction_static": "SGLang --mem-fraction-static; null: SGLang's default.",
        "extra_args": "Extra server command-line arguments, passed unchanged.",
        "command": "Command prefix replacing the launcher's (tests use a fake server).",
        "log_dir": "Directory for the servers' logs (rollout-server-<i>.log; a restarted "
        "server's earlier log is kept as .log.1, .log.2, ...); null: <metrics.dir>/rollout.",
        "health_timeout_s": "Seconds to wait for every server's /health.",
        "shutdown_grace_s": "Seconds between SIGTERM and SIGKILL at shutdown.",
        "env": "Extra environment variables of the server processes.",
        "gpus_per_server": "GPUs each SGLang server uses (--base-gpu-id apart); null: tp_size.",
        "base_gpu_id": "First GPU of the servers on this node; null: the GPU after the "
        "trainer's (0 with colocate). Servers never get the trainer's GPUs unless colocate.",
        "trainer_gpus": "GPUs 0..N-1 of this node used by the trainer; filled in by the trainer "
        "(its local world size on CUDA, 0 on CPU).",
        "colocate": "Servers share the trainer's GPUs: their weights and KV cache are released "
        "during each training step and resumed before the weight sync (slime's colocated mode).",
        "deterministic_inference": "Pass SGLang's --enable-deterministic-inference; the trainer "
        "turns it on when rollout.sampling.sampling_seed is set.",
    },
)

Client = adopt(
    ClientConfig,
    {
        "max_concurrency_per_server": "Most requests in flight per server.",
        "timeout_s": "Seconds before a request is abandoned and retried.",
        "connect_timeout_s": "Seconds to connect to a server.",
        "max_retries": "Retries of a failed request (on another server when possible).",
        "backoff_initial_s": "First retry delay; doubles per retry.",
        "backoff_max_s": "Longest retry delay.",
        "down_for_s": "Seconds a failing server is avoided.",
        "max_consecutive_failures": "Failed requests in a row after which a server counts as "
        "gone (an error); null: keep retrying it.",
    },
)

Probe = adopt(
    ProbeConfig,
    {
        "prompt_ids": "Token ids of the greedy probe run on every server after a sync.",
        "max_new_tokens": "Tokens the probe generates.",
        "atol": "Largest allowed |server - trainer| probe log-prob (1e-3 float32 CPU; ~0.1 "
        "bf16 GPU).",
    },
)


class AttachSection(Section):
    """Servers that already run (``ServerGroup.attach``)."""

    urls: tuple[str, ...] = ()
    """Server base URLs (http://host:port)."""
    router_url: str | None = None
    """An sglang_router URL: generation goes through it, weight updates to its workers."""
    health_timeout_s: float = Field(60.0, gt=0)
    """Seconds to wait for the servers' /health at start."""
    tp_size: int = Field(1, ge=1)
    """Tensor-parallel size of each attached server (the distributed weight sync gives each
    server that many ranks)."""


class DiskSyncSection(Section):
    """Weight sync through a shared directory (``DiskWeightSync``)."""

    directory: str = "runs/oprd/rollout_weights"
    """Directory the servers can read; each sync writes a new subdirectory."""
    keep_last: int = Field(1, ge=1)
    """Synced weight directories kept."""


class DistributedSyncSection(Section):
    """Weight sync by broadcast over a group shared with the servers."""

    master_address: str = "127.0.0.1"
    """Address of the trainer's rank 0 as the servers see it."""
    master_port: int | None = Field(None, ge=1, le=65535)
    """Port of the sync group; null: a free port."""
    group_name: str = "oprd_weight_sync"
    """Name of the sync process group."""
    backend: Literal["gloo", "nccl"] = "gloo"
    """Collective backend: gloo on CPU, nccl on GPU."""
    timeout_s: float = Field(300.0, gt=0)
    """Seconds before a sync collective fails."""


class WeightSyncSection(Section):
    """How updated student weights reach the servers, and the check after each sync."""

    method: Literal["disk", "distributed"] = "disk"
    """'disk' (safetensors + /update_weights_from_disk) or 'distributed' (broadcast)."""
    bucket_bytes: int = Field(DEFAULT_BUCKET_BYTES, gt=0)
    """Bytes of weights per bucket."""
    probe: Probe = ProbeConfig()
    """The post-sync check."""
    disk: DiskSyncSection = DiskSyncSection()
    """Options of method 'disk'."""
    distributed: DistributedSyncSection = DistributedSyncSection()
    """Options of method 'distributed'."""


class RolloutSection(Section):
    """Where rollouts come from and how they are sampled."""

    mode: Literal["launch", "attach"] = "launch"
    """'launch': the trainer starts the servers (rollout.launch); 'attach': use running ones
    (rollout.attach)."""
    launch: Launch | None = None
    """Servers the trainer starts and stops (mode 'launch'; filled in from the defaults when
    left out); null in mode 'attach' when left out."""
    attach: AttachSection = AttachSection()
    """Servers that already run."""
    client: Client = ClientConfig()
    """Request concurrency, timeouts and retries."""
    sampling: Sampling = PAPER_SAMPLING
    """Sampling parameters of the training rollouts."""
    weight_sync: WeightSyncSection = WeightSyncSection()
    """Pushing new weights to the servers."""
    max_restarts: int = Field(1, ge=0)
    """Times launched servers that die mid-run are restarted and re-synced before the run
    stops (attached servers are never restarted); 0: stop at once."""
    max_staleness: int = Field(0, ge=0, le=8)
    """How many optimizer steps the weights that sampled a trained token may lag behind the
    student (AReaL's staleness bound). 0: each step samples with the current weights and waits
    for its rollouts (servers and trainer take turns). 1: one-step-off: the rollouts of step
    k+1 are generated, with the weights step k's rollouts came from, while step k trains; the
    weight sync after step k waits for them. s: s steps' rollouts are in flight at once. A
    response whose oldest token would lag more than s steps is never trained on: it is dropped
    and sampled again from its prompt (counted in rollout/restarted_samples)."""
    partial: bool = False
    """Partial rollouts: a long response no longer holds up a step; it is continued (prompt
    plus partial response, the remaining max_new_tokens) under newer weights, so its tokens
    mix versions (the bound applies to the oldest). Needs max_staleness >= 1. With
    partial_chunk_tokens null (slime's --partial-rollout) they are cut by time: a step takes
    the first batch.prompts_per_step groups to complete and the weight sync aborts the rest
    with their tokens kept; which groups finish first and where a response is cut depend on the
    servers' speed, so two runs differ, resumed or not. With partial_chunk_tokens set they are
    cut by tokens: reproducible, and a resumed run repeats the uninterrupted one
    (docs/training.md, 'Asynchronous rollouts')."""
    partial_chunk_tokens: int | None = Field(None, ge=1)
    """Partial rollouts cut by tokens (Kimi k1.5's fixed per-request budget; needs partial:
    true): every request asks for at most this many more tokens, a response cut at its chunk
    with budget left is continued at a later request, and a step takes the oldest complete
    groups, skipping unfinished ones (sending their next chunk when too few are complete), never
    aborting. Which groups a step trains on depends only on what the servers return, not on
    their speed. Smaller: less waiting on a long tail, more continued responses. A response
    gets one chunk per step before its oldest token ages past max_staleness (and more only when
    a step runs short of complete groups): at least max_new_tokens / (max_staleness + 1) lets
    every response finish without restarts. Null: cut by time."""

    @model_validator(mode="after")
    def _partial_needs_staleness(self) -> RolloutSection:
        if self.partial and self.max_staleness < 1:
            raise invalid(
                "partial",
                True,
                "partial rollouts continue responses under newer weights, so they need "
                "rollout.max_staleness >= 1",
            )
        if self.partial_chunk_tokens is not None and not self.partial:
            raise invalid(
                "partial_chunk_tokens",
                self.partial_chunk_tokens,
                "the chunk is the size of a partial rollout's request: it needs "
                "rollout.partial = true",
            )
        return self

    @model_validator(mode="after")
    def _servers_given(self) -> RolloutSection:
        if self.mode == "attach" and not self.attach.urls and self.attach.router_url is None:
            raise invalid("attach.urls", [], "mode 'attach' needs attach.urls or attach.router_url")
        if self.mode == "launch" and self.launch is None:
            raise invalid("launch", None, "mode 'launch' needs a rollout.launch section")
        return self
