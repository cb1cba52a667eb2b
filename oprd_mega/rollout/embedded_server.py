"""The embedded rollout server: SGLang's native HTTP API over a transformers model on CPU.

Same endpoints and JSON shapes as ``python -m sglang.launch_server`` for what training uses
(/generate, /health, /get_model_info, /flush_cache, weight updates from disk and from a
distributed group), so the client and weight sync run unchanged against either. Run it with
``oprd-mega serve --model DIR --host H --port P``.
"""

from __future__ import annotations

import json
import logging
import queue
import select
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, wait
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

from oprd_mega.lifetime import exit_within_after_signal
from oprd_mega.rollout.engine import (
    MEMORY_TAGS,
    PAUSE_MODES,
    GenerationEngine,
    MemoryReleasedError,
    SequenceJob,
)
from oprd_mega.rollout.sampling import SamplingParamsError, parse_sampling_params
from oprd_mega.rollout.tensor_payload import decode_flattened_bucket, decode_named_tensors
from oprd_mega.rollout.weight_checker import SELECTORS

log = logging.getLogger(__name__)

# Fields of GenerateRequest that change the answer in ways this server does not implement.
_UNSUPPORTED_REQUEST_FIELDS = (
    "return_hidden_states",
    "image_data",
    "video_data",
    "audio_data",
    "lora_path",
    "session_params",
    "custom_logit_processor",
    "token_ids_logprob",
    "bootstrap_host",
)
SERVER_VERSION = "oprd-embedded-0.1"
# SGLang's server-sent events framing of a streamed /generate (http_server.py stream_results).
SSE_PREFIX, SSE_END, SSE_DONE = b"data: ", b"\n\n", b"data: [DONE]\n\n"
# The sections SGLang's /v1/loads accepts in ``include`` (this server fills only ``core``).
_LOAD_SECTIONS = frozenset({"core", "memory", "spec", "lora", "disagg", "queues", "all"})
# After SIGTERM the server has this long to stop by itself, then exits: its launcher may be gone
# (the parent-death signal), and nobody would be left to SIGKILL a server whose stop hangs.
EXIT_GRACE_S = 10.0


