"""Rollout server management: launch N servers and health-check them, or attach to given URLs.

Launched servers run in their own process sessions, so shutting one down (SIGTERM, then SIGKILL
after a grace period) also reaches the children it spawned; shutdown runs on normal exit, on an
exception inside ``with``, at interpreter exit and on SIGTERM/SIGINT: no orphan processes.

A launched server proves it is the process started here: the launcher gives it a random initial
weight version (``--weight-version launch-<token>``, a flag of both SGLang and ``oprd-mega
serve``) and uses it only once ``/get_server_info`` reports that version. Ports are free ones
unless ``base_port`` is given; a taken port is an error naming the port and, when the process
table tells, its owner. GPU servers get ``--base-gpu-id`` so that they never share GPUs with
each other, nor with the trainer unless ``colocate`` asks for it.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import httpx
import psutil
import torch

from oprd_mega.lifetime import child_dies_with_launcher
from oprd_mega.parallel.distributed import free_port


class ServerLaunchError(RuntimeError):
    """A server process exited early or never became healthy; the message names it."""


@dataclass(frozen=True)
class LaunchConfig:
    """How to start ``num_servers`` servers, on free ports or consecutive ones from ``base_port``.

    ``backend="sglang"`` runs ``python -m sglang.launch_server``; ``"embedded"`` runs
    ``python -m oprd_mega.cli serve``; ``"auto"`` picks SGLang when it is installed.
    ``command`` replaces the launcher's command prefix (tests pass a fake server script).
    ``extra_args`` are passed through unchanged.

    GPUs (SGLang): server ``i`` uses ``gpus_per_server`` GPUs from ``base_gpu_id + i *
    gpus_per_server``. The trainer uses GPUs ``0 .. trainer_gpus - 1`` of this node (it fills
    ``trainer_gpus`` in, see :meth:`for_trainer`); servers start after them unless ``colocate``.
    """

    model_path: str
    num_servers: int = 1
    backend: Literal["auto", "sglang", "embedded"] = "auto"
    tp_size: int = 1
    host: str = "127.0.0.1"
    base_port: int | None = None
    mem_fraction_static: float | None = None
    extra_args: tuple[str, ...] = ()
    command: tuple[str, ...] | None = None
    log_dir: str | None = None
    health_timeout_s: float = 900.0
    shutdown_grace_s: float = 15.0
    env: dict[str, str] = field(default_factory=dict)
    gpus_per_server: int | None = None
    base_gpu_id: int | None = None
    trainer_gpus: int = 0
    colocate: bool = False
    deterministic_inference: bool = False

    def __post_init__(self) -> None:
        if self.num_servers < 1:
            raise ValueError(f"LaunchConfig.num_servers must be >= 1, got {self.num_servers}")
        if self.tp_size < 1:
            raise ValueError(f"LaunchConfig.tp_size must be >= 1, got {self.tp_size}")
        if self.backend not in ("auto", "sglang", "embedded"):
            raise ValueError(
                f"LaunchConfig.backend must be 'auto', 'sglang' or 'embedded', got {self.backend!r}"
            )
        if self.base_port is not None and not 1 <= self.base_port <= 65535 - self.num_servers + 1:
            raise ValueError(
                f"LaunchConfig.base_port must leave {self.num_servers} port(s) within 1..65535, "
                f"got {self.base_port}"
            )
        if self.gpus_per_server is not None and self.gpus_per_server < self.tp_size:
            raise ValueError(
                f"LaunchConfig.gpus_per_server must be >= tp_size ({self.tp_size}), got "
                f"{self.gpus_per_server}"
            )
        if self.trainer_gpus < 0:
            raise ValueError(f"LaunchConfig.trainer_gpus must be >= 0, got {self.trainer_gpus}")
        if self.base_gpu_id is not None and self.base_gpu_id < 0:
            raise ValueError(f"LaunchConfig.base_gpu_id must be >= 0, got {self.base_gpu_id}")
        if (
            not self.colocate
            and self.base_gpu_id is not None
            and self.base_gpu_id < self.trainer_gpus
        ):
            raise ValueError(
                f"LaunchConfig.base_gpu_id {self.base_gpu_id} puts rollout servers on the "
                f"trainer's GPUs 0-{self.trainer_gpus - 1}: set base_gpu_id >= "
                f"{self.trainer_gpus}, or colocate: true to share them"
            )

    def for_trainer(
        self, trainer_gpus: int, sampling_seed: int | None, run_log_dir: str | None = None
    ) -> LaunchConfig:
        """This config as the trainer launches it: ``trainer_gpus`` GPUs of this node are the
        trainer's, a seeded sampler gets SGLang's deterministic inference, and the servers'
        logs go to ``run_log_dir`` unless ``log_dir`` says where (they belong to the run)."""
        return replace(
            self,
            trainer_gpus=trainer_gpus,
            deterministic_inference=self.deterministic_inference or sampling_seed is not None,
            log_dir=self.log_dir or run_log_dir,
        )

    def server_gpus(self, index: int) -> list[int]:
        """The GPU ids of server ``index`` (SGLang backend)."""
        per_server = self.gpus_per_server or self.tp_size
        base = self.base_gpu_id
        if base is None:
            base = 0 if self.colocate else self.trainer_gpus
        first = base + index * per_server
        return list(range(first, first + per_server))

    def argv(self, index: int, port: int | None = None, token: str | None = None) -> list[str]:
        """The command line of server ``index`` on ``port`` (default: ``base_port + index``),
        starting with weight version ``token`` when given."""
        if port is None:
            if self.base_port is None:
                raise ValueError("LaunchConfig.argv needs a port when base_port is null")
            port = self.base_port + index
        if resolve_backend(self.backend) == "sglang":
            prefix = list(self.command or (sys.executable, "-m", "sglang.launch_server"))
            args = [
                "--model-path", self.model_path, "--tp-size", str(self.tp_size),
                "--host", self.host, "--port", str(port),
                "--base-gpu-id", str(self.server_gpus(index)[0]),
            ]  # fmt: skip
            if self.mem_fraction_static is not None:
                args += ["--mem-fraction-static", str(self.mem_fraction_static)]
            if self.deterministic_inference:
                args.append("--enable-deterministic-inference")
        else:
            prefix = list(self.command or (sys.executable, "-m", "oprd_mega.cli", "serve"))
            args = ["--model", self.model_path, "--host", self.host, "--port", str(port)]
        if self.colocate:  # the trainer releases the servers' memory around each step
            args.append("--enable-memory-saver")
        if token is not None:
            args += ["--weight-version", token]
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
        tokens: Sequence[str] = (),
        temporary_logs: Path | None = None,
    ) -> None:
        self.urls = [u.rstrip("/") for u in urls]
        self.tokens = list(tokens)  # the launch token of each launched server
        self.control_urls = [u.rstrip("/") for u in (control_urls or urls)]
        self.processes = list(processes)
        self.logs = list(logs)
        self.grace_s = grace_s
        self._closed = False
        self._previous_handlers: dict[int, Any] = {}
        # The folder ``launch`` made for the logs (no log_dir): removed by a clean ``with`` exit.
        self.temporary_logs = temporary_logs
        if self.processes:
            atexit.register(self.shutdown)
            self._install_signal_handlers()

    # ----- construction -----

    @classmethod
    def launch(cls, config: LaunchConfig) -> ServerGroup:
        """Start every server, wait until all answer /health and prove their identity, or
        clean up and raise."""
        temporary_logs = None
        if config.log_dir:
            log_dir = Path(config.log_dir)
            log_dir.mkdir(parents=True, exist_ok=True)
        else:
            log_dir = temporary_logs = Path(tempfile.mkdtemp(prefix="oprd-rollout-logs-"))
        ports = launch_ports(config)
        _check_gpus(config)
        processes: list[subprocess.Popen] = []
        logs: list[Path] = []
        tokens = [f"launch-{secrets.token_hex(8)}" for _ in ports]
        urls = [f"http://{config.host}:{port}" for port in ports]
        try:
            for i, port in enumerate(ports):
                log_path = log_dir / f"rollout-server-{i}.log"
                _keep_earlier_log(log_path)
                handle = log_path.open("wb")
                processes.append(
                    subprocess.Popen(
                        config.argv(i, port, tokens[i]),
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
            group = cls(
                urls,
                processes,
                logs,
                grace_s=config.shutdown_grace_s,
                tokens=tokens,
                temporary_logs=temporary_logs,
            )
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
                            self._check_identity(http, url)
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

    def _check_identity(self, http: httpx.Client, url: str) -> None:
        """A launched server must report its launch token as weight version: otherwise another
        process answers on its port (our server failed to bind, or a stale one is there)."""
        if url not in self.urls[: len(self.tokens)]:
            return
        index = self.urls.index(url)
        token = self.tokens[index]
        info = http.get(url + "/get_server_info")
        version = info.json().get("weight_version") if info.status_code == 200 else None
        if version != token:
            port = int(url.rsplit(":", 1)[1])
            raise ServerLaunchError(
                f"{url} answers, but not as the rollout server launched here (its "
                f"/get_server_info weight_version is {version!r}, not {token!r}): port {port} "
                f"belongs to {port_owner(port) or 'another process'}; log {self.logs[index]}:\n"
                f"{self._log_tail(index)}"
            )

    def exit_code(self, url: str) -> int | None:
        """The exit code of the launched server behind ``url`` (or its control URL), None while
        it runs or when it was not launched here."""
        url = url.rstrip("/")
        for index, proc in enumerate(self.processes):
            names = {urls[index] for urls in (self.urls, self.control_urls) if index < len(urls)}
            if url in names:
                return proc.poll()
        return None

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

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        """Shut down; the logs' temporary folder goes too unless the block raised (an error
        names a server's log, which must still be there to read)."""
        self.shutdown()
        if exc_type is None and self.temporary_logs is not None:
            shutil.rmtree(self.temporary_logs, ignore_errors=True)


