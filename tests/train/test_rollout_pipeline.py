"""The rollout pool against a fake server whose answers are a pure function of the request
(prompt, seed, budget) and the weights it serves: staleness, order, resume, partial rollouts."""

from __future__ import annotations

import concurrent.futures as cf
import json
import threading
from collections.abc import Sequence
from typing import Any

import pytest

from oprd_mega.rollout.samples import Sample, StaleRolloutError
from oprd_mega.rollout.sampling import SamplingConfig
from oprd_mega.train.prompt_stream import PromptStream
from oprd_mega.train.rollout_pipeline import RolloutPipeline

EOS = 0


class FakeServer:
    """Answers /generate like SGLang: ``n`` samples, seeded (the sample index added), tokens
    drawn from (prompt, seed, served weights). A prompt whose first token is in ``long``
    never stops: it runs until aborted (or its budget ends)."""

    def __init__(self, long: frozenset[int] = frozenset(), tokens_before_abort: int = 2) -> None:
        self.version = "v0"
        self.long = long
        self.tokens_before_abort = tokens_before_abort
        self.aborted = threading.Event()
        self.pool = cf.ThreadPoolExecutor(8)
        self.requests: list[tuple[list[int], dict[str, Any]]] = []

    def submit(self, prompt_ids: Sequence[int], params: dict[str, Any], group: int) -> cf.Future:
        self.requests.append((list(prompt_ids), params))
        return self.pool.submit(self._generate, list(prompt_ids), params, group, self.version)

    def abort_all(self) -> None:
        self.aborted.set()

    def _generate(self, prompt: list[int], params: dict[str, Any], group: int, version: str):
        budget = params["max_new_tokens"]
        samples = []
        for k in range(params["n"]):
            seed = params.get("sampling_seed", 0) + k
            mix = hash((tuple(prompt), seed, version)) % 1000
            if prompt[0] in self.long:
                self.aborted.wait(timeout=10)
                length = min(self.tokens_before_abort, budget)
                finish = "length" if length == budget else "abort"
            else:
                length = min(1 + mix % 3, budget)
                finish = "stop" if length < budget else "length"
            ids = tuple(1 + (mix + i) % 50 for i in range(length - 1)) + (
                (EOS,) if finish == "stop" else (7,) if length else ()
            )
            ids = ids[:length]
            samples.append(
                Sample(tuple(prompt), ids, (-0.5,) * len(ids), finish, version, group, k, "fake")
            )
        return samples


def route_of(prompt_ids: Sequence[int]) -> tuple[str, ...]:
    """A route per prompt (two teachers, by the parity of its first token)."""
    return ("even",) if prompt_ids[0] % 2 == 0 else ("odd", "even")


def make(server: FakeServer, prompts: PromptStream, staleness: int, partial: bool = False):
    sampling = SamplingConfig(n=2, max_new_tokens=6, sampling_seed=3)
    return RolloutPipeline(
        server.submit,
        server.abort_all,
        lambda count: [(ids, route_of(ids)) for ids in prompts.take(count)],
        sampling,
        prompts_per_step=3,
        max_staleness=staleness,
        partial=partial,
    )


def stream() -> PromptStream:
    return PromptStream([[100 + i, 5, 6] for i in range(10)], seed=0)


def run(pipeline: RolloutPipeline, server: FakeServer, steps: range) -> list[Any]:
    """The trainer's order: fill, take, (train), settle, sync; returns each step's batch."""
    batches = []
    for step in steps:
        pipeline.fill(step, server.version)
        batch = pipeline.take(step, server.version)
        batches.append(([(g.samples(), g.route) for g in batch.groups], batch.stats))
        pipeline.settle(step + 1)
        server.version = f"v{step + 1}"
    return batches


def test_staleness_zero_samples_each_step_with_its_weights() -> None:
    server = FakeServer()
    pipeline = make(server, stream(), staleness=0)
    batches = run(pipeline, server, range(4))
    for _, stats in batches:
        assert stats["rollout/staleness_max"] == 0.0
    # One request per group, seeded by (step, index in step): what the synchronous loop sends.
    assert len(server.requests) == 12 and not pipeline.pool and not pipeline.inflight


def test_one_step_off_trains_on_the_previous_weights_and_resumes_exactly() -> None:
    server = FakeServer()
    prompts = stream()
    pipeline = make(server, prompts, staleness=1)
    whole = run(pipeline, server, range(6))
    assert [stats["rollout/staleness_max"] for _, stats in whole] == [0.0] + [1.0] * 5
    assert [stats["rollout/staleness_mean"] for _, stats in whole] == [0.0] + [1.0] * 5

    # Stop after step 3 (its settle done, as at a checkpoint), then continue in a new pool.
    server = FakeServer()
    prompts = stream()
    first = make(server, prompts, staleness=1)
    part = run(first, server, range(3))
    # through JSON, as trainer_state.json keeps it
    saved, position = json.loads(json.dumps(first.state_dict())), prompts.state_dict()
    assert len(saved["pool"]) == 3  # step 3's groups, generated by step 2's weights
    prompts = stream()
    prompts.load_state_dict(position)
    second = make(server, prompts, staleness=1)
    second.load_state_dict(saved)
    part += run(second, server, range(3, 6))
    assert [b for b, _ in part] == [b for b, _ in whole]
    # every group keeps its prompt's route (the teachers that supervise it)
    routes = [(samples[0][0][0], route) for b, _ in whole for samples, route in b]
    assert {route for _, route in routes} == {("even",), ("odd", "even")}
    assert all(route == route_of([first]) for first, route in routes)