class _HTTPServer(ThreadingHTTPServer):
    """A thread per connection, with a listen backlog deep enough for bursts of rollouts."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024


class RequestError(ValueError):
    """A request the server rejects with HTTP 400; the message names the field."""


class ClientGoneError(ConnectionError):
    """The client of a /generate request disconnected; its sequences were aborted."""


@dataclass(frozen=True)
class ServerConfig:
    """How to run the embedded server."""

    model_path: str
    host: str = "127.0.0.1"
    port: int = 30000
    max_batch_size: int = 32
    dtype: str = "float32"
    seed: int | None = None
    weight_version: str = "default"
    batch_wait_s: float = 0.005
    # False: a new request starts only when the running batch has ended (for benchmarks).
    continuous_batching: bool = True
    # SGLang's --enable-memory-saver: /release_memory_occupation really frees the weights.
    enable_memory_saver: bool = False
    # Seconds slept per decoding step, the CPU free (benchmarks: generation of a set duration).
    decode_step_delay_s: float = 0.0
    request_timeout_s: float = 3600.0
    # Bounds of one /generate request: samples per prompt, sequences in all, top log-probs.
    max_n: int = 1024
    max_request_sequences: int = 4096
    max_top_logprobs_num: int = 1024

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_n", "max_request_sequences"):
            if getattr(self, name) < 1:
                raise ValueError(f"ServerConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_top_logprobs_num < 0:
            raise ValueError(
                f"ServerConfig.max_top_logprobs_num must be >= 0, got {self.max_top_logprobs_num}"
            )


def _as_list(value: Any, count: int, field: str) -> list[Any]:
    if isinstance(value, list):
        if len(value) != count:
            raise RequestError(f"{field} has {len(value)} entries for {count} prompts")
        return value
    return [value] * count


def _int_field(value: Any, field: str, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{field} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise RequestError(f"{field} must be {bound}, got {value}")
    return value


def _request_ids(rid: Any, count: int) -> list[str | None]:
    """One rid per prompt (SGLang: a string for one prompt, a list of strings for a batch)."""
    if rid is None:
        return [None] * count
    rids = [rid] if isinstance(rid, str) else rid
    if not isinstance(rids, list) or not all(isinstance(r, str) and r for r in rids):
        raise RequestError("rid must be a non-empty string or a list of them")
    if len(rids) != count:
        raise RequestError(f"rid has {len(rids)} entries for {count} prompts")
    return rids


def build_jobs(
    body: Any, engine: GenerationEngine, config: ServerConfig | None = None
) -> tuple[list[SequenceJob], bool]:
    """Turn a /generate body into sequence jobs; the flag says whether to answer one object.

    ``config`` bounds ``n``, the sequences of one request and ``top_logprobs_num``.
    """
    config = config or ServerConfig(model_path=engine.model_path)
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    for name in _UNSUPPORTED_REQUEST_FIELDS:
        if body.get(name) not in (None, False, [], {}):
            raise RequestError(f"{name} is not supported by the embedded server")
    ids = body.get("input_ids")
    text = body.get("text")
    if ids is None and text is None:
        raise RequestError("the request needs input_ids or text")
    if ids is None:
        if engine.tokenizer is None:
            raise RequestError("text prompts need a tokenizer in the model directory")
        texts = [text] if isinstance(text, str) else text
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise RequestError("text must be a string or a list of strings")
        prompts = [list(engine.tokenizer.encode(t)) for t in texts]
        single = isinstance(text, str)
    else:
        single = isinstance(ids, list) and all(isinstance(t, int) for t in ids)
        prompts = [ids] if single else ids
        if not isinstance(prompts, list) or not all(
            isinstance(p, list)
            and p
            and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
            for p in prompts
        ):
            raise RequestError(
                "input_ids must be a non-empty list of integers or a list of such lists"
            )
    count = len(prompts)
    raw_params = body.get("sampling_params")
    params_list = _as_list(raw_params, count, "sampling_params") if not single else [raw_params]
    return_logprob = _as_list(body.get("return_logprob") or False, count, "return_logprob")
    start_len = _as_list(body.get("logprob_start_len", -1), count, "logprob_start_len")
    top_num = _as_list(body.get("top_logprobs_num") or 0, count, "top_logprobs_num")
    rids = _request_ids(body.get("rid"), count)
    text_in = bool(body.get("return_text_in_logprobs") or False)
    vocab = int(engine.model.get_input_embeddings().num_embeddings)
    top_limit = min(vocab, config.max_top_logprobs_num)
    jobs: list[SequenceJob] = []
    for i, prompt in enumerate(prompts):
        try:
            sampling = parse_sampling_params(params_list[i])
        except SamplingParamsError as exc:
            raise RequestError(str(exc)) from exc
        _int_field(sampling.n, "sampling_params.n", 1, config.max_n)
        raw = params_list[i] if isinstance(params_list[i], dict) else {}
        interval = raw.get("stream_interval")
        interval = (
            1 if interval is None else _int_field(interval, "sampling_params.stream_interval", 1)
        )
        if not isinstance(return_logprob[i], bool):
            raise RequestError(f"return_logprob must be true or false, got {return_logprob[i]!r}")
        start = -1 if start_len[i] is None else _int_field(start_len[i], "logprob_start_len", -1)
        top = _int_field(top_num[i] or 0, "top_logprobs_num", 0, top_limit)
        if len(jobs) + sampling.n > config.max_request_sequences:
            raise RequestError(
                f"the request asks for more than {config.max_request_sequences} sequences "
                "(prompts in input_ids/text times sampling_params.n)"
            )
        for k in range(sampling.n):
            seed = (
                sampling.sampling_seed + k
                if sampling.sampling_seed is not None
                else engine.next_seed()
            )
            job = SequenceJob(
                input_ids=[int(t) for t in prompt],
                config=sampling,
                return_logprob=return_logprob[i],
                logprob_start_len=start,
                top_logprobs_num=top,
                return_text_in_logprobs=text_in,
                seed=seed,
                stream_interval=interval,
            )
            rid = rids[i]
            if rid is not None:  # as SGLang names them: R alone, R_k for n > 1 samples
                job.rid = rid if sampling.n == 1 else f"{rid}_{k}"
            jobs.append(job)
    return jobs, single and len(jobs) == 1


class EmbeddedServer:
    """The HTTP server plus its engine; ``start()`` serves in a background thread."""

    def __init__(self, config: ServerConfig, engine: GenerationEngine | None = None) -> None:
        self.config = config
        self.engine = engine or GenerationEngine(
            config.model_path,
            dtype=config.dtype,
            max_batch_size=config.max_batch_size,
            seed=config.seed,
            weight_version=config.weight_version,
            batch_wait_s=config.batch_wait_s,
            continuous=config.continuous_batching,
            memory_saver=config.enable_memory_saver,
            decode_step_delay_s=config.decode_step_delay_s,
        )
        handler = type("Handler", (_Handler,), {"server_state": self})
        self.httpd = _HTTPServer((config.host, config.port), handler)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:30000``."""
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> EmbeddedServer:
        """Serve in a daemon thread and return self."""
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and release the port and the engine."""
        self.httpd.shutdown()
        self.httpd.server_close()
        self.engine.close()

    def __enter__(self) -> EmbeddedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----- endpoint logic, called from handler threads -----

    def generate(self, body: Any, client_gone: Callable[[], bool] | None = None) -> Any:
        """Answer a /generate body; its sequences are aborted when ``client_gone()`` turns
        true or ``request_timeout_s`` passes, so nothing keeps decoding for nobody."""
        jobs, single = build_jobs(body, self.engine, self.config)
        futures = self.engine.submit(jobs)
        deadline = time.monotonic() + self.config.request_timeout_s
        while True:
            done, pending = wait(futures, timeout=0.1, return_when=FIRST_EXCEPTION)
            if not pending or any(f.exception() is not None for f in done):
                break
            self._abort_if_abandoned(jobs, deadline, client_gone)
        failed = [f.exception() for f in futures if f.done() and f.exception() is not None]
        if failed:
            self.engine.abort(jobs=jobs)
            raise failed[0]
        results = [f.result() for f in futures]
        if single:
            return results[0]
        for i, result in enumerate(results):
            result["index"] = i
        return results

    def prepare_stream(self, body: Any) -> tuple[list[SequenceJob], bool, queue.Queue]:
        """Queue a ``stream: true`` /generate body; its jobs report every token to the queue.
        Raises before anything is sent (a bad request is a plain HTTP 400)."""
        jobs, single = build_jobs(body, self.engine, self.config)
        events: queue.Queue[tuple[SequenceJob, int]] = queue.Queue()
        for job in jobs:
            job.on_token = lambda job, count: events.put((job, count))
        self.engine.submit(jobs)
        return jobs, single, events

    def stream_chunks(
        self,
        jobs: list[SequenceJob],
        single: bool,
        events: queue.Queue,
        client_gone: Callable[[], bool] | None = None,
    ) -> Iterator[dict[str, Any]]:
        """SGLang's streamed /generate objects: per new token a cumulative ``text``,
        ``output_ids`` and ``meta_info`` (``finish_reason`` null, log-probs so far when asked;
        tokens that came faster than the client reads are coalesced into one object, as
        SGLang does), then each sequence's full answer; ``index`` names the sequence of a
        batch or ``n`` > 1 request. A failure ends the stream with SGLang's error object."""
        pending = dict(enumerate(jobs))
        deadline = time.monotonic() + self.config.request_timeout_s
        while pending:
            latest: dict[int, tuple[SequenceJob, int]] = {}  # as SGLang, the newest state only
            try:
                job, count = events.get(timeout=0.1)
                while True:
                    latest[id(job)] = (job, count)
                    job, count = events.get_nowait()
            except queue.Empty:
                pass
            for job, count in latest.values():
                if not job.future.done():
                    chunk = self.engine.partial_response(job, count)
                    yield chunk if single else dict(chunk, index=jobs.index(job))
            for k, job in list(pending.items()):
                if not job.future.done():
                    continue
                del pending[k]
                failure = job.future.exception()
                if failure is not None:
                    self.engine.abort(jobs=jobs)
                    yield _stream_error(failure)
                    return
                answer = job.future.result()
                yield answer if single else dict(answer, index=k)
            try:
                self._abort_if_abandoned(jobs, deadline, client_gone)
            except TimeoutError as exc:
                yield _stream_error(exc)
                return

    def _abort_if_abandoned(
        self,
        jobs: list[SequenceJob],
        deadline: float,
        client_gone: Callable[[], bool] | None,
    ) -> None:
        """Abort ``jobs`` and raise when their client left (ClientGoneError) or
        ``request_timeout_s`` passed (TimeoutError): nothing keeps decoding for nobody."""
        if client_gone is not None and client_gone():
            self.engine.abort(jobs=jobs)
            raise ClientGoneError("the client closed the connection")
        if time.monotonic() > deadline:
            self.engine.abort(jobs=jobs)
            raise TimeoutError(
                f"/generate did not finish within request_timeout_s="
                f"{self.config.request_timeout_s}s; its sequences were aborted"
            )

    def model_info(self) -> dict[str, Any]:
        return {
            "model_path": self.engine.model_path,
            "tokenizer_path": self.engine.model_path,
            "served_model_name": self.engine.model_path,
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": self.engine.weight_version,
        }

    def server_info(self) -> dict[str, Any]:
        host, port = self.httpd.server_address[:2]
        return {
            "model_path": self.engine.model_path,
            "tokenizer_path": self.engine.model_path,
            "served_model_name": self.engine.model_path,
            "max_context_length": self.engine.max_context,
            "version": SERVER_VERSION,
            "host": host,
            "port": port,
            "internal_states": [dict(self.engine.stats, max_batch_size=self.engine.max_batch_size)],
            "weight_version": self.engine.weight_version,
            **self.server_args(),
        }

    def server_args(self) -> dict[str, Any]:
        """The ServerArgs fields SGLang's /server_info reports that RL frameworks read (slime
        sizes its engines from tp/dp/pp/ep_size): one CPU process, no parallelism."""
        return {
            "tp_size": 1,
            "dp_size": 1,
            "pp_size": 1,
            "ep_size": 1,
            "moe_dp_size": 1,
            "nnodes": 1,
            "node_rank": 0,
            "enable_dp_attention": False,
            "enable_memory_saver": self.engine.memory_saver,
            "device": "cpu",
            "base_gpu_id": 0,
            "dtype": self.config.dtype,
            "random_seed": self.engine.seed,  # the one drawn when none was given
            "max_running_requests": self.engine.max_batch_size,
            "context_length": self.engine.max_context,
            "disaggregation_mode": "null",
            "skip_tokenizer_init": self.engine.tokenizer is None,
        }

    # ----- abort, pause and load: the control surface RL frameworks call around updates -----

    def abort_request(self, body: dict[str, Any]) -> None:
        """SGLang's /abort_request: by ``rid`` (prefix match, as its scheduler) or ``abort_all``;
        an empty rid without abort_all is ignored, as SGLang does."""
        rid = body.get("rid") or ""
        abort_all = bool(body.get("abort_all") or False)
        if rid or abort_all:
            count = self.engine.abort(rid=rid, abort_all=abort_all)
            log.info("aborted %d sequence(s) (rid=%r, abort_all=%s)", count, rid, abort_all)

    def pause_generation(self, body: dict[str, Any]) -> dict[str, Any]:
        mode = body.get("mode") or "abort"
        if mode not in PAUSE_MODES:
            raise RequestError(f"mode must be one of {', '.join(PAUSE_MODES)}, got {mode!r}")
        self.engine.pause(mode)
        return {"message": "Generation paused successfully.", "status": "ok"}

    def continue_generation(self, body: dict[str, Any]) -> dict[str, Any]:
        self.engine.resume()
        return {"message": "Generation continued successfully.", "status": "ok"}

    def loads(self, query: str) -> tuple[Any, bool]:
        """SGLang's /v1/loads (one DP rank, the core section); the flag says text (prometheus)."""
        params = parse_qs(query)
        include = {s.strip() for v in params.get("include", []) for s in v.split(",")}
        bad = include - _LOAD_SECTIONS
        if bad:
            raise RequestError(
                f"include has invalid section(s) {sorted(bad)}; valid: {sorted(_LOAD_SECTIONS)}"
            )
        dp_rank = params.get("dp_rank", ["0"])[-1]
        if dp_rank != "0":
            raise RequestError(f"dp_rank {dp_rank!r} does not exist (dp_size is 1)")
        counts = self.engine.load()
        load = {
            "timestamp": time.time(),
            "dp_rank": 0,
            **counts,
            "max_running_requests": self.engine.max_batch_size,
            "utilization": counts["num_running_reqs"] / self.engine.max_batch_size,
        }
        fmt = params.get("format", ["json"])[-1]
        if fmt == "prometheus":
            lines = []
            for key, value in load.items():
                if key != "dp_rank":
                    lines += [f"# TYPE sglang_{key} gauge", f'sglang_{key}{{dp_rank="0"}} {value}']
            return "\n".join(lines) + "\n", True
        if fmt != "json":
            raise RequestError(f"format must be json or prometheus, got {fmt!r}")
        answer = {
            "timestamp": datetime.now(UTC).isoformat(),
            "version": SERVER_VERSION,
            "accelerator": None,
            "num_accelerators": 0,
            "loads": [load],
        }
        return answer, False

    def update_from_disk(self, body: dict[str, Any]) -> dict[str, Any]:
        path = body.get("model_path")
        if not isinstance(path, str):
            raise RequestError("update_weights_from_disk needs model_path (a string)")
        self.engine.update_from_disk(path, _version(body))
        return {
            "success": True,
            "message": "Succeeded to update model weights.",
            "num_paused_requests": 0,
        }

    def init_group(self, body: dict[str, Any]) -> dict[str, Any]:
        missing = [
            k
            for k in ("master_address", "master_port", "rank_offset", "world_size", "group_name")
            if k not in body
        ]
        if missing:
            raise RequestError(f"init_weights_update_group is missing {', '.join(missing)}")
        backend = body.get("backend") or "gloo"
        if backend != "gloo":  # the weights live in CPU memory: only gloo can receive them
            raise ValueError(
                f"init_weights_update_group: backend {backend!r} is not available on this CPU "
                "server (its weights are in CPU memory); use backend 'gloo' on both sides"
            )
        self.engine.init_group(
            str(body["master_address"]),
            int(body["master_port"]),
            int(body["rank_offset"]),
            int(body["world_size"]),
            str(body["group_name"]),
            backend,
        )
        return {"success": True, "message": "Succeeded to initialize custom process group."}

    def update_from_distributed(self, body: dict[str, Any]) -> dict[str, Any]:
        missing = [k for k in ("names", "dtypes", "shapes") if k not in body]
        if missing:
            raise RequestError(f"update_weights_from_distributed is missing {', '.join(missing)}")
        self.engine.update_from_distributed(
            list(body["names"]),
            [str(d) for d in body["dtypes"]],
            [list(s) for s in body["shapes"]],
            str(body.get("group_name") or "weight_update_group"),
            _version(body),
        )
        return {"success": True, "message": "Succeeded to update parameter online."}

    def weights_checker(self, body: dict[str, Any]) -> dict[str, Any]:
        """SGLang's /weights_checker: ``checksum`` (the default), ``snapshot``, ``compare``,
        ``reset_tensors`` of the served model; there is no draft model."""
        selector = body.get("selector") or "all"
        if selector not in SELECTORS:
            raise ValueError(
                f"weights_checker: selector must be one of {', '.join(SELECTORS)}, got {selector!r}"
            )
        if selector == "draft":  # no speculative draft model: nothing to check, as SGLang
            return {"success": True, "message": "Success."}
        return self.engine.weights_checker(
            body.get("action") or "checksum", body.get("skip_tensor_list")
        )

    def post_process_weights(self, body: dict[str, Any]) -> dict[str, Any]:
        """SGLang's /post_process_weights (newer than 0.5.23; slime calls it around updates of
        quantized models): restore the layout before a load, or requantize after it. This
        server holds no quantized weights, so both are done by doing nothing."""
        return {
            "success": True,
            "message": "Success: the embedded server holds no quantized weights, so there is "
            "nothing to restore or post-process.",
        }

    # ----- tensor updates and memory release (SGLang's colocated RL calls) -----

    def update_from_tensor(self, body: dict[str, Any]) -> dict[str, Any]:
        """SGLang's UpdateWeightsFromTensorReqInput; this server is tensor-parallel rank 0."""
        load_format = body.get("load_format")
        if load_format in (None, "direct"):
            named = decode_named_tensors(body.get("serialized_named_tensors"))
        elif load_format == "flattened_bucket":
            named = decode_flattened_bucket(body.get("serialized_named_tensors"))
        else:
            raise ValueError(
                f"update_weights_from_tensor: load_format {load_format!r} is not supported by "
                "the embedded server (null or 'direct': a list of (name, tensor) pairs; "
                "'flattened_bucket': SGLang's FlattenedTensorBucket)"
            )
        self.engine.update_from_tensor(named, _version(body))
        return {"success": True, "message": "Success"}

    def release_memory(self, body: dict[str, Any]) -> None:
        tags = _memory_tags(body)
        if self.engine.release_memory(tags):
            log.info("released memory: %s", ", ".join(tags))
        else:  # SGLang's words when its memory saver is off
            log.warning(
                "release_memory_occupation will not save memory because the server was "
                "started without --enable-memory-saver"
            )

    def resume_memory(self, body: dict[str, Any]) -> None:
        tags = _memory_tags(body)
        self.engine.resume_memory(tags)
        if self.engine.memory_saver:
            log.info("resumed memory: %s", ", ".join(tags))


