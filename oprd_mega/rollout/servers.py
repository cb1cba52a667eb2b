"""Rollout server management: launch N servers and health-check them, or attach to given URLs.

Launched servers run in their own process sessions, so shutting one down (SIGTERM, then SIGKILL
after a grace period) also reaches the children it spawned; shutdown runs on normal exit, on an
exception inside ``with``, at interpreter exit and on SIGTERM/SIGINT: no orphan processes.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx

from oprd_mega.lifetime import child_dies_with_launcher


class ServerLaunchError(RuntimeError):
    """A server process exited early or never became healthy; the message names it."""


@dataclass(frozen=True)
class LaunchConfig:
    """How to start ``num_servers`` servers on consecutive ports from ``base_port``.

    ``backend="sglang"`` runs ``python -m sglang.launch_server``; ``"embedded"`` runs
    ``python -m oprd_mega.cli serve``; ``"auto"`` picks SGLang when it is installed.
    ``command`` replaces the launcher's command prefix (tests pass a fake server script).
    ``extra_args`` are passed through unchanged.
    """

    model_path: str
    num_servers: int = 1
    backend: Literal["auto", "sglang", "embedded"] = "auto"
    tp_size: int = 1
    host: str = "127.0.0.1"
    base_port: int = 30000
    mem_fraction_static: float | None = None
    extra_args: tuple[str, ...] = ()
    command: tuple[str, ...] | None = None
    log_dir: str | None = None
    health_timeout_s: float = 900.0
    shutdown_grace_s: float = 15.0
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_servers < 1:
            raise ValueError(f"LaunchConfig.num_servers must be >= 1, got {self.num_servers}")
        if self.tp_size < 1:
            raise ValueError(f"LaunchConfig.tp_size must be >= 1, got {self.tp_size}")
        if self.backend not in ("auto", "sglang", "embedded"):
            raise ValueError(
                f"LaunchConfig.backend must be 'auto', 'sglang' or 'embedded', got {self.backend!r}"
            )

    def argv(self, index: int) -> list[str]:
        """The command line of server ``index``."""
        port = self.base_port + index
        if resolve_backend(self.backend) == "sglang":
            prefix = list(self.command or (sys.executable, "-m", "sglang.launch_server"))
            args = [
                "--model-path", self.model_path, "--tp-size", str(self.tp_size),
                "--host", self.host, "--port", str(port),
            ]  # fmt: skip
            if self.mem_fraction_static is not None:
                args += ["--mem-fraction-static", str(self.mem_fraction_static)]
        else:
            prefix = list(self.command or (sys.executable, "-m", "oprd_mega.cli", "serve"))
            args = ["--model", self.model_path, "--host", self.host, "--port", str(port)]
        return [*prefix, *args, *self.extra_args]


def resolve_backend(backend: str) -> str:
    """``"auto"`` becomes ``"sglang"`` when the sglang package is installed, else ``"embedded"``."""
    if backend != "auto":
        return backend
    import importlib.util

    return "sglang" if importlib.util.find_spec("sglang") is not None else "embedded"


def _kill_group(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM the process's session, wait up to ``grace_s``, then SIGKILL it."""
    if proc.poll() is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # children may outlive a dead leader
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace_s)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


