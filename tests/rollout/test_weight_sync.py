"""Weight sync to a running server: both transports leave it with exactly the new weights."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

from oprd_mega.rollout.client import RolloutClient
from oprd_mega.rollout.embedded_server import EmbeddedServer, ServerConfig
from oprd_mega.rollout.weight_sync import (
    DiskWeightSync,
    DistributedWeightSync,
    ProbeConfig,
    WeightSyncError,
    iter_buckets,
)
from tests.torchrun_utils import free_port

PROMPT = [3, 9, 27, 81, 200]


def run(coro):
    return asyncio.run(coro)


def load(model_dir):
    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def forward_of(model):
    return lambda ids: model(input_ids=torch.tensor([list(ids)])).logits[0]


async def greedy_logprobs(client, url):
    body = {
        "input_ids": PROMPT,
        "sampling_params": {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True},
        "return_logprob": True,
    }
    answer = await client.call(url, "POST", "/generate", body)
    return answer["output_ids"], [e[0] for e in answer["meta_info"]["output_token_logprobs"]]


def reference(model, output):
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([PROMPT + output])).logits[0].double()
    logprobs = torch.log_softmax(logits, -1)
    return [float(logprobs[len(PROMPT) - 1 + i, t]) for i, t in enumerate(output)]


@settings(max_examples=100, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=1, max_value=64), min_size=0, max_size=20),
    bucket=st.integers(min_value=4, max_value=256),
)
def test_buckets_keep_order_and_respect_size(sizes, bucket):
    tensors = [(f"t{i}", torch.zeros(n, dtype=torch.float32)) for i, n in enumerate(sizes)]
    buckets = list(iter_buckets(tensors, bucket))
    assert [n for b in buckets for n, _ in b] == [n for n, _ in tensors]
    for k, b in enumerate(buckets):
        size = sum(4 * t.numel() for _, t in b)
        assert len(b) == 1 or size <= bucket
        if k + 1 < len(buckets):  # greedy: the next tensor did not fit
            assert size + 4 * buckets[k + 1][0][1].numel() > bucket


def test_duplicate_names_are_rejected():
    with pytest.raises(WeightSyncError, match="w appears twice"):
        list(iter_buckets([("w", torch.zeros(1)), ("w", torch.zeros(1))]))


def test_disk_sync_and_checks(tmp_path, tiny_model_dir, other_model_dir):
    old, new = load(tiny_model_dir), load(other_model_dir)
    with EmbeddedServer(ServerConfig(str(tiny_model_dir), port=0)) as srv:

        async def main():
            async with RolloutClient([srv.url]) as client:
                sync = DiskWeightSync(
                    client, tmp_path / "sync", tiny_model_dir, bucket_bytes=64 * 1024
                )
                report = await sync.sync(new.state_dict().items(), "step-1")
                ids, got = await greedy_logprobs(client, srv.url)
                await sync.check("step-1", forward_of(new))
                with pytest.raises(WeightSyncError, match="differ from the trainer's"):
                    await sync.check("step-1", forward_of(old))
                with pytest.raises(WeightSyncError, match="stale weights"):
                    await sync.check("step-2")
                # A silently corrupted tensor (a wrong mapping) is caught by the probe.
                corrupt = dict(new.state_dict())
                name = "model.layers.0.mlp.down_proj.weight"
                corrupt[name] = corrupt[name] + 0.05
                await sync.sync(corrupt.items(), "step-2")
                with pytest.raises(WeightSyncError, match="step-2"):
                    await sync.check("step-2", forward_of(new))
                return report, ids, got

        report, ids, got = run(main())
    assert got == pytest.approx(reference(new, ids), abs=2e-4)
    assert report.buckets > 1 and report.tensors == len(new.state_dict())
    assert report.bytes == sum(t.numel() * 4 for t in new.state_dict().values())
    assert [p.name for p in (tmp_path / "sync").iterdir()] == ["weights-step-2"]  # keep_last=1


def test_disk_sync_rejects_unknown_tensor(tmp_path, tiny_model_dir):
    with EmbeddedServer(ServerConfig(str(tiny_model_dir), port=0)) as srv:

        async def main():
            async with RolloutClient([srv.url]) as client:
                sync = DiskWeightSync(client, tmp_path / "sync", tiny_model_dir)
                await sync.sync([("model.bogus.weight", torch.zeros(2))], "v1")

        with pytest.raises(WeightSyncError, match=r"model\.bogus\.weight"):
            run(main())


def test_distributed_sync_to_a_server_process(tiny_model_dir, other_model_dir):
    old, new = load(tiny_model_dir), load(other_model_dir)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "oprd_mega.cli",
            "serve",
            "--model",
            str(tiny_model_dir),
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:

        async def main():
            async with RolloutClient([url]) as client:
                await client.wait_healthy(timeout_s=120)
                ids_before, got_before = await greedy_logprobs(client, url)
                sync = DistributedWeightSync(
                    client, "127.0.0.1", free_port(), bucket_bytes=96 * 1024, probe=ProbeConfig()
                )
                try:
                    report = await sync.sync(new.state_dict().items(), "step-1")
                    await sync.check("step-1", forward_of(new))
                    ids, got = await greedy_logprobs(client, url)
                    # A second sync over the same group: back to the old weights.
                    await sync.sync(old.state_dict().items(), "step-2")
                    await sync.check("step-2", forward_of(old))
                    ids_again, got_again = await greedy_logprobs(client, url)
                finally:
                    await sync.close()
                return (ids_before, got_before), (ids, got), (ids_again, got_again), report

        before, after, again, report = run(main())
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    assert before[1] == pytest.approx(reference(old, before[0]), abs=2e-4)
    assert after[1] == pytest.approx(reference(new, after[0]), abs=2e-4)
    assert again == before
    assert report.buckets > 1 and report.tensors == len(new.state_dict())