def _stream_error(error: BaseException) -> dict[str, Any]:
    """The object SGLang streams when a request fails after its stream began."""
    return {
        "error": {
            "message": str(error),
            "type": "invalid_request_error",
            "code": 400 if isinstance(error, ValueError) else 500,
            "retryable": False,
        }
    }


def _memory_tags(body: dict[str, Any]) -> list[str]:
    """``tags`` of /release_memory_occupation and /resume_memory_occupation; none: all."""
    tags = body.get("tags")
    if tags is None or tags == []:
        return list(MEMORY_TAGS)
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise RequestError("tags must be a list of strings")
    unknown = [t for t in tags if t not in MEMORY_TAGS]
    if unknown:
        raise RequestError(f"tags: unknown memory tag {unknown[0]!r} (known: {MEMORY_TAGS})")
    return tags


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _list_of(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, list) and all(check(v) for v in value)


# JSON kinds of body fields: name -> (what the error says, check).
_KINDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "str": ("a string", lambda v: isinstance(v, str)),
    "int": ("an integer", _is_int),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "object": ("a JSON object", lambda v: isinstance(v, dict)),
    "str_list": ("a list of strings", _list_of(lambda v: isinstance(v, str))),
    "int_list": ("a list of integers", _list_of(_is_int)),
    "int_lists": ("a list of integer lists", _list_of(_list_of(_is_int))),
    "bool_list": ("a list of true/false", _list_of(lambda v: isinstance(v, bool))),
    "object_list": ("a list of JSON objects", _list_of(lambda v: isinstance(v, dict))),
}

