"""The rollouts of the coming steps, generated while the current step trains (rank 0).

A pool holds ``(max_staleness + 1) * prompts_per_step`` prompt groups. Each step:

1. :meth:`RolloutPipeline.fill` tops the pool up with new prompts and sends every unfinished
   response to the servers under the current weights (their step number is the version);
2. :meth:`RolloutPipeline.take` hands over ``prompts_per_step`` complete groups: the oldest
   ones, waited for (so a run is reproducible), or with ``partial`` the first ones to finish;
3. the step trains while the rest of the pool generates;
4. :meth:`RolloutPipeline.settle` runs before the weight sync: it waits for what is in flight,
   or with ``partial`` aborts it (SGLang keeps the aborted tokens) to continue it under the
   new weights at the next :meth:`fill`. Nothing is in flight during a sync, an evaluation or
   a checkpoint, so every token was sampled by one known version.

Partial rollouts come in two kinds. Cut by time (``chunk_tokens`` None): which groups finish
first, and where settle's abort cuts a response, depend on the servers' speed, so two runs
differ. Cut by tokens (``chunk_tokens`` set, Kimi k1.5's partial rollouts): every request asks
for at most ``chunk_tokens`` more tokens; a response that ends its chunk with budget left is
unfinished and continued by a later request, possibly under newer weights. :meth:`take` walks
the pool in order, waiting for each group's requests, takes the complete groups and skips the
unfinished ones (sending their next chunk when the pool runs out); settle only waits (a chunk
bounds it). Every decision then depends on what the requests return, never on when, so a run
is reproducible and resumes exactly, as without partial rollouts.

With ``max_staleness`` 0 the pool is one step's groups and this is the synchronous loop. A
group whose oldest token would lag the student by more than ``max_staleness`` steps when trained
has its stale responses dropped and sampled again from the prompt. Groups stay whole: a group
is taken only when all its ``n`` samples are complete.
"""

from __future__ import annotations

import concurrent.futures as cf
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, NamedTuple

from oprd_mega.rollout.samples import Sample, StaleRolloutError
from oprd_mega.rollout.sampling import (
    SamplingConfig,
    continuation_seed,
    prompt_seed,
    request_params,
)

Submit = Callable[[Sequence[int], dict[str, Any], int], cf.Future]
# A drawn prompt: its token ids and its route (the teachers that supervise it; None: all).
Drawn = tuple[Sequence[int], tuple[str, ...] | None]
_ABORT_RETRY_S = 1.0


@dataclass
class Draft:
    """One sample of a group: its response so far and the version of each token's weights."""

    response_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)  # optimizer step of the weights
    finish_reason: str | None = None  # None: unfinished (not sent yet, aborted, or cut)
    requests: int = 0  # requests the response took (more than 1: it was continued)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def reset(self) -> None:
        """Drop the response: it is sampled again from the prompt."""
        self.response_ids, self.logprobs, self.versions = [], [], []
        self.finish_reason = None
        self.requests = 0


@dataclass
class Group:
    """The ``n`` samples of one prompt. ``step`` and ``index`` (the step the group was first
    drawn for and its place among that step's prompts) seed its first request; ``restarted``:
    responses of it were dropped as too old (their new requests are seeded apart); ``route``
    names the teachers that supervise it (None: every teacher)."""

    uid: int
    step: int
    index: int
    prompt_ids: list[int]
    drafts: list[Draft]
    restarted: bool = False
    route: tuple[str, ...] | None = None

    @property
    def complete(self) -> bool:
        return all(d.done for d in self.drafts)

    def samples(self) -> list[tuple[list[int], int]]:
        """``(prompt + response ids, prompt length)`` of every sample."""
        return [(self.prompt_ids + d.response_ids, len(self.prompt_ids)) for d in self.drafts]


@dataclass
class TakenBatch:
    """One step's groups and what the step records about them."""

    groups: list[Group]
    stats: dict[str, float]


class Request(NamedTuple):
    """A request in flight: the weights it was sent under and the most tokens it may add."""

    future: cf.Future
    version: int
    version_name: str
    max_new_tokens: int | None


