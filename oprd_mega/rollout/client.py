"""Asynchronous client for SGLang's native HTTP API across several servers.

Requests go to the live server with the fewest outstanding requests, at most
``max_concurrency_per_server`` at a time each. Transient failures (connection errors, timeouts,
HTTP 408/429/5xx, malformed answers) are retried with exponential backoff, preferably on another
server; each logical request yields the samples of exactly one successful attempt, so a retry
never loses or duplicates a rollout. Errors name the server. Every attempt carries its own
``rid``: an attempt that times out or is cancelled, and every attempt still running when the
client closes, is aborted on its server (/abort_request), so nothing keeps decoding for nobody.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from oprd_mega.rollout.samples import MalformedResponseError, Sample, parse_generate_output

TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})


class RolloutError(RuntimeError):
    """Base class of the client's errors."""


class ServerRequestError(RolloutError):
    """A server rejected a request (HTTP 4xx other than 408/429): retrying cannot help."""


class ServerGoneError(RolloutError):
    """A request failed on every attempt; the message lists each server and its error."""


class WeightUpdateError(RolloutError):
    """A server answered a weight update with ``success: false`` or an error."""


class _Transient(Exception):
    """An attempt failed in a way another attempt may not."""


class _TimedOut(_Transient):
    """An attempt got no answer in time; the server may still be working on it."""


@dataclass(frozen=True)
class ClientConfig:
    """Concurrency, timeouts and retry policy of :class:`RolloutClient`."""

    max_concurrency_per_server: int = 64
    timeout_s: float = 600.0
    connect_timeout_s: float = 10.0
    max_retries: int = 3
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 10.0
    down_for_s: float = 5.0
    # A server failing this many requests in a row is gone for good: raise instead of routing
    # around it forever (None: keep trying it every ``down_for_s``).
    max_consecutive_failures: int | None = 20

    def __post_init__(self) -> None:
        if self.max_concurrency_per_server < 1:
            raise ValueError("ClientConfig.max_concurrency_per_server must be >= 1")
        if self.max_retries < 0:
            raise ValueError("ClientConfig.max_retries must be >= 0")
        if self.timeout_s <= 0 or self.connect_timeout_s <= 0:
            raise ValueError("ClientConfig timeouts must be positive")


@dataclass
class ServerState:
    """What the client knows about one server."""

    url: str
    outstanding: int = 0
    completed: int = 0
    failures: int = 0
    down_until: float = 0.0
    last_error: str | None = None
    latencies: list[float] = field(default_factory=list)
    # rids of this client's /generate attempts the server may still be decoding.
    running: set[str] = field(default_factory=set)


