"""The embedded rollout server: SGLang's native HTTP API over a transformers model on CPU.

Same endpoints and JSON shapes as ``python -m sglang.launch_server`` for what training uses
(/generate, /health, /get_model_info, /flush_cache, weight updates from disk and from a
distributed group), so the client and weight sync run unchanged against either. Run it with
``oprd-mega serve --model DIR --host H --port P``.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from oprd_mega.rollout.engine import (
    MEMORY_TAGS,
    GenerationEngine,
    MemoryReleasedError,
    SequenceJob,
)
from oprd_mega.rollout.sampling import SamplingParamsError, parse_sampling_params
from oprd_mega.rollout.tensor_payload import decode_named_tensors

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


class _HTTPServer(ThreadingHTTPServer):
    """A thread per connection, with a listen backlog deep enough for bursts of rollouts."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024


class RequestError(ValueError):
    """A request the server rejects with HTTP 400; the message names the field."""


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
    request_timeout_s: float = 3600.0


def _as_list(value: Any, count: int, field: str) -> list[Any]:
    if isinstance(value, list):
        if len(value) != count:
            raise RequestError(f"{field} has {len(value)} entries for {count} prompts")
        return value
    return [value] * count


def build_jobs(body: Any, engine: GenerationEngine) -> tuple[list[SequenceJob], bool]:
    """Turn a /generate body into sequence jobs; the flag says whether to answer one object."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    for name in _UNSUPPORTED_REQUEST_FIELDS:
        if body.get(name) not in (None, False, [], {}):
            raise RequestError(f"{name} is not supported by the embedded server")
    if body.get("stream"):
        raise RequestError("stream=true is not supported by the embedded server")
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
    text_in = bool(body.get("return_text_in_logprobs") or False)
    jobs: list[SequenceJob] = []
    for i, prompt in enumerate(prompts):
        try:
            config = parse_sampling_params(params_list[i])
        except SamplingParamsError as exc:
            raise RequestError(str(exc)) from exc
        for k in range(config.n):
            seed = (
                config.sampling_seed + k if config.sampling_seed is not None else engine.next_seed()
            )
            jobs.append(
                SequenceJob(
                    input_ids=[int(t) for t in prompt],
                    config=config,
                    return_logprob=bool(return_logprob[i]),
                    logprob_start_len=int(start_len[i] if start_len[i] is not None else -1),
                    top_logprobs_num=int(top_num[i] or 0),
                    return_text_in_logprobs=text_in,
                    seed=seed,
                )
            )
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

    def generate(self, body: Any) -> Any:
        jobs, single = build_jobs(body, self.engine)
        futures = self.engine.submit(jobs)
        results = [f.result(timeout=self.config.request_timeout_s) for f in futures]
        if single:
            return results[0]
        for i, result in enumerate(results):
            result["index"] = i
        return results

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
        }

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
        self.engine.init_group(
            str(body["master_address"]),
            int(body["master_port"]),
            int(body["rank_offset"]),
            int(body["world_size"]),
            str(body["group_name"]),
            str(body.get("backend") or "gloo"),
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

    # ----- tensor updates and memory release (SGLang's colocated RL calls) -----

    def update_from_tensor(self, body: dict[str, Any]) -> dict[str, Any]:
        """SGLang's UpdateWeightsFromTensorReqInput; this server is tensor-parallel rank 0."""
        load_format = body.get("load_format")
        if load_format not in (None, "direct"):
            raise ValueError(
                f"update_weights_from_tensor: load_format {load_format!r} is not supported by "
                "the embedded server (null or 'direct': a list of (name, tensor) pairs)"
            )
        named = decode_named_tensors(body.get("serialized_named_tensors"))
        self.engine.update_from_tensor(named, _version(body))
        return {"success": True, "message": "Success"}

    def release_memory(self, body: dict[str, Any]) -> None:
        tags = _memory_tags(body)
        self.engine.release_memory(tags)
        log.info("released memory: %s", ", ".join(tags))

    def resume_memory(self, body: dict[str, Any]) -> None:
        tags = _memory_tags(body)
        self.engine.resume_memory(tags)
        log.info("resumed memory: %s", ", ".join(tags))


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

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def _route(self, method: str) -> None:
        state = self.server_state
        path = self.path.split("?", 1)[0]
        try:
            body = self._body() if method == "POST" else {}
            if path == "/health":
                self._send(HTTPStatus.OK, "", text=True)
            elif path == "/health_generate":
                state.generate({"input_ids": [0], "sampling_params": {"max_new_tokens": 1}})
                self._send(HTTPStatus.OK, "", text=True)
            elif path == "/get_model_info":
                self._send(HTTPStatus.OK, state.model_info())
            elif path == "/get_server_info":
                self._send(HTTPStatus.OK, state.server_info())
            elif path == "/get_weight_version":
                self._send(HTTPStatus.OK, {"weight_version": state.engine.weight_version})
            elif path == "/flush_cache":
                self._send(HTTPStatus.OK, "Cache flushed.\n", text=True)
            elif path == "/release_memory_occupation":
                self._send(HTTPStatus.OK, state.release_memory(body))
            elif path == "/resume_memory_occupation":
                self._send(HTTPStatus.OK, state.resume_memory(body))
            elif method != "POST":
                self._error(HTTPStatus.NOT_FOUND, f"no GET endpoint {path}")
            elif path == "/update_weights_from_tensor":
                self._send(HTTPStatus.OK, state.update_from_tensor(body))
            elif path == "/generate":
                self._send(HTTPStatus.OK, state.generate(body))
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
        except MemoryReleasedError as exc:
            self._error(HTTPStatus.SERVICE_UNAVAILABLE, str(exc))
        except (ValueError, FileNotFoundError) as exc:
            if path.startswith(("/update_weights", "/init_weights", "/destroy_weights")):
                self._send(HTTPStatus.BAD_REQUEST, {"success": False, "message": str(exc)})
            else:
                self._error(HTTPStatus.BAD_REQUEST, str(exc))
        except Exception as exc:  # the server stays up; the client sees a 500 with the reason
            log.exception("request %s failed", path)
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(exc).__name__}: {exc}")


def serve_forever(config: ServerConfig) -> None:
    """Run the server in the foreground until SIGINT or SIGTERM."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
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
