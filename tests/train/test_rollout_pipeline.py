"""The rollout pool against a fake server whose answers are a pure function of the request
(prompt, seed, budget) and the weights it serves: staleness, order, resume, partial rollouts
cut by time and by tokens."""

from __future__ import annotations

import concurrent.futures as cf
import json
import random
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from oprd_mega.rollout.samples import Sample, StaleRolloutError
from oprd_mega.rollout.sampling import SamplingConfig
from oprd_mega.train.prompt_stream import PromptStream
from oprd_mega.train.rollout_pipeline import RolloutPipeline

EOS = 0
PROMPT_LENGTH = 3  # of every prompt below: the fake server counts what was generated past it


class FakeServer:
    """Answers /generate like SGLang: ``n`` samples, seeded (the sample index added), tokens
    drawn from (prompt, seed, served weights). A prompt whose first token is in ``long``
    never stops: it runs until aborted (or its budget ends). A prompt whose first token is in
    ``lengths`` has a response of that many tokens in all: a request continuing it from a
    partial response gives the rest, cut at the request's budget. ``delay`` (seconds per
    request) changes when answers come back, never what they are."""

    def __init__(
        self,
        long: frozenset[int] = frozenset(),
        tokens_before_abort: int = 2,
        lengths: dict[int, int] | None = None,
        delay: Callable[[list[int]], float] | None = None,
    ) -> None:
        self.version = "v0"
        self.long = long
        self.tokens_before_abort = tokens_before_abort
        self.lengths = lengths or {}
        self.delay = delay
        self.aborted = threading.Event()
        self.pool = cf.ThreadPoolExecutor(8)
        self.requests: list[tuple[list[int], dict[str, Any]]] = []

    def submit(self, prompt_ids: Sequence[int], params: dict[str, Any], group: int) -> cf.Future:
        self.requests.append((list(prompt_ids), params))
        return self.pool.submit(self._generate, list(prompt_ids), params, group, self.version)

    def abort_all(self) -> None:
        self.aborted.set()

    def _generate(self, prompt: list[int], params: dict[str, Any], group: int, version: str):
        if self.delay is not None:
            time.sleep(self.delay(prompt))
        budget = params["max_new_tokens"]
        samples = []
        for k in range(params["n"]):
            seed = params.get("sampling_seed", 0) + k
            mix = hash((tuple(prompt), seed, version)) % 1000
            if prompt[0] in self.lengths:
                rest = self.lengths[prompt[0]] - (len(prompt) - PROMPT_LENGTH)
                length = min(rest, budget)
                finish = "stop" if rest <= budget else "length"
            elif prompt[0] in self.long:
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


