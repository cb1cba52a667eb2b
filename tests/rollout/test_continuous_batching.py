"""Continuous batching in the embedded engine: requests join the running batch at the next
step and leave it when done, the control endpoints answer while it decodes, a pause holds
every request after it, and each sequence gets what transformers' own model gives it alone."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from oprd_mega.rollout.embedded_server import EmbeddedServer, ServerConfig
from oprd_mega.rollout.engine import PAUSE_MODES

from .greedy_reference import model_greedy
from .test_control_surface import loads, long_body, paced, post, start, wait_generated, wait_until
from .test_embedded_server import reference_logprobs


def greedy_body(prompt: list[int], tokens: int) -> dict:
    return {
        "input_ids": prompt,
        "sampling_params": {"max_new_tokens": tokens, "temperature": 0, "ignore_eos": True},
        "return_logprob": True,
    }


def check_against_reference(model, prompt: list[int], tokens: int, answer: dict) -> None:
    """Greedy ids equal ``model.generate``'s for the prompt alone; log-probs equal one
    unpadded forward's."""
    assert answer["meta_info"]["finish_reason"] == {"type": "length", "length": tokens}
    assert answer["output_ids"] == model_greedy(model, prompt, tokens)
    got = [entry[0] for entry in answer["meta_info"]["output_token_logprobs"]]
    assert got == pytest.approx(reference_logprobs(model, prompt, answer["output_ids"]), abs=2e-4)


@pytest.fixture
def paced_server(tiny_model_dir):
    with EmbeddedServer(ServerConfig(str(tiny_model_dir), port=0, seed=3)) as srv:
        yield paced(srv)


# (arrival s, prompt, new tokens): very different lengths, arriving while the first decodes.
STAGGERED = [
    (0.0, [5, 6, 7], 120),
    (0.3, list(range(20, 60)), 5),
    (0.5, [100], 60),
    (0.8, list(range(200, 217)), 2),
    (1.0, [9, 8, 7, 6, 5, 4, 3, 2, 1], 30),
]


def test_staggered_requests_join_the_running_batch_and_match_transformers(
    paced_server, reference_model
):
    url = paced_server.url
    began = time.monotonic()
    futures, finished = [], {}
    with ThreadPoolExecutor(len(STAGGERED)) as pool:
        for k, (arrival, prompt, tokens) in enumerate(STAGGERED):
            time.sleep(max(0.0, began + arrival - time.monotonic()))

            def call(k=k, prompt=prompt, tokens=tokens):
                answer = post(url, "/generate", greedy_body(prompt, tokens)).json()
                finished[k] = time.monotonic()
                return answer

            futures.append(pool.submit(call))
        answers = [f.result(timeout=120) for f in futures]
    for (_, prompt, tokens), answer in zip(STAGGERED, answers, strict=True):
        check_against_reference(reference_model, prompt, tokens, answer)
    # The short ones arrived while the first decoded and finished long before it: they joined
    # its batch rather than waiting for it to end (one batch at a time, each would finish after).
    for k in (1, 3, 4):
        assert finished[k] < finished[0]
    assert paced_server.engine.stats["max_batch"] >= 3


def test_one_batch_at_a_time_mode_waits_for_the_running_batch(tiny_model_dir, reference_model):
    config = ServerConfig(str(tiny_model_dir), port=0, continuous_batching=False)
    with EmbeddedServer(config) as srv:
        paced(srv)
        first = start(srv.url, greedy_body([5, 6, 7], 40))
        wait_generated(srv, 3, 2)
        second = start(srv.url, greedy_body([100], 3))
        wait_until(lambda: loads(srv.url)["num_waiting_reqs"] == 1)
        answers = [first.result(timeout=60), second.result(timeout=60)]
        assert srv.engine.stats["max_batch"] == 1
    check_against_reference(reference_model, [5, 6, 7], 40, answers[0])
    check_against_reference(reference_model, [100], 3, answers[1])


