"""A scriptable stand-in for an SGLang server: answers /generate in SGLang's shape or misbehaves.

Its answer is a pure function of the prompt (the prompt reversed, plus the sample index), so a
test can tell which prompt each returned sample belongs to.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def expected_output(prompt: list[int], index: int) -> list[int]:
    """What the fake server answers for sample ``index`` of ``prompt``."""
    return [*reversed(prompt), 1000 + index]


def good_answer(body: dict[str, Any]) -> Any:
    prompt = body["input_ids"]
    n = body.get("sampling_params", {}).get("n", 1)
    outs = []
    for k in range(n):
        ids = expected_output(prompt, k)
        outs.append(
            {
                "text": "",
                "output_ids": ids,
                "meta_info": {
                    "id": f"r{k}",
                    "prompt_tokens": len(prompt),
                    "completion_tokens": len(ids),
                    "finish_reason": {"type": "length", "length": len(ids)},
                    "output_token_logprobs": [[-0.5, t, None] for t in ids],
                    "weight_version": "fake",
                },
            }
        )
    return outs[0] if n == 1 else outs


class FakeServer:
    """``behaviour(request_number, body)`` returns ``(status, payload)``, ``"close"``, or
    ``("sleep", seconds)`` then answers well."""

    def __init__(self, behaviour: Callable[[int, dict[str, Any]], Any] | None = None) -> None:
        self.behaviour = behaviour or (lambda i, body: None)
        self.requests: list[dict[str, Any]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self._send(200, b"", "text/plain")

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                with outer.lock:
                    number = len(outer.requests)
                    outer.requests.append(body)
                    outer.in_flight += 1
                    outer.max_in_flight = max(outer.max_in_flight, outer.in_flight)
                try:
                    action = outer.behaviour(number, body)
                    if action == "close":
                        self.close_connection = True
                        self.connection.shutdown(2)
                        return
                    if isinstance(action, tuple) and action[0] == "sleep":
                        time.sleep(action[1])
                        action = None
                    if action is None:
                        status, payload = 200, json.dumps(good_answer(body)).encode()
                    else:
                        status, raw = action
                        payload = raw.encode() if isinstance(raw, str) else json.dumps(raw).encode()
                    self._send(status, payload, "application/json")
                finally:
                    with outer.lock:
                        outer.in_flight -= 1

            def _send(self, status: int, payload: bytes, ctype: str) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout test): nothing to answer

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> FakeServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