# The body fields each POST endpoint reads (named as in SGLang's io_struct request classes),
# as "kind|kind", with "!" for a required field. null is the default of an optional field.
BODY_FIELDS: dict[str, dict[str, str]] = {
    "/generate": {
        "rid": "str|str_list",
        "text": "str|str_list",
        "input_ids": "int_list|int_lists",
        "sampling_params": "object|object_list",
        "return_logprob": "bool|bool_list",
        "logprob_start_len": "int|int_list",
        "top_logprobs_num": "int|int_list",
        "return_text_in_logprobs": "bool",
        "stream": "bool",
    },
    "/abort_request": {"rid": "str", "abort_all": "bool"},
    "/pause_generation": {"mode": "str"},
    "/continue_generation": {"torch_empty_cache": "bool"},
    "/update_weights_from_disk": {
        "model_path": "str!",
        "load_format": "str",
        "weight_version": "str",
        "flush_cache": "bool",
        "abort_all_requests": "bool",
    },
    "/init_weights_update_group": {
        "master_address": "str!",
        "master_port": "int!",
        "rank_offset": "int!",
        "world_size": "int!",
        "group_name": "str",
        "backend": "str",
    },
    "/update_weights_from_distributed": {
        "names": "str_list!",
        "dtypes": "str_list!",
        "shapes": "int_lists!",
        "group_name": "str",
        "flush_cache": "bool",
        "weight_version": "str",
        "load_format": "str",
    },
    "/destroy_weights_update_group": {"group_name": "str"},
    "/update_weight_version": {"new_version": "str!", "abort_all_requests": "bool"},
    "/weights_checker": {
        "action": "str",
        "allow_quant_error": "bool",
        "skip_tensor_list": "str_list",
        "selector": "str",
    },
}
# Endpoints of SGLang releases after the pinned 0.5.23 that RL frameworks call (slime).
NEWER_BODY_FIELDS: dict[str, dict[str, str]] = {
    "/post_process_weights": {
        "restore_weights_before_load": "bool",
        "post_process_quantization": "bool",
    },
}