def _keep_earlier_log(path: Path) -> None:
    """Move an earlier launch's log at ``path`` (a server restarted after it died, a resumed
    run) to the next free ``<name>.1``, ``<name>.2``, ... so that the new one does not
    overwrite it."""
    if not path.exists():
        return
    number = 1
    while path.with_name(f"{path.name}.{number}").exists():
        number += 1
    path.rename(path.with_name(f"{path.name}.{number}"))


def list_router_workers(router_url: str, timeout_s: float = 10.0) -> list[str]:
    """The worker URLs an ``sglang_router`` reports: GET /list_workers (``{"urls": [...]}``),
    or, where the router does not serve it, GET /workers (``{"workers": [{"url": ...}]}``)."""
    router_url = router_url.rstrip("/")
    answers: list[str] = []
    for path in ("/list_workers", "/workers"):
        try:
            response = httpx.get(router_url + path, timeout=timeout_s)
        except httpx.HTTPError as exc:
            raise ServerLaunchError(f"router {router_url}: cannot list workers ({exc})") from exc
        if response.status_code != 200:
            answers.append(f"{path}: HTTP {response.status_code}")
            continue
        try:
            urls = _worker_urls(response.json())
        except ValueError:
            urls = None
        if urls is None:
            answers.append(f"{path} answered {response.text[:200]!r}")
            continue
        return urls
    raise ServerLaunchError(f"router {router_url}: no worker list ({'; '.join(answers)})")


