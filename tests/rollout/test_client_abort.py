"""RolloutClient leaves nothing decoding for nobody: it aborts its requests on timeouts,
cancellation and shutdown, and pauses/continues generation (checked on a real embedded server,
with the requests it sends recorded and checked against SGLang's schema)."""

from __future__ import annotations

import asyncio
import time

import pytest

from oprd_mega.rollout.client import ClientConfig, RolloutClient, ServerGoneError
from oprd_mega.rollout.embedded_server import EmbeddedServer, ServerConfig

from .test_control_surface import LONG, paced, schema  # noqa: F401  (schema: a fixture)
from .test_sglang_conformance import Recorder


@pytest.fixture
def slow_server(tiny_model_dir):
    with EmbeddedServer(ServerConfig(str(tiny_model_dir), port=0, seed=5)) as srv:
        yield paced(srv)


def idle(srv: EmbeddedServer) -> bool:
    load = srv.engine.load()
    return load["num_running_reqs"] == load["num_waiting_reqs"] == 0


async def wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def sent(recorder: Recorder, path: str) -> list[dict]:
    return [body for p, body in recorder.bodies if p == path]


PARAMS = {"max_new_tokens": LONG, "ignore_eos": True}


def test_timed_out_request_is_aborted_on_its_server(slow_server, schema):  # noqa: F811
    recorder = Recorder()
    config = ClientConfig(timeout_s=0.5, max_retries=0)

    async def main():
        async with RolloutClient([slow_server.url], config, transport=recorder) as client:
            with pytest.raises(ServerGoneError, match="timed out"):
                await client.generate([5, 6, 7], PARAMS)
            await wait_for(lambda: idle(slow_server))

    asyncio.run(main())
    (generate,) = sent(recorder, "/generate")
    (abort,) = sent(recorder, "/abort_request")
    assert abort == {"rid": generate["rid"]}
    schema.AbortRequest.from_json_value(abort)
    schema.GenerateRequest.from_json_value(generate)
    assert slow_server.engine.stats["tokens"] < LONG  # ended early, not run to its length


def test_cancelled_and_running_requests_are_aborted_on_close(slow_server):
    recorder = Recorder()

    async def main():
        client = RolloutClient([slow_server.url], transport=recorder)
        cancelled = asyncio.create_task(client.generate([5, 6, 7], PARAMS))
        await wait_for(lambda: slow_server.engine.load()["num_running_reqs"] == 1)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        await wait_for(lambda: idle(slow_server))
        running = asyncio.create_task(client.generate([5, 6, 7], dict(PARAMS, n=2)))
        await wait_for(lambda: slow_server.engine.load()["num_running_reqs"] == 2)
        await client.aclose()  # shutdown while a request still decodes
        await wait_for(lambda: idle(slow_server))
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)

    asyncio.run(main())
    generates = sent(recorder, "/generate")
    aborts = sent(recorder, "/abort_request")
    assert [a["rid"] for a in aborts] == [g["rid"] for g in generates]
    assert slow_server.engine.stats["tokens"] < 3 * LONG


def test_pause_and_continue_generation(slow_server):
    recorder = Recorder()

    async def main():
        async with RolloutClient([slow_server.url], transport=recorder) as client:
            await client.pause_generation()
            assert slow_server.engine.paused == "retract"
            await client.continue_generation()
            assert slow_server.engine.paused is None
            await client.pause_generation(mode="in_place")
            assert slow_server.engine.paused == "in_place"
            await client.continue_generation()

    asyncio.run(main())
    assert sent(recorder, "/pause_generation") == [{"mode": "retract"}, {"mode": "in_place"}]
    assert sent(recorder, "/continue_generation") == [{}, {}]