def make(
    server: FakeServer,
    prompts: PromptStream,
    staleness: int,
    partial: bool = False,
    chunk: int | None = None,
):
    sampling = SamplingConfig(n=2, max_new_tokens=6, sampling_seed=3)
    return RolloutPipeline(
        server.submit,
        server.abort_all,
        lambda count: [(ids, route_of(ids)) for ids in prompts.take(count)],
        sampling,
        prompts_per_step=3,
        max_staleness=staleness,
        partial=partial,
        chunk_tokens=chunk,
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
    cf.wait([request.future for request in pipeline.inflight.values()])
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


# Partial rollouts cut by tokens: response lengths (in all) by prompt; the budget is 6.
LENGTHS = {100: 9, 101: 5, 102: 1, 103: 2, 104: 2, 105: 1, 106: 4, 107: 4, 108: 4, 109: 3}


def test_chunks_continue_unfinished_responses_under_the_current_weights() -> None:
    server = FakeServer(lengths=LENGTHS)
    prompts = PromptStream([[100 + i, 5, 6] for i in range(10)], seed=0, shuffle=False)
    pipeline = make(server, prompts, staleness=1, partial=True, chunk=2)
    pipeline.fill(0, "v0")  # 6 groups, 100..105, each asked for 2 tokens
    assert [p["max_new_tokens"] for _, p in server.requests] == [2] * 6
    batch = pipeline.take(0, "v0")  # 100 and 101 come back cut at 2 tokens: skipped
    assert [g.prompt_ids[0] for g in batch.groups] == [102, 103, 104]
    pipeline.settle(1)  # waits for 105; nothing is aborted
    assert not server.aborted.is_set() and not pipeline.inflight
    cut = [g for g in pipeline.pool if not g.complete]
    assert [g.prompt_ids[0] for g in cut] == [100, 101]
    assert all(d.versions == [0, 0] and d.finish_reason is None for g in cut for d in g.drafts)

    server.version = "v1"
    sent = len(server.requests)
    pipeline.fill(1, "v1")  # 106..108 (2 tokens each) and the second chunk of 100 and 101
    batch = pipeline.take(1, "v1")
    # The first walk finds only 105 complete (100, 101: 4 tokens; 106..108: 2 of 4), so the
    # next chunk of each is sent under v1: 100 reaches the budget, 101 its end.
    assert [g.prompt_ids[0] for g in batch.groups] == [100, 101, 105]
    by_prompt = {g.prompt_ids[0]: g for g in batch.groups}
    assert all(d.versions == [0, 0, 1, 1, 1, 1] for d in by_prompt[100].drafts)
    assert all(d.finish_reason == "length" and d.requests == 3 for d in by_prompt[100].drafts)
    assert all(d.versions == [0, 0, 1, 1, 1] for d in by_prompt[101].drafts)
    assert all(d.finish_reason == "stop" for d in by_prompt[101].drafts)
    assert batch.stats["rollout/staleness_max"] == 1.0
    assert batch.stats["rollout/continued_samples"] == 4.0
    assert batch.stats["rollout/mixed_version_samples"] == 4.0
    continued = [(ids, p) for ids, p in server.requests[sent:] if ids[0] in (100, 101)]
    # Each sample on its own: (prompt + tokens so far, min(remaining budget, chunk)).
    assert sorted((len(ids), p["max_new_tokens"], p["n"]) for ids, p in continued) == (
        [(5, 2, 1)] * 4 + [(7, 2, 1)] * 4
    )
    pipeline.settle(2)  # 106..108 end with their second chunk
    assert all(g.complete for g in pipeline.pool)
    seeds = [p["sampling_seed"] for _, p in server.requests if p["n"] == 1]
    assert len(seeds) == len(set(seeds)) == 14  # no two continuations share a random stream


def _delays(order: int) -> Callable[[list[int]], float]:
    """Answer times: by prompt, longest first or last, with jitter."""
    jitter = random.Random(order)
    return lambda prompt: 0.002 * ((prompt[0] * (1 if order else -1)) % 7) + jitter.random() / 200


def _chunked(server: FakeServer, prompts: PromptStream, staleness: int = 1) -> RolloutPipeline:
    return make(server, prompts, staleness=staleness, partial=True, chunk=2)


@pytest.mark.parametrize("staleness", [1, 2])
def test_chunked_takes_depend_on_outcomes_not_on_timing(staleness: int) -> None:
    runs = []
    for order in (0, 1):
        server = FakeServer(lengths=LENGTHS, delay=_delays(order))
        runs.append(run(_chunked(server, stream(), staleness), server, range(6)))
    assert runs[0] == runs[1]
    stats = [s for _, s in runs[0]]
    assert sum(s["rollout/mixed_version_samples"] for s in stats) > 0
    assert all(s["rollout/staleness_max"] <= staleness for s in stats)


def test_chunked_pool_resumes_with_the_same_takes() -> None:
    server = FakeServer(lengths=LENGTHS, delay=_delays(0))
    whole = run(_chunked(server, stream()), server, range(6))

    server = FakeServer(lengths=LENGTHS, delay=_delays(1))
    prompts = stream()
    first = _chunked(server, prompts)
    part = run(first, server, range(3))
    saved, position = first.state_dict(), prompts.state_dict()
    assert any(not g.complete and g.drafts[0].response_ids for g in first.pool)  # cut ones
    prompts = stream()
    prompts.load_state_dict(position)
    second = _chunked(server, prompts)
    second.load_state_dict(saved)
    part += run(second, server, range(3, 6))
    assert part == whole


def test_chunks_need_partial_rollouts() -> None:
    with pytest.raises(ValueError, match="chunk_tokens needs partial"):
        make(FakeServer(), stream(), staleness=1, chunk=2)


@pytest.mark.parametrize(("chunk", "restarted"), [(2, 2.0), (3, 0.0)])
def test_a_response_needing_more_chunks_than_the_bound_allows_restarts(
    chunk: int, restarted: float
) -> None:
    # 100 runs to the 6-token budget; the others end at once. At max_staleness 1 a response
    # gets 2 chunks (one per step) before its oldest token ages out: 2 of 2 tokens are not
    # enough and it starts again; 2 of 3 (max_new_tokens / (max_staleness + 1)) are.
    lengths = {100 + i: 1 for i in range(10)} | {100: 6}
    server = FakeServer(lengths=lengths)
    prompts = PromptStream([[100 + i, 5, 6] for i in range(10)], seed=0, shuffle=False)
    batches = run(make(server, prompts, staleness=1, partial=True, chunk=chunk), server, range(3))
    assert [s["rollout/restarted_samples"] for _, s in batches] == [0.0, 0.0, restarted]
    steps = [
        k
        for k, (groups, _) in enumerate(batches)
        if any(samples[0][0][0] == 100 for samples, _ in groups)
    ]
    assert steps == ([] if restarted else [1])
    # Every request samples from a stream of its own, the restarted ones too.
    seeds = [p["sampling_seed"] + k for _, p in server.requests for k in range(p["n"])]
    assert len(seeds) == len(set(seeds))