def _worker_urls(answer: Any) -> list[str] | None:
    """Worker URLs from a router's answer, or None when it has no recognisable list."""
    if isinstance(answer, dict):
        answer = answer.get("urls", answer.get("workers"))
    if not isinstance(answer, list):
        return None
    urls = [item.get("url") if isinstance(item, dict) else item for item in answer]
    if not all(isinstance(u, str) for u in urls):
        return None
    return urls


def launch_ports(config: LaunchConfig) -> list[int]:
    """The port of each server: free ones, or ``base_port`` onwards (each checked free)."""
    if config.base_port is None:
        ports: list[int] = []
        while len(ports) < config.num_servers:
            port = free_port()
            if port not in ports:
                ports.append(port)
        return ports
    ports = [config.base_port + i for i in range(config.num_servers)]
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            # As the servers bind: connections of a server that just exited (TIME_WAIT) do
            # not keep its port, only a listening process does.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((config.host, port))
            except OSError as exc:
                raise PortTakenError(port, config.host, port_owner(port), exc.strerror) from None
    return ports


class PortTakenError(ServerLaunchError):
    """A fixed port is taken; the message names the config key, :meth:`naming` another flag."""

    def __init__(self, port: int, host: str, owner: str, reason: str | None) -> None:
        self.port, self.host, self.owner, self.reason = port, host, owner, reason
        super().__init__(self.naming("rollout.launch.base_port", "or null for free ports"))

    def naming(self, setting: str, alternative: str = "") -> str:
        """The message with ``setting`` (a key or flag) as what to change."""
        by = f" by {self.owner}" if self.owner else ""
        return (
            f"{setting}: port {self.port} on {self.host} is taken{by} ({self.reason}); "
            f"choose another {setting}{f', {alternative}' if alternative else ''}"
        )


def port_owner(port: int) -> str:
    """``pid N (command line)`` of the process listening on ``port``, or "" when unknown."""
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN:
                if conn.pid is None:
                    return ""
                # One line, whatever the command line holds (``python -c`` scripts do).
                command = " ".join(" ".join(psutil.Process(conn.pid).cmdline()).split())
                return f"pid {conn.pid} ({command[:200]})"
    except (psutil.Error, OSError):
        return ""
    return ""


def _check_gpus(config: LaunchConfig) -> None:
    """SGLang servers must fit the GPUs this node has (when it has any)."""
    if resolve_backend(config.backend) != "sglang" or not torch.cuda.is_available():
        return
    count = torch.cuda.device_count()
    last = config.server_gpus(config.num_servers - 1)[-1]
    if last >= count:
        raise ServerLaunchError(
            f"rollout.launch: {config.num_servers} server(s) from GPU "
            f"{config.server_gpus(0)[0]} with {config.gpus_per_server or config.tp_size} GPU(s) "
            f"each need GPU {last}, but this node has {count}"
        )