def test_a_wrong_weight_version_is_refused() -> None:
    server = FakeServer()
    pipeline = make(server, stream(), staleness=0)
    pipeline.fill(0, "v0")
    server.version = "v1"  # no effect on what is in flight; the next request is wrong
    pipeline.take(0, "v0")
    pipeline.fill(0, "v0")
    with pytest.raises(StaleRolloutError, match="'v1', not 'v0'"):
        pipeline.take(0, "v0")


def test_partial_rollouts_take_the_first_groups_and_continue_the_rest() -> None:
    # Prompts 100 and 101 never finish on their own: without partial rollouts a step waits
    # for them; with them the step takes other groups and the long ones continue later.
    server = FakeServer(long=frozenset({100, 101}), tokens_before_abort=2)
    prompts = PromptStream([[100 + i, 5, 6] for i in range(10)], seed=0, shuffle=False)
    pipeline = make(server, prompts, staleness=1, partial=True)
    pipeline.fill(0, "v0")  # 6 groups: 100..105
    batch = pipeline.take(0, "v0")
    assert all(g.prompt_ids[0] >= 102 for g in batch.groups)
    pipeline.settle(1)  # aborts 100 and 101 with two tokens each
    long = [g for g in pipeline.pool if g.prompt_ids[0] in (100, 101)]
    assert len(long) == 2 and all(len(d.response_ids) == 2 for g in long for d in g.drafts)
    assert all(d.versions == [0, 0] and not d.done for g in long for d in g.drafts)
    server.version = "v1"
    server.aborted.clear()
    server.tokens_before_abort = 4  # the continuation: 4 more tokens, the budget ends at 6
    sent = len(server.requests)
    pipeline.fill(1, "v1")
    continued = [(ids, p) for ids, p in server.requests[sent:] if ids[0] in (100, 101)]
    assert len(continued) == 4  # each sample of both groups, on its own
    assert all(len(ids) == 5 and p["max_new_tokens"] == 4 and p["n"] == 1 for ids, p in continued)
    server.aborted.set()  # the long ones now end at their budget
    cf.wait([future for future, _, _ in pipeline.inflight.values()])
    batch = pipeline.take(1, "v1")  # the oldest complete groups: 100, 101 and one of step 0
    taken = {g.prompt_ids[0]: g for g in batch.groups}
    assert {100, 101} <= set(taken)
    mixed = taken[100].drafts[0]
    assert mixed.versions == [0, 0, 1, 1, 1, 1] and mixed.finish_reason == "length"
    assert batch.stats["rollout/staleness_max"] == 1.0


def test_partial_responses_older_than_the_bound_start_again() -> None:
    server = FakeServer(long=frozenset({100}), tokens_before_abort=1)
    prompts = PromptStream([[100 + i, 5, 6] for i in range(10)], seed=0, shuffle=False)
    pipeline = make(server, prompts, staleness=1, partial=True)
    pipeline.fill(0, "v0")
    pipeline.take(0, "v0")
    pipeline.settle(1)  # 100: one token of v0
    server.version, server.aborted = "v1", threading.Event()
    pipeline.fill(1, "v1")
    pipeline.take(1, "v1")
    pipeline.settle(2)  # 100: v0 + v1 tokens; at v2 the v0 token lags 2 > 1: dropped
    group = next(g for g in pipeline.pool if g.prompt_ids[0] == 100)
    assert all(d.response_ids == [] and not d.done for d in group.drafts)
    server.version, server.aborted = "v2", threading.Event()
    pipeline.fill(2, "v2")
    batch = pipeline.take(2, "v2")
    assert batch.stats["rollout/restarted_samples"] == 2.0
    assert batch.stats["rollout/staleness_max"] <= 1.0
    server.aborted.set()


def test_partial_needs_a_staleness_bound() -> None:
    with pytest.raises(ValueError, match="max_staleness >= 1"):
        make(FakeServer(), stream(), staleness=0, partial=True)


def test_after_a_lost_server_the_failed_requests_are_sent_again() -> None:
    from oprd_mega.rollout.client import ServerGoneError

    server = FakeServer()
    real_submit = server.submit
    failing = {"on": True}

    def submit(prompt_ids: Sequence[int], params: dict[str, Any], group: int) -> cf.Future:
        if failing["on"] and prompt_ids[0] % 2:
            future: cf.Future = cf.Future()
            future.set_exception(ServerGoneError("server gone"))
            return future
        return real_submit(prompt_ids, params, group)

    prompts = PromptStream([[100 + i, 5, 6] for i in range(10)], seed=0, shuffle=False)
    pipeline = make(server, prompts, staleness=1)
    pipeline.submit = submit
    pipeline.fill(0, "v0")
    with pytest.raises(ServerGoneError):
        pipeline.take(0, "v0")
    pipeline.cancel()  # the trainer restarts the servers
    failing["on"] = False
    pipeline.fill(0, "v0")
    batch = pipeline.take(0, "v0")
    assert [g.prompt_ids[0] for g in batch.groups] == [100, 101, 102]  # the same prompts
    assert all(g.complete for g in batch.groups)