# Calls that answer ``{"success": false, "message": ...}`` with HTTP 400 when refused.
_SUCCESS_ANSWERS = (
    "/update_weights",
    "/init_weights",
    "/destroy_weights",
    "/weights_checker",
    "/post_process_weights",
)

# Calls whose ``abort_all_requests: true`` ends every request first (SGLang's tokenizer manager).
_ABORTING_CALLS = frozenset({"/update_weights_from_disk", "/update_weight_version"})


def check_body(path: str, body: Any) -> None:
    """Reject a POST body whose fields have the wrong JSON kind, naming the field (HTTP 400)."""
    fields = BODY_FIELDS.get(path) or NEWER_BODY_FIELDS.get(path)
    if fields is None:
        return
    if not isinstance(body, dict):
        raise RequestError(f"{path}: the request body must be a JSON object")
    for name, spec in fields.items():
        required = spec.endswith("!")
        kinds = spec.rstrip("!").split("|")
        value = body.get(name)
        if value is None:
            if required:
                raise RequestError(f"{path}: field {name} is required")
            continue
        if not any(_KINDS[k][1](value) for k in kinds):
            wanted = " or ".join(_KINDS[k][0] for k in kinds)
            raise RequestError(f"{path}: field {name} must be {wanted}, got {value!r:.80}")


