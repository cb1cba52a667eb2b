"""The weight-update group forms with SGLang's own ``init_custom_process_group``.

SGLang's function is taken from the pinned wheel (``sglang_source.py``), not imported or
copied. Each side of the group runs in its own process, as trainer and server do.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from oprd_mega.rollout.process_group import tcp_init_method
from tests.torchrun_utils import free_port

from .greedy_reference import transformers_greedy
from .sglang_source import sglang_init_custom_process_group

WORKER = Path(__file__).parent / "workers" / "group_worker.py"
REPO = Path(__file__).resolve().parents[2]


def run_group(impls: list[str], group_name: str) -> list[dict]:
    """One process per rank; ``oprd@torchrun`` is the project's rank under torchrun, whose
    agent-store variable makes ``rendezvous("tcp://...")`` a client everywhere."""
    port = str(free_port())
    procs = []
    for rank, impl in enumerate(impls):
        env = dict(os.environ)
        env.pop("TORCHELASTIC_USE_AGENT_STORE", None)
        if impl == "oprd@torchrun":
            env["TORCHELASTIC_USE_AGENT_STORE"] = "True"
        argv = [impl.split("@")[0], str(rank), str(len(impls)), port, group_name]
        procs.append(
            subprocess.Popen(
                [sys.executable, str(WORKER), *argv],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
        )
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, f"worker failed:\n{err[-3000:]}"
        outputs.append(json.loads(out.strip().splitlines()[-1]))
    return outputs


@pytest.mark.parametrize(
    "impls",
    [
        ["oprd", "sglang"],
        ["sglang", "oprd"],
        ["oprd", "sglang", "oprd"],
        ["oprd@torchrun", "sglang"],
    ],
    ids=[
        "trainer-oprd-server-sglang",
        "trainer-sglang-server-oprd",
        "three-ranks-mixed",
        "trainer-oprd-under-torchrun",
    ],
)
def test_group_forms_with_sglangs_own_function(impls):
    results = run_group(impls, "weights_sync_group")
    sent = [0.5 * i + 1 for i in range(12)]
    half = torch.linspace(-2, 2, 7).to(torch.bfloat16).float().tolist()
    for rank, result in enumerate(results):
        assert result["rank"] == rank
        assert result["forward"] == sent
        assert result["half"] == half
        assert result["back"] == [7.25] * 3


def test_init_method_brackets_ipv6():
    assert tcp_init_method("127.0.0.1", 29500) == "tcp://127.0.0.1:29500"
    assert tcp_init_method("::1", 29500) == "tcp://[::1]:29500"
    assert tcp_init_method("[::1]", 29500) == "tcp://[::1]:29500"


def _post(url: str, path: str, body: dict, results: dict) -> None:
    results[path] = httpx.post(url + path, json=body, timeout=120.0)


def _greedy(url: str, prompt: list[int], tokens: int) -> dict:
    body = {
        "input_ids": prompt,
        "sampling_params": {"max_new_tokens": tokens, "temperature": 0, "ignore_eos": True},
    }
    answer = httpx.post(url + "/generate", json=body, timeout=120.0)
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_sglang_style_trainer_updates_oprd_serve(tiny_model_dir, other_model_dir):
    """A trainer that builds the group with SGLang's function (as slime does) updates
    ``oprd-mega serve`` over /init_weights_update_group + /update_weights_from_distributed."""
    prompt, tokens = [3, 9, 27, 81, 200], 8
    new_ids = transformers_greedy(other_model_dir, prompt, tokens)
    old_ids = transformers_greedy(tiny_model_dir, prompt, tokens)
    assert new_ids != old_ids  # the test can tell the two models apart
    new_state = AutoModelForCausalLM.from_pretrained(str(other_model_dir)).state_dict()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "oprd_mega.cli", "serve", "--model-path", str(tiny_model_dir),
         "--port", str(port)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    group = None
    try:
        _wait_healthy(url, server)
        assert _greedy(url, prompt, tokens)["output_ids"] == old_ids
        group_port, group_name = free_port(), "slime_weight_update"
        replies: dict[str, httpx.Response] = {}
        join = threading.Thread(
            target=_post,
            args=(url, "/init_weights_update_group", {
                "master_address": "127.0.0.1", "master_port": group_port, "rank_offset": 1,
                "world_size": 2, "group_name": group_name, "backend": "gloo",
            }, replies),
        )  # fmt: skip
        join.start()
        group = sglang_init_custom_process_group()(
            backend="gloo",
            init_method=tcp_init_method("127.0.0.1", group_port),
            timeout=timedelta(seconds=120),
            world_size=2,
            rank=0,
            group_name=group_name,
        )
        join.join(timeout=120)
        assert replies["/init_weights_update_group"].json()["success"] is True
        names = list(new_state)
        # A bucket holding a NaN is received (the group stays in step) but not loaded.
        poisoned = {n: new_state[n].clone() for n in names[:3]}
        poisoned[names[1]].view(-1)[0] = float("nan")
        _broadcast_bucket(url, group, group_name, poisoned, "v-bad", replies)
        reply = replies["/update_weights_from_distributed"]
        assert reply.status_code == 400 and reply.json()["success"] is False
        assert f"tensor {names[1]} has 1 non-finite value" in reply.json()["message"]
        answer = _greedy(url, prompt, tokens)
        assert answer["output_ids"] == old_ids
        assert answer["meta_info"]["weight_version"] == "default"
        for start in range(0, len(names), 5):  # buckets of five tensors, as slime sends them
            bucket = names[start : start + 5]
            last = start + 5 >= len(names)
            body = {
                "names": bucket,
                "dtypes": [str(new_state[n].dtype).removeprefix("torch.") for n in bucket],
                "shapes": [list(new_state[n].shape) for n in bucket],
                "group_name": group_name,
                "flush_cache": last,
                "weight_version": "v-new" if last else None,
            }
            update = threading.Thread(
                target=_post, args=(url, "/update_weights_from_distributed", body, replies)
            )
            update.start()
            for name in bucket:
                dist.broadcast(new_state[name].contiguous(), src=0, group=group)
            update.join(timeout=120)
            reply = replies["/update_weights_from_distributed"]
            assert reply.status_code == 200 and reply.json()["success"] is True, reply.text
        answer = _greedy(url, prompt, tokens)
        assert answer["output_ids"] == new_ids
        assert answer["meta_info"]["weight_version"] == "v-new"
    finally:
        if group is not None:
            dist.destroy_process_group(group)
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def _broadcast_bucket(
    url: str, group, group_name: str, bucket: dict, version: str | None, replies: dict
) -> None:
    body = {
        "names": list(bucket),
        "dtypes": [str(t.dtype).removeprefix("torch.") for t in bucket.values()],
        "shapes": [list(t.shape) for t in bucket.values()],
        "group_name": group_name,
        "weight_version": version,
    }
    update = threading.Thread(
        target=_post, args=(url, "/update_weights_from_distributed", body, replies)
    )
    update.start()
    for tensor in bucket.values():
        dist.broadcast(tensor.contiguous(), src=0, group=group)
    update.join(timeout=120)


def _wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"oprd-mega serve exited with {proc.returncode}"
        try:
            if httpx.get(url + "/health", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} not healthy after {timeout_s}s")