def test_control_endpoints_answer_within_a_second_while_decoding(paced_server):
    url = paced_server.url
    running = start(url, dict(long_body("busy"), sampling_params={"max_new_tokens": 400, "n": 4}))
    wait_generated(paced_server, 12, 4)
    calls = [
        ("GET", "/health", None),
        ("GET", "/health_generate", None),
        ("GET", "/v1/loads?include=core", None),
        ("POST", "/abort_request", {"rid": "no-such-request"}),
        ("POST", "/pause_generation", {"mode": "in_place"}),
        ("POST", "/continue_generation", {}),
    ]
    with httpx.Client(base_url=url, timeout=30) as client:
        for method, path, body in calls:
            began = time.monotonic()
            response = client.request(method, path, json=body)
            took = time.monotonic() - began
            assert response.status_code == 200, (path, response.text)
            assert took < 1.0, f"{path} took {took:.2f}s while a batch was decoding"
        assert client.get("/v1/loads").json()["loads"][0]["num_running_reqs"] == 4
        client.post("/abort_request", json={"abort_all": True})
    answers = running.result(timeout=60)
    for answer in answers:
        assert answer["meta_info"]["finish_reason"]["type"] == "abort"
        assert 4 <= len(answer["output_ids"]) < 400  # the partial tokens are kept


def test_pause_holds_a_request_sent_right_after_it_100_times(tiny_model_dir):
    with (
        EmbeddedServer(ServerConfig(str(tiny_model_dir), port=0, seed=1)) as srv,
        httpx.Client(base_url=srv.url, timeout=30) as control,
        httpx.Client(base_url=srv.url, timeout=30) as generate,
        ThreadPoolExecutor(1) as pool,
    ):
        body = {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 2}}
        for attempt in range(100):
            mode = PAUSE_MODES[attempt % len(PAUSE_MODES)]
            assert control.post("/pause_generation", json={"mode": mode}).status_code == 200
            pending = pool.submit(generate.post, "/generate", json=body)  # no gap
            prefills = srv.engine.stats["batches"]
            wait_until(lambda: srv.engine.load()["num_waiting_reqs"] == 1, 30)
            time.sleep(0.06)  # longer than the worker's idle poll
            assert srv.engine.load()["num_running_reqs"] == 0, (attempt, mode)
            assert srv.engine.stats["batches"] == prefills and not pending.done(), (attempt, mode)
            assert control.post("/continue_generation", json={}).status_code == 200
            answer = pending.result(timeout=30).json()
            assert answer["meta_info"]["finish_reason"] == {"type": "length", "length": 2}


def test_64_concurrent_requests_of_mixed_lengths_equal_transformers(
    tiny_model_dir, reference_model
):
    lengths = [2, 3, 5, 8, 13, 40]  # long-tailed: most short, a few long
    cases = [
        ([(11 * i + k) % 300 + 3 for k in range(1 + (7 * i) % 23)], lengths[i % len(lengths)])
        for i in range(64)
    ]
    with EmbeddedServer(ServerConfig(str(tiny_model_dir), port=0, max_batch_size=16)) as srv:
        with ThreadPoolExecutor(64) as pool:
            answers = list(
                pool.map(lambda c: post(srv.url, "/generate", greedy_body(*c)).json(), cases)
            )
        assert srv.engine.stats["max_batch"] <= 16
    for (prompt, tokens), answer in zip(cases, answers, strict=True):
        check_against_reference(reference_model, prompt, tokens, answer)


def test_closing_ends_running_sequences_as_aborted_with_their_tokens(tiny_model_dir):
    srv = paced(EmbeddedServer(ServerConfig(str(tiny_model_dir), port=0)).start())
    running = start(srv.url, greedy_body([5, 6, 7], 400))
    wait_generated(srv, 3, 3)
    srv.stop()
    answer = running.result(timeout=60)
    assert answer["meta_info"]["finish_reason"]["type"] == "abort"
    assert answer["meta_info"]["finish_reason"]["message"] == "server shutting down"
    assert 3 <= len(answer["output_ids"]) < 400