def _version(body: dict[str, Any]) -> str | None:
    version = body.get("weight_version")
    if version is not None and not isinstance(version, str):
        raise RequestError("weight_version must be a string")
    return version


class _Handler(BaseHTTPRequestHandler):
    """Routes requests to the owning :class:`EmbeddedServer` (set as ``server_state``)."""

    server_state: EmbeddedServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def _send(self, status: int, payload: Any, text: bool = False) -> None:
        data = payload.encode() if text else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain" if text else "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _stream(self, jobs: list[SequenceJob], single: bool, events: queue.Queue) -> None:
        """Send SGLang's server-sent events: ``data: <json>`` per object, then
        ``data: [DONE]`` (HTTP/1.1 chunked, so the connection stays usable)."""
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        state = self.server_state
        try:
            for chunk in state.stream_chunks(jobs, single, events, self._client_gone):
                self._write_chunk(SSE_PREFIX + json.dumps(chunk).encode() + SSE_END)
            self._write_chunk(SSE_DONE)
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (ClientGoneError, OSError):  # the client left: nothing decodes for nobody
            state.engine.abort(jobs=jobs)
            self.close_connection = True

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _error(self, status: int, message: str) -> None:
        self._send(status, {"error": {"message": message, "code": status}})

    def _body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if not raw:
            return {}
        try:
            return json.loads(raw)
        except json.JSONDecodeError as exc:
            raise RequestError(f"the request body is not valid JSON ({exc.msg})") from exc

    def _client_gone(self) -> bool:
        """Whether the client closed its end (EOF on the socket; a pipelined request is data)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def _route(self, method: str) -> None:
        state = self.server_state
        path, _, query = self.path.partition("?")
        try:
            body = self._body() if method == "POST" else {}
            if method == "POST":
                check_body(path, body)
                if path in _ABORTING_CALLS and body.get("abort_all_requests"):
                    state.engine.abort(abort_all=True)  # as SGLang does before the update
            if path == "/health":
                self._send(HTTPStatus.OK, "", text=True)
            elif path == "/health_generate":
                state.generate({"input_ids": [0], "sampling_params": {"max_new_tokens": 1}})
                self._send(HTTPStatus.OK, "", text=True)
            elif path == "/get_model_info":
                self._send(HTTPStatus.OK, state.model_info())
            elif path in ("/get_server_info", "/server_info"):
                self._send(HTTPStatus.OK, state.server_info())
            elif path == "/v1/loads":
                answer, text = state.loads(query)
                self._send(HTTPStatus.OK, answer, text=text)
            elif path == "/get_weight_version":
                self._send(HTTPStatus.OK, {"weight_version": state.engine.weight_version})
            elif path == "/flush_cache":
                self._send(HTTPStatus.OK, "Cache flushed.\n", text=True)
            elif path == "/release_memory_occupation":
                self._send(HTTPStatus.OK, state.release_memory(body))
            elif path == "/resume_memory_occupation":
                self._send(HTTPStatus.OK, state.resume_memory(body))
            elif path == "/weights_checker":  # GET or POST, as SGLang
                self._send(HTTPStatus.OK, state.weights_checker(body))
            elif method != "POST":
                self._error(HTTPStatus.NOT_FOUND, f"no GET endpoint {path}")
            elif path == "/update_weights_from_tensor":
                self._send(HTTPStatus.OK, state.update_from_tensor(body))
            elif path == "/post_process_weights":
                self._send(HTTPStatus.OK, state.post_process_weights(body))
            elif path == "/generate" and body.get("stream"):
                self._stream(*state.prepare_stream(body))
            elif path == "/generate":
                self._send(HTTPStatus.OK, state.generate(body, self._client_gone))
            elif path == "/abort_request":
                state.abort_request(body)
                self._send(HTTPStatus.OK, "", text=True)
            elif path == "/pause_generation":
                self._send(HTTPStatus.OK, state.pause_generation(body))
            elif path == "/continue_generation":
                self._send(HTTPStatus.OK, state.continue_generation(body))
            elif path == "/update_weights_from_disk":
                self._send(HTTPStatus.OK, state.update_from_disk(body))
            elif path == "/init_weights_update_group":
                self._send(HTTPStatus.OK, state.init_group(body))
            elif path == "/update_weights_from_distributed":
                self._send(HTTPStatus.OK, state.update_from_distributed(body))
            elif path == "/destroy_weights_update_group":
                state.engine.destroy_group(str(body.get("group_name") or "weight_update_group"))
                self._send(HTTPStatus.OK, {"success": True, "message": "Succeeded to destroy."})
            elif path == "/update_weight_version":
                version = body.get("new_version")
                if not isinstance(version, str):
                    raise RequestError("update_weight_version needs new_version (a string)")
                state.engine.weight_version = version
                self._send(HTTPStatus.OK, {"success": True, "message": "ok"})
            else:
                self._error(HTTPStatus.NOT_FOUND, f"no endpoint {path}")
        except RequestError as exc:
            self._error(HTTPStatus.BAD_REQUEST, str(exc))
        except ClientGoneError:
            log.info("client of %s disconnected; its sequences were aborted", path)
            self.close_connection = True
        except (BrokenPipeError, ConnectionResetError):  # gone before its answer was written
            log.info("client of %s disconnected before the answer was sent", path)
            self.close_connection = True
        except MemoryReleasedError as exc:
            self._error(HTTPStatus.SERVICE_UNAVAILABLE, str(exc))
        except (ValueError, FileNotFoundError) as exc:
            if path.startswith(_SUCCESS_ANSWERS):
                self._send(HTTPStatus.BAD_REQUEST, {"success": False, "message": str(exc)})
            else:
                self._error(HTTPStatus.BAD_REQUEST, str(exc))
        except Exception as exc:  # the server stays up; the client sees a 500 with the reason
            log.exception("request %s failed", path)
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(exc).__name__}: {exc}")


def serve_forever(config: ServerConfig) -> None:
    """Run the server in the foreground until SIGINT or SIGTERM; once SIGTERM arrives, the
    process ends within :data:`EXIT_GRACE_S` seconds, stopped cleanly or not."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    exit_within_after_signal(EXIT_GRACE_S)
    server = EmbeddedServer(config)
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.start()
    log.info(
        "embedded SGLang-compatible server ready at %s (model %s)", server.url, config.model_path
    )
    try:
        while not stop.wait(0.5):
            pass
    finally:
        server.stop()
        log.info("server at %s stopped", server.url)
