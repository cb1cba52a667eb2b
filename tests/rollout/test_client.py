"""The client: balancing, bounded concurrency, retries without lost or duplicated rollouts."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest

from oprd_mega.rollout.client import (
    ClientConfig,
    RolloutClient,
    ServerGoneError,
    ServerRequestError,
    ServerState,
)
from oprd_mega.rollout.sampling import SamplingConfig, prompt_seed, sample_groups
from tests.torchrun_utils import free_port

from .fake_sglang import FakeServer, expected_output

FAST = ClientConfig(max_retries=3, backoff_initial_s=0.01, backoff_max_s=0.05, down_for_s=0.2)
PROMPTS = [[i, i + 1, i + 2] for i in range(1, 41)]


def run(coro):
    return asyncio.run(coro)


def check_groups(groups, prompts, n):
    """Every prompt got exactly n samples, each the answer to that prompt."""
    assert len(groups) == len(prompts)
    for gid, (group, prompt) in enumerate(zip(groups, prompts, strict=True)):
        assert [s.index for s in group] == list(range(n))
        for s in group:
            assert s.group_id == gid
            assert list(s.prompt_ids) == prompt
            assert list(s.response_ids) == expected_output(prompt, s.index)


def test_balances_and_bounds_concurrency():
    slow = lambda i, body: ("sleep", 0.1)
    with FakeServer(slow) as a, FakeServer(slow) as b:
        config = ClientConfig(max_concurrency_per_server=3)

        async def main():
            async with RolloutClient([a.url, b.url], config) as client:
                return await client.generate_groups(PROMPTS, {"n": 2, "max_new_tokens": 4})

        groups = run(main())
    check_groups(groups, PROMPTS, 2)
    assert a.max_in_flight <= 3 and b.max_in_flight <= 3
    assert a.max_in_flight == 3 and b.max_in_flight == 3
    assert abs(len(a.requests) - len(b.requests)) <= 4


def test_prompt_seeds_differ_per_step_and_prompt():
    seeds = {prompt_seed(0, step, group) for step in range(50) for group in range(64)}
    assert len(seeds) == 50 * 64
    assert prompt_seed(7, 3, 10) == 7 * 1_000_003 + 3 * 65_537 + 10 * 1_009 == 7206722


@pytest.mark.parametrize("base", [7, None])
def test_sample_groups_seeds_every_prompt_from_the_base_seed(base):
    prompts = PROMPTS[:6]
    sampling = SamplingConfig(n=2, max_new_tokens=4, sampling_seed=base)
    done = []
    with FakeServer() as server:

        async def main():
            async with RolloutClient([server.url], FAST) as client:
                return await sample_groups(
                    client, prompts, sampling, 3, 10, on_prompt_done=lambda: done.append(1)
                )

        groups = run(main())
    assert [[s.group_id for s in g] for g in groups] == [[10 + i] * 2 for i in range(6)]
    assert [list(g[0].prompt_ids) for g in groups] == prompts  # in prompt order
    seeds = {
        tuple(r["input_ids"]): r["sampling_params"].get("sampling_seed") for r in server.requests
    }
    # literal seeds: a changed formula would silently change every seeded run's rollouts
    pinned = [7206722, 7207731, 7208740, 7209749, 7210758, 7211767]
    expected = [None] * 6 if base is None else pinned
    assert [seeds[tuple(p)] for p in prompts] == expected
    assert len(done) == len(prompts)


def test_least_outstanding_choice():
    client = RolloutClient(["http://a", "http://b", "http://c"])
    client.servers = [
        ServerState("http://a", 2),
        ServerState("http://b", 0),
        ServerState("http://c", 1),
    ]

    async def main():
        first = await client._acquire(set())
        second = await client._acquire(set())
        third = await client._acquire({"http://b", "http://c"})
        await client.aclose()
        return first.url, second.url, third.url

    # b (0) -> b and c tie at 1, c has fewer completed? both 0 -> first in order: b; avoid -> a.
    assert run(main()) == ("http://b", "http://b", "http://a")


@pytest.mark.parametrize(
    "failure",
    [
        (503, {"error": {"message": "overloaded"}}),
        (500, "internal"),
        "close",
        (200, "{not json"),
        (200, {"text": "", "output_ids": [1, 2]}),  # no meta_info
        ("sleep", 2.5),  # longer than the client's timeout
    ],
)
def test_transient_failures_are_retried_without_loss_or_duplicates(failure):
    # Every third request fails; the rest succeed.
    with FakeServer(lambda i, body: failure if i % 3 == 0 else None) as flaky, FakeServer() as ok:
        config = ClientConfig(timeout_s=1.0, max_retries=4, backoff_initial_s=0.01, down_for_s=0.05)

        async def main():
            async with RolloutClient([flaky.url, ok.url], config) as client:
                return await client.generate_groups(PROMPTS[:20], {"n": 3})

        groups = run(main())
    check_groups(groups, PROMPTS[:20], 3)
    assert len(flaky.requests) + len(ok.requests) > 20  # some were retried


def test_bad_request_is_not_retried_and_names_server():
    with FakeServer(lambda i, body: (400, {"error": {"message": "unknown field"}})) as bad:

        async def main():
            async with RolloutClient([bad.url], FAST) as client:
                await client.generate([1, 2], {"max_new_tokens": 1})

        with pytest.raises(ServerRequestError, match=bad.url) as info:
            run(main())
        assert "unknown field" in str(info.value)
        assert len(bad.requests) == 1


def test_server_gone_for_good_names_it():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there

    async def main():
        async with RolloutClient([url], FAST) as client:
            await client.generate([1, 2], {"max_new_tokens": 1})

    with pytest.raises(ServerGoneError, match=url) as info:
        run(main())
    assert "failed 4 time(s)" in str(info.value)


def test_a_server_whose_process_exited_is_not_retried():
    """A launched server killed mid-run: its process's exit code (the launcher's ``exit_code``)
    ends the retries at the first failure, instead of ~20 s of backoff and down-time."""
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there: the process is gone
    slow = ClientConfig(max_retries=3, backoff_initial_s=2.0, down_for_s=5.0)
    asked: list[str] = []

    def exit_code(server: str) -> int | None:
        asked.append(server)
        return -9

    async def main():
        async with RolloutClient([url], slow, exit_code=exit_code) as client:
            await client.generate([1, 2], {"max_new_tokens": 1})

    start = time.monotonic()
    with pytest.raises(ServerGoneError, match=f"rollout server {url} exited with code -9"):
        run(main())
    assert time.monotonic() - start < 2.0  # one attempt, no backoff
    assert asked == [url]


def test_server_failing_in_a_row_is_gone_for_good():
    with FakeServer(lambda i, body: (503, "down")) as dead, FakeServer() as ok:
        config = ClientConfig(
            max_retries=2, backoff_initial_s=0.001, down_for_s=0.0, max_consecutive_failures=3
        )

        async def main():
            async with RolloutClient([dead.url, ok.url], config) as client:
                for gid in range(20):
                    await client.generate([1, 2], {"max_new_tokens": 1}, group_id=gid)

        with pytest.raises(ServerGoneError, match=f"{dead.url} failed 3 requests in a row"):
            run(main())


def test_wrong_sample_count_is_malformed():
    with FakeServer(lambda i, body: (200, [])) as bad:

        async def main():
            async with RolloutClient([bad.url], FAST) as client:
                await client.generate([1, 2], {"n": 2})

        with pytest.raises(ServerGoneError, match="0 outputs for n=2"):
            run(main())


def _start_embedded(model_dir, port):
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "oprd_mega.cli",
            "serve",
            "--model",
            str(model_dir),
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def test_server_killed_and_restarted(tiny_model_dir, server):
    """A real server process is SIGKILLed mid-run; its port comes back later (in-process)."""
    from oprd_mega.rollout.embedded_server import EmbeddedServer, ServerConfig

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _start_embedded(tiny_model_dir, port)
    params = {"max_new_tokens": 4, "n": 2}
    restarted: list[EmbeddedServer] = []
    try:

        async def main():
            config = ClientConfig(max_retries=4, backoff_initial_s=0.05, down_for_s=0.5)
            async with RolloutClient([url, server.url], config) as client:
                await client.wait_healthy(timeout_s=120)
                before = await client.generate_groups(PROMPTS[:8], params)
                assert client.servers[0].completed > 0
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=10)
                during = await client.generate_groups(PROMPTS[:8], params, first_group_id=8)
                restarted.append(
                    EmbeddedServer(ServerConfig(str(tiny_model_dir), port=port)).start()
                )
                await asyncio.sleep(0.6)
                done_before = client.servers[0].completed
                after = await client.generate_groups(PROMPTS[:16], params, first_group_id=16)
                return before, during, after, client.servers[0].completed - done_before

        before, during, after, revived = run(main())
        for groups, first in ((before, 0), (during, 8), (after, 16)):
            for gid, group in enumerate(groups, start=first):
                assert len(group) == 2 and all(s.group_id == gid for s in group)
                assert all(s.response_length >= 1 for s in group)
        assert all(s.server == server.url for g in during for s in g)
        assert revived > 0, "the restarted server never got requests again"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)
        for srv in restarted:
            srv.stop()


def test_generate_against_embedded_server(server):
    async def main():
        async with RolloutClient([server.url]) as client:
            info = await client.get_model_info()
            groups = await client.generate_groups(
                [[5, 6, 7], [8, 9]], {"max_new_tokens": 5, "n": 3, "ignore_eos": True}
            )
            return info, groups

    start = time.monotonic()
    info, groups = run(main())
    assert time.monotonic() - start < 30
    assert info["is_generation"]
    for gid, group in enumerate(groups):
        assert len(group) == 3
        for s in group:
            assert s.group_id == gid and s.response_length == 5 and s.finish_reason == "length"
            assert s.weight_version == info["weight_version"]
            assert all(lp <= 0 for lp in s.response_logprobs)