class RolloutPipeline:
    """The pool of one run's training rollouts (rank 0; every method runs on the caller's
    thread, the requests on the rollout service's generation thread)."""

    def __init__(
        self,
        submit: Submit,
        abort_all: Callable[[], None],
        take_prompts: Callable[[int], list[Drawn]],
        sampling: SamplingConfig,
        prompts_per_step: int,
        max_staleness: int = 0,
        partial: bool = False,
        chunk_tokens: int | None = None,
    ) -> None:
        if partial and max_staleness < 1:
            raise ValueError("partial rollouts need max_staleness >= 1")
        if chunk_tokens is not None and (not partial or chunk_tokens < 1):
            raise ValueError("chunk_tokens needs partial rollouts and a positive count")
        self.submit = submit
        self.abort_all = abort_all
        self.take_prompts = take_prompts
        self.sampling = sampling
        self.prompts_per_step = prompts_per_step
        self.max_staleness = max_staleness
        self.partial = partial
        self.chunk_tokens = chunk_tokens
        self.pool: list[Group] = []
        self.next_uid = 0
        # (group uid, draft index or -1 for the whole group) -> the request
        self.inflight: dict[tuple[int, int], Request] = {}
        self.restarted_samples = 0

    # ------------------------------------------------------------------ a step's calls

    def fill(self, version: int, version_name: str, steps_left: int | None = None) -> None:
        """Top the pool up with new prompts and send every unfinished response under weights
        ``version`` (served as ``version_name``); ``steps_left`` (this one included) keeps
        the pool from sampling for steps the run will not take."""
        ahead = (
            self.max_staleness + 1
            if steps_left is None
            else min(self.max_staleness + 1, steps_left)
        )
        target = ahead * self.prompts_per_step
        while len(self.pool) < target:
            count = min(self.prompts_per_step, target - len(self.pool))
            for prompt, route in self.take_prompts(count):
                uid = self.next_uid
                self.next_uid += 1
                n = self.sampling.n
                step, index = divmod(uid, self.prompts_per_step)
                drafts = [Draft() for _ in range(n)]
                group = Group(uid, step, index, list(prompt), drafts, route=route)
                self.pool.append(group)
        for group in self.pool:
            self._send(group, version, version_name)

    def take(self, version: int, version_name: str) -> TakenBatch:
        """``prompts_per_step`` complete groups for the student at ``version`` (waits)."""
        if self.chunk_tokens is not None:
            chosen = self._take_in_order(version, version_name)
        else:
            chosen = self._take_first(version, version_name)
        taken = {g.uid for g in chosen}
        self.pool = [g for g in self.pool if g.uid not in taken]
        drafts = [d for g in chosen for d in g.drafts]
        lags = [version - min(d.versions, default=version) for d in drafts]
        stats = {
            "rollout/staleness_mean": sum(lags) / len(lags),
            "rollout/staleness_max": float(max(lags)),
            "rollout/restarted_samples": float(self.restarted_samples),
            "rollout/continued_samples": float(sum(d.requests > 1 for d in drafts)),
            "rollout/mixed_version_samples": float(sum(len(set(d.versions)) > 1 for d in drafts)),
        }
        self.restarted_samples = 0
        return TakenBatch(chosen, stats)

    def settle(self, next_version: int) -> float:
        """Before a weight sync: nothing may be in flight. Waits for the requests (aborts them
        first with ``partial`` cut by time; a chunk bounds the wait when cut by tokens) and
        drops responses too old for a student at ``next_version``; returns the seconds
        waited."""
        start = time.perf_counter()
        while self.partial and self.chunk_tokens is None and self.inflight:
            # A request still on its way when the abort came runs on: abort again until none.
            self.abort_all()
            cf.wait([r.future for r in self.inflight.values()], timeout=_ABORT_RETRY_S)
            self._collect(block=False)
        self._collect(block=True)
        for group in self.pool:
            self._drop_stale(group, next_version)
        return time.perf_counter() - start

    def cancel(self) -> None:
        """Forget the requests in flight (servers lost, or shutting down): what came back is
        kept, the rest is sent again by the next :meth:`fill`."""
        for key, (future, *_) in list(self.inflight.items()):
            if future.done() and not future.cancelled() and future.exception() is None:
                continue  # answered: collected below
            future.cancel()
            del self.inflight[key]
        self._collect(block=False)

    # ------------------------------------------------------------------ checkpoint

    def state_dict(self) -> dict[str, Any]:
        """The pool (call after :meth:`settle`: nothing is in flight)."""
        if self.inflight:
            raise RuntimeError("rollout pipeline: state_dict() with requests in flight")
        return {"next_uid": self.next_uid, "pool": [asdict(g) for g in self.pool]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.next_uid = int(state["next_uid"])
        self.pool = [
            Group(
                uid=g["uid"],
                step=g["step"],
                index=g["index"],
                prompt_ids=list(g["prompt_ids"]),
                drafts=[Draft(**d) for d in g["drafts"]],
                restarted=g.get("restarted", False),
                route=None if g.get("route") is None else tuple(g["route"]),
            )
            for g in state["pool"]
        ]

    # ------------------------------------------------------------------ internals

    def _take_first(self, version: int, version_name: str) -> list[Group]:
        """The oldest complete groups, or with ``partial`` (cut by time) the first to
        complete: waits for requests as they finish."""
        while True:
            self._collect(block=False)
            chosen = self._choose(version, version_name)
            if chosen is not None:
                return chosen
            pending = [r.future for r in self.inflight.values()]
            if not pending:
                raise RuntimeError(
                    "rollout pipeline: no request is in flight but fewer than "
                    f"{self.prompts_per_step} groups are complete"
                )
            cf.wait(pending, return_when=cf.FIRST_COMPLETED)

    def _take_in_order(self, version: int, version_name: str) -> list[Group]:
        """Partial rollouts cut by tokens: walk the pool oldest first, waiting for each
        group's requests; take it when complete, skip it when a response came back cut at its
        chunk. When the walk ends short of ``prompts_per_step`` groups, send the next chunk of
        every unfinished response under ``version`` and walk again. Each decision depends on
        what the requests returned, not on when: the same takes whatever the servers' speed."""
        while True:
            chosen = []
            for group in self.pool:
                self._wait_for(group)
                if not group.complete:
                    continue
                if self._drop_stale(group, version):
                    self._send(group, version, version_name)
                    continue
                chosen.append(group)
                if len(chosen) == self.prompts_per_step:
                    return chosen
            unfinished = [g for g in self.pool if not g.complete]
            if not unfinished:
                raise RuntimeError(
                    f"rollout pipeline: the pool holds fewer than {self.prompts_per_step} groups"
                )
            for group in unfinished:
                self._send(group, version, version_name)

    def _wait_for(self, group: Group) -> None:
        """Wait for the requests of ``group`` and collect them (and whatever else is done)."""
        cf.wait([r.future for key, r in self.inflight.items() if key[0] == group.uid])
        self._collect(block=False)

    def _choose(self, version: int, version_name: str) -> list[Group] | None:
        """The groups to take now, or None to wait. Oldest first; with ``partial`` the first
        complete ones. A complete group with a response too old is restarted, not taken."""
        if self.partial:
            candidates = [g for g in self.pool if g.complete]
        else:
            candidates = self.pool[: self.prompts_per_step]
            if not all(g.complete for g in candidates):
                return None
        fresh = []
        for group in candidates:
            if self._drop_stale(group, version):
                self._send(group, version, version_name)
            else:
                fresh.append(group)
        if self.partial and len(fresh) >= self.prompts_per_step:
            return fresh[: self.prompts_per_step]
        if not self.partial and len(fresh) == len(candidates):
            return fresh
        return None

    def _drop_stale(self, group: Group, version: int) -> bool:
        """Reset the responses of ``group`` whose oldest token lags ``version`` by more than
        ``max_staleness``; whether any was."""
        dropped = False
        for draft in group.drafts:
            if draft.versions and version - draft.versions[0] > self.max_staleness:
                draft.reset()
                self.restarted_samples += 1
                dropped = True
        group.restarted |= dropped
        return dropped

    def _send(self, group: Group, version: int, version_name: str) -> None:
        """Request every unfinished response of ``group`` that is not in flight: the whole
        group in one request when none has tokens and none was dropped (seeded as the
        synchronous loop seeds it), otherwise each response on its own, continued from its
        tokens, with a seed of its own (:func:`continuation_seed`)."""
        if any(key[0] == group.uid for key in self.inflight):
            return
        todo = [j for j, d in enumerate(group.drafts) if not d.done]
        if not todo:
            return
        base = self.sampling.sampling_seed
        fresh = not group.restarted and not any(d.response_ids for d in group.drafts)
        if fresh and len(todo) == len(group.drafts):
            seed = None if base is None else prompt_seed(base, group.step, group.index)
            config = self._request(0, self.sampling.n)
            future = self.submit(group.prompt_ids, request_params(config, seed), group.uid)
            self.inflight[(group.uid, -1)] = Request(
                future, version, version_name, config.max_new_tokens
            )
            return
        for j in todo:
            draft = group.drafts[j]
            generated = len(draft.response_ids)
            config = self._request(generated, 1)
            params = request_params(config)
            if base is not None:  # a stream of its own for every request
                params["sampling_seed"] = continuation_seed(base, version, group.uid, j, generated)
            future = self.submit(group.prompt_ids + draft.response_ids, params, group.uid)
            self.inflight[(group.uid, j)] = Request(
                future, version, version_name, config.max_new_tokens
            )

    def _request(self, generated: int, n: int) -> SamplingConfig:
        """``n`` samples of this config for a response with ``generated`` tokens so far: the
        remaining budget, at most ``chunk_tokens`` of it."""
        s = self.sampling
        max_new = None if s.max_new_tokens is None else max(s.max_new_tokens - generated, 0)
        if self.chunk_tokens is not None:
            max_new = self.chunk_tokens if max_new is None else min(max_new, self.chunk_tokens)
        min_new = max(s.min_new_tokens - generated, 0)
        if max_new is not None:
            min_new = min(min_new, max_new)
        return replace(s, n=n, max_new_tokens=max_new, min_new_tokens=min_new)

    def _collect(self, block: bool) -> None:
        """Move finished requests' tokens into their groups (all of them with ``block``);
        the first failed request raises its error."""
        futures = [r.future for r in self.inflight.values()]
        if block and futures:
            cf.wait(futures)
        groups = {g.uid: g for g in self.pool}
        for key, (future, version, version_name, max_new) in list(self.inflight.items()):
            if not future.done():
                continue
            del self.inflight[key]
            samples: list[Sample] = future.result()  # raises the request's error
            stale = [s for s in samples if s.weight_version != version_name]
            if stale:
                raise StaleRolloutError(
                    f"{len(stale)} response(s) from {stale[0].server} came from weight version "
                    f"{stale[0].weight_version!r}, not {version_name!r}"
                )
            group = groups.get(key[0])
            if group is None:
                continue
            indices = range(len(samples)) if key[1] < 0 else [key[1]]
            for j, sample in zip(indices, samples, strict=True):
                self._extend(group.drafts[j], sample, version, max_new)

    def _extend(self, draft: Draft, sample: Sample, version: int, max_new: int | None) -> None:
        """Add a request's tokens to ``draft``; it stays unfinished when aborted (partial
        rollouts) or cut at its chunk with budget left (partial rollouts cut by tokens)."""
        draft.response_ids += sample.response_ids
        draft.logprobs += sample.response_logprobs
        draft.versions += [version] * sample.response_length
        draft.requests += 1
        budget = self.sampling.max_new_tokens
        cut = (
            self.chunk_tokens is not None
            and sample.finish_reason == "length"
            and max_new is not None
            and sample.response_length >= max_new
            and (budget is None or len(draft.response_ids) < budget)
        )
        aborted = sample.finish_reason == "abort" and self.partial
        draft.finish_reason = None if aborted or cut else sample.finish_reason