class RolloutClient:
    """Talks to one or more SGLang (or embedded) servers; use as ``async with``."""

    def __init__(
        self,
        urls: Sequence[str],
        config: ClientConfig | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        exit_code: Callable[[str], int | None] | None = None,
    ) -> None:
        if not urls:
            raise ValueError("RolloutClient needs at least one server URL")
        self.config = config or ClientConfig()
        # The exit code of the process serving a URL, None while it runs (launched servers):
        # a failed request to a server whose process exited is not retried.
        self._exit_code = exit_code
        self.servers = [ServerState(url.rstrip("/")) for url in urls]
        timeout = httpx.Timeout(self.config.timeout_s, connect=self.config.connect_timeout_s)
        limits = httpx.Limits(
            max_connections=self.config.max_concurrency_per_server * len(urls) + 8,
            max_keepalive_connections=self.config.max_concurrency_per_server * len(urls),
        )
        self._http = httpx.AsyncClient(timeout=timeout, limits=limits, transport=transport)
        self._cond = asyncio.Condition()
        self._group_counter = 0

    async def __aenter__(self) -> RolloutClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Abort this client's requests still running on the servers, then close the HTTP
        connections."""
        await asyncio.gather(
            *(self._abort(s.url, rid) for s in self.servers for rid in sorted(s.running))
        )
        await self._http.aclose()

    async def _abort(self, url: str, rid: str) -> None:
        """Best effort /abort_request for one attempt (the server may be gone already)."""
        with contextlib.suppress(httpx.HTTPError, RuntimeError):  # RuntimeError: closed client
            await self._http.post(url + "/abort_request", json={"rid": rid}, timeout=5.0)

    @property
    def urls(self) -> list[str]:
        """The servers' base URLs."""
        return [s.url for s in self.servers]

    # ----- choosing a server -----

    async def _acquire(self, avoid: set[str]) -> ServerState:
        cap = self.config.max_concurrency_per_server
        async with self._cond:
            while True:
                now = time.monotonic()
                free = [s for s in self.servers if s.outstanding < cap]
                live = [s for s in free if s.down_until <= now]
                preferred = [s for s in live if s.url not in avoid] or live
                if preferred:
                    best = min(preferred, key=lambda s: (s.outstanding, s.completed))
                    best.outstanding += 1
                    return best
                # Wake when a request finishes or the first down server may be tried again.
                wake = [s.down_until - now for s in free if s.down_until > now]
                timeout = max(min(wake), 0.01) if wake else None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._cond.wait(), timeout)

    async def _release(self, state: ServerState, error: str | None, elapsed: float) -> None:
        async with self._cond:
            state.outstanding -= 1
            if error is None:
                state.completed += 1
                state.failures = 0
                state.latencies.append(elapsed)
                del state.latencies[:-256]
            else:
                state.failures += 1
                state.last_error = error
                state.down_until = time.monotonic() + self.config.down_for_s
            self._cond.notify_all()

    def _backoff(self, attempt: int) -> float:
        return min(self.config.backoff_initial_s * 2**attempt, self.config.backoff_max_s)

    # ----- HTTP -----

    async def _request(
        self, url: str, method: str, path: str, body: Any = None, timeout: float | None = None
    ) -> Any:
        """One HTTP call; raises _Transient or ServerRequestError naming ``url``."""
        try:
            response = await self._http.request(
                method,
                url + path,
                json=body,
                timeout=httpx.USE_CLIENT_DEFAULT if timeout is None else timeout,
            )
        except httpx.TimeoutException as exc:
            raise _TimedOut(f"{url}{path}: timed out ({type(exc).__name__})") from exc
        except httpx.TransportError as exc:
            raise _Transient(f"{url}{path}: {type(exc).__name__}: {exc}") from exc
        if response.status_code in TRANSIENT_STATUS:
            raise _Transient(f"{url}{path}: HTTP {response.status_code}: {response.text[:300]}")
        if response.status_code >= 400:
            raise ServerRequestError(
                f"{url}{path} rejected the request: HTTP {response.status_code}: "
                f"{response.text[:500]}"
            )
        if not response.content:
            return None
        try:
            return response.json()
        except json.JSONDecodeError:
            if response.headers.get("content-type", "").startswith("application/json"):
                raise _Transient(f"{url}{path}: the answer is not valid JSON") from None
            return response.text

    # ----- generation -----

    async def generate(
        self,
        prompt_ids: Sequence[int],
        sampling_params: dict[str, Any],
        group_id: int | None = None,
        return_logprob: bool = True,
    ) -> list[Sample]:
        """Sample ``sampling_params["n"]`` (default 1) responses to one prompt.

        Retries transient failures; raises :class:`ServerGoneError` when every attempt failed
        and :class:`ServerRequestError` when a server rejects the request itself.
        """
        if group_id is None:
            group_id = self._group_counter
            self._group_counter += 1
        n = int(sampling_params.get("n", 1) or 1)
        body = {
            "input_ids": list(prompt_ids),
            "sampling_params": dict(sampling_params),
            "return_logprob": return_logprob,
        }
        errors: list[str] = []
        tried: set[str] = set()
        for attempt in range(self.config.max_retries + 1):
            state = await self._acquire(tried)
            start = time.monotonic()
            error: str | None = None
            rid = uuid.uuid4().hex
            state.running.add(rid)
            try:
                data = await self._aborting(state, rid, dict(body, rid=rid))
                outputs = data if isinstance(data, list) else [data]
                if len(outputs) != n:
                    raise MalformedResponseError(
                        f"/generate answer from {state.url}: {len(outputs)} outputs for n={n}"
                    )
                return [
                    parse_generate_output(out, prompt_ids, group_id, k, state.url)
                    if return_logprob
                    else _parse_without_logprobs(out, prompt_ids, group_id, k, state.url)
                    for k, out in enumerate(outputs)
                ]
            except (_Transient, MalformedResponseError) as exc:
                error = str(exc)
                errors.append(error)
                tried.add(state.url)
            finally:
                await self._release(state, error, time.monotonic() - start)
            self._raise_if_exited(state.url, error)
            limit = self.config.max_consecutive_failures
            if limit is not None and state.failures >= limit:
                raise ServerGoneError(
                    f"rollout server {state.url} failed {state.failures} requests in a row and "
                    f"is taken as gone; last error: {state.last_error}"
                )
            if attempt < self.config.max_retries:
                await asyncio.sleep(self._backoff(attempt))
        raise ServerGoneError(
            f"/generate for group {group_id} failed {len(errors)} time(s): " + " | ".join(errors)
        )

    def _raise_if_exited(self, url: str, error: str | None) -> None:
        """After a failed attempt: ServerGoneError at once when ``url``'s process has exited,
        instead of retrying a dead server for the whole backoff (~20 s seen)."""
        if error is None or self._exit_code is None:
            return
        code = self._exit_code(url)
        if code is not None:
            raise ServerGoneError(
                f"rollout server {url} exited with code {code}; last error: {error}"
            )

    async def _aborting(self, state: ServerState, rid: str, body: dict[str, Any]) -> Any:
        """POST /generate; abort ``rid`` on the server when the attempt times out or is
        cancelled (with ``n`` > 1 SGLang names the samples ``rid_k``, and its abort's prefix
        match ends them all)."""
        try:
            return await self._request(state.url, "POST", "/generate", body)
        except _TimedOut:
            await self._abort(state.url, rid)
            raise
        except asyncio.CancelledError:
            await asyncio.shield(self._abort(state.url, rid))
            raise
        finally:
            state.running.discard(rid)

    async def generate_groups(
        self,
        prompts: Sequence[Sequence[int]],
        sampling_params: dict[str, Any],
        first_group_id: int = 0,
        return_logprob: bool = True,
    ) -> list[list[Sample]]:
        """Sample every prompt concurrently; group ``i`` gets id ``first_group_id + i``."""
        tasks = [
            self.generate(p, sampling_params, first_group_id + i, return_logprob)
            for i, p in enumerate(prompts)
        ]
        return list(await asyncio.gather(*tasks))

    # ----- control endpoints -----

    async def health(self, url: str, timeout: float = 5.0) -> bool:
        """Whether ``url``/health answers 200."""
        try:
            response = await self._http.get(url + "/health", timeout=timeout)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def wait_healthy(self, timeout_s: float = 600.0, poll_s: float = 0.5) -> None:
        """Wait until every server answers /health; raise naming those that never did."""
        deadline = time.monotonic() + timeout_s
        pending = set(self.urls)
        while pending:
            results = await asyncio.gather(*(self.health(u) for u in sorted(pending)))
            pending -= {u for u, ok in zip(sorted(pending), results, strict=True) if ok}
            if not pending:
                return
            if time.monotonic() > deadline:
                raise ServerGoneError(
                    f"no healthy answer within {timeout_s}s from: {', '.join(sorted(pending))}"
                )
            await asyncio.sleep(poll_s)

    async def call(self, url: str, method: str, path: str, body: Any = None) -> Any:
        """One control call on one server with retries on transient errors."""
        errors: list[str] = []
        for attempt in range(self.config.max_retries + 1):
            try:
                return await self._request(url, method, path, body)
            except _Transient as exc:
                errors.append(str(exc))
                self._raise_if_exited(url.rstrip("/"), str(exc))
            if attempt < self.config.max_retries:
                await asyncio.sleep(self._backoff(attempt))
        raise ServerGoneError(f"{url}{path} failed {len(errors)} time(s): " + " | ".join(errors))

    async def call_all(self, method: str, path: str, body: Any = None) -> list[Any]:
        """The same control call on every server, concurrently."""
        return list(await asyncio.gather(*(self.call(u, method, path, body) for u in self.urls)))

    async def get_model_info(self, url: str | None = None) -> dict[str, Any]:
        """GET /get_model_info of one server (the first by default)."""
        return await self.call(url or self.urls[0], "GET", "/get_model_info")

    async def flush_cache(self) -> None:
        """POST /flush_cache on every server."""
        await self.call_all("POST", "/flush_cache")

    async def pause_generation(self, mode: str = "retract", urls: Sequence[str] = ()) -> None:
        """POST /pause_generation on every server (or those in ``urls``) in SGLang's ``mode``:
        ``retract`` (requests in flight resume after /continue_generation, re-prefilled with
        the new weights, nothing lost), ``abort`` (they end with finish_reason abort) or
        ``in_place`` (they keep their KV cache)."""
        targets = list(urls) or self.urls
        await asyncio.gather(
            *(self.call(u, "POST", "/pause_generation", {"mode": mode}) for u in targets)
        )

    async def continue_generation(self, urls: Sequence[str] = ()) -> None:
        """POST /continue_generation on every server (or those in ``urls``)."""
        targets = list(urls) or self.urls
        await asyncio.gather(*(self.call(u, "POST", "/continue_generation", {}) for u in targets))

    async def update_weights_from_disk(
        self,
        model_path: str,
        weight_version: str | None = None,
        flush_cache: bool = True,
        urls: Sequence[str] = (),
    ) -> None:
        """Make every server (or those in ``urls``) reload its weights from ``model_path``."""
        body: dict[str, Any] = {"model_path": model_path, "flush_cache": flush_cache}
        if weight_version is not None:
            body["weight_version"] = weight_version
        await self._update_all("/update_weights_from_disk", body, urls)

    async def _update_all(self, path: str, body: dict[str, Any], urls: Sequence[str] = ()) -> None:
        targets = list(urls) or self.urls
        results = await asyncio.gather(
            *(self.update_one(u, path, body) for u in targets), return_exceptions=True
        )
        failures = [f"{u}: {r}" for u, r in zip(targets, results, strict=True) if r is not None]
        if failures:
            raise WeightUpdateError(f"{path} failed on: " + " | ".join(failures))

    async def update_one(self, url: str, path: str, body: dict[str, Any]) -> str | None:
        """POST a weight-update call to one server; ``None`` on success, else the reason."""
        try:
            answer = await self._request(url, "POST", path, body)
        except (RolloutError, _Transient) as exc:
            return str(exc)
        if not isinstance(answer, dict) or not answer.get("success", False):
            return f"answered {answer!r}"
        return None

    async def init_weights_update_group(
        self,
        master_address: str,
        master_port: int,
        world_size: int,
        group_name: str,
        backend: str,
        rank_offsets: Sequence[int],
        urls: Sequence[str] = (),
    ) -> None:
        """Ask server ``i`` to join the group as rank ``rank_offsets[i]`` (blocks until all do)."""
        targets = list(urls) or self.urls
        results = await asyncio.gather(
            *(
                self.update_one(
                    url,
                    "/init_weights_update_group",
                    {
                        "master_address": master_address,
                        "master_port": master_port,
                        "rank_offset": offset,
                        "world_size": world_size,
                        "group_name": group_name,
                        "backend": backend,
                    },
                )
                for url, offset in zip(targets, rank_offsets, strict=True)
            )
        )
        failures = [f"{u}: {r}" for u, r in zip(targets, results, strict=True) if r is not None]
        if failures:
            raise WeightUpdateError("init_weights_update_group failed on: " + " | ".join(failures))

    async def update_weights_from_distributed(
        self,
        names: Sequence[str],
        dtypes: Sequence[str],
        shapes: Sequence[Sequence[int]],
        group_name: str,
        weight_version: str | None = None,
        flush_cache: bool = True,
        urls: Sequence[str] = (),
    ) -> None:
        """Tell every server to receive one broadcast bucket (the caller broadcasts it)."""
        body: dict[str, Any] = {
            "names": list(names),
            "dtypes": list(dtypes),
            "shapes": [list(s) for s in shapes],
            "group_name": group_name,
            "flush_cache": flush_cache,
        }
        if weight_version is not None:
            body["weight_version"] = weight_version
        await self._update_all("/update_weights_from_distributed", body, urls)


def _parse_without_logprobs(
    output: Any, prompt_ids: Sequence[int], group_id: int, index: int, server: str
) -> Sample:
    """Like :func:`parse_generate_output` for answers without log-probs (NaN placeholders)."""
    if isinstance(output, dict) and isinstance(output.get("meta_info"), dict):
        ids = output.get("output_ids")
        if isinstance(ids, list):
            meta = dict(output["meta_info"])
            meta["output_token_logprobs"] = [[0.0, t, None] for t in ids]
            sample = parse_generate_output(
                dict(output, meta_info=meta), prompt_ids, group_id, index, server
            )
            return Sample(
                prompt_ids=sample.prompt_ids,
                response_ids=sample.response_ids,
                response_logprobs=tuple(float("nan") for _ in ids),
                finish_reason=sample.finish_reason,
                weight_version=sample.weight_version,
                group_id=group_id,
                index=index,
                server=server,
            )
    return parse_generate_output(output, prompt_ids, group_id, index, server)