class ServerGroup:
    """The rollout servers of a run: launched here (and owned) or attached by URL."""

    def __init__(
        self,
        urls: Sequence[str],
        processes: Sequence[subprocess.Popen] = (),
        logs: Sequence[Path] = (),
        control_urls: Sequence[str] | None = None,
        grace_s: float = 15.0,
    ) -> None:
        self.urls = [u.rstrip("/") for u in urls]
        self.control_urls = [u.rstrip("/") for u in (control_urls or urls)]
        self.processes = list(processes)
        self.logs = list(logs)
        self.grace_s = grace_s
        self._closed = False
        self._previous_handlers: dict[int, Any] = {}
        if self.processes:
            atexit.register(self.shutdown)
            self._install_signal_handlers()

    # ----- construction -----

    @classmethod
    def launch(cls, config: LaunchConfig) -> ServerGroup:
        """Start every server, wait until all answer /health, or clean up and raise."""
        if config.log_dir:
            log_dir = Path(config.log_dir)
            log_dir.mkdir(parents=True, exist_ok=True)
        else:
            log_dir = Path(tempfile.mkdtemp(prefix="oprd-rollout-logs-"))
        processes: list[subprocess.Popen] = []
        logs: list[Path] = []
        urls = [f"http://{config.host}:{config.base_port + i}" for i in range(config.num_servers)]
        try:
            for i in range(config.num_servers):
                log_path = log_dir / f"rollout-server-{i}.log"
                handle = log_path.open("wb")
                processes.append(
                    subprocess.Popen(
                        config.argv(i),
                        stdout=handle,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        start_new_session=True,
                        preexec_fn=child_dies_with_launcher(),  # no orphan when we crash
                        env={**os.environ, **config.env},
                    )
                )
                handle.close()
                logs.append(log_path)
            group = cls(urls, processes, logs, grace_s=config.shutdown_grace_s)
        except BaseException:
            for proc in processes:
                _kill_group(proc, config.shutdown_grace_s)
            raise
        try:
            group.wait_healthy(config.health_timeout_s)
        except BaseException:
            group.shutdown()
            raise
        return group

    @classmethod
    def attach(
        cls, urls: Sequence[str], router_url: str | None = None, health_timeout_s: float = 60.0
    ) -> ServerGroup:
        """Use servers that are already running; with ``router_url`` (an ``sglang_router``),
        generation goes through the router and weight updates to the workers it lists (or to
        ``urls`` when given)."""
        if router_url is not None:
            router_url = router_url.rstrip("/")
            workers = list(urls) or list_router_workers(router_url)
            group = cls([router_url], control_urls=workers)
        else:
            if not urls:
                raise ValueError("attach needs server URLs or a router URL")
            group = cls(urls)
        group.wait_healthy(health_timeout_s)
        return group

    # ----- health -----

    def wait_healthy(self, timeout_s: float, poll_s: float = 0.5) -> None:
        """Wait until every server answers GET /health with 200."""
        deadline = time.monotonic() + timeout_s
        pending = dict.fromkeys(self.urls + self.control_urls)
        with httpx.Client(timeout=5.0) as http:
            while pending:
                for i, proc in enumerate(self.processes):
                    code = proc.poll()
                    if code is not None:
                        raise ServerLaunchError(
                            f"rollout server {self.urls[i]} exited with code {code} before it "
                            f"was healthy; log {self.logs[i]}:\n{self._log_tail(i)}"
                        )
                for url in list(pending):
                    try:
                        if http.get(url + "/health").status_code == 200:
                            del pending[url]
                    except httpx.HTTPError:
                        pass
                if not pending:
                    return
                if time.monotonic() > deadline:
                    details = "".join(
                        f"\n--- {self.urls[i]} log {self.logs[i]}:\n{self._log_tail(i)}"
                        for i in range(len(self.processes))
                        if self.urls[i] in pending
                    )
                    raise ServerLaunchError(
                        f"rollout server(s) {', '.join(pending)} not healthy after {timeout_s}s"
                        + details
                    )
                time.sleep(poll_s)

    def _log_tail(self, index: int, lines: int = 20) -> str:
        try:
            text = self.logs[index].read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    # ----- shutdown -----

    def _install_signal_handlers(self) -> None:
        import threading

        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous = signal.getsignal(signum)
            if previous == signal.SIG_IGN:
                continue  # the process chose to ignore it (e.g. a background job): so do we
            self._previous_handlers[signum] = previous

            def handler(num: int, frame: Any, previous: Any = previous) -> None:
                self.shutdown()
                if callable(previous):
                    previous(num, frame)
                elif previous == signal.SIG_DFL:
                    signal.signal(num, signal.SIG_DFL)
                    os.kill(os.getpid(), num)

            signal.signal(signum, handler)

    def shutdown(self) -> None:
        """Stop every launched server and its children (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for proc in self.processes:
            _kill_group(proc, self.grace_s)
        for signum, previous in self._previous_handlers.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(signum, previous)
        with contextlib.suppress(Exception):
            atexit.unregister(self.shutdown)

    def __enter__(self) -> ServerGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def list_router_workers(router_url: str, timeout_s: float = 10.0) -> list[str]:
    """The worker URLs an ``sglang_router`` reports on GET /list_workers."""
    try:
        answer = httpx.get(router_url.rstrip("/") + "/list_workers", timeout=timeout_s).json()
    except (httpx.HTTPError, ValueError) as exc:
        raise ServerLaunchError(f"router {router_url}: cannot list workers ({exc})") from exc
    urls = answer.get("urls") if isinstance(answer, dict) else None
    if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
        raise ServerLaunchError(f"router {router_url}: /list_workers answered {answer!r}")
    return urls
