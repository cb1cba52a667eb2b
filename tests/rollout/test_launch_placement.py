"""Launch mode: GPU placement, SGLang flags, free and taken ports, server identity, routers.

Command lines are checked against the flag names SGLang 0.5.23 defines (its
``sglang/srt/arg_groups/fields/*.py``, from the pinned wheel: a field ``base_gpu_id`` is the
flag ``--base-gpu-id``), since its parser cannot run without sglang installed.
"""

from __future__ import annotations

import ast
import json
import os
import socket
import sys
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from oprd_mega.rollout.servers import (
    LaunchConfig,
    ServerGroup,
    ServerLaunchError,
    list_router_workers,
)
from tests.torchrun_utils import free_port

from .sglang_schema import fetch_member, fetch_wheel

LAUNCHER = (sys.executable, str(Path(__file__).with_name("fake_launcher.py")))


def sglang_flags() -> dict[str, bool]:
    """Every ``--flag`` of SGLang's server arguments -> whether it is a bare boolean switch."""
    with zipfile.ZipFile(fetch_wheel()) as wheel:
        members = [
            m
            for m in wheel.namelist()
            if m.startswith("sglang/srt/arg_groups/fields/") and m.endswith(".py")
        ]
    flags: dict[str, bool] = {}
    for member in members:
        tree = ast.parse(fetch_member(member).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                annotation = node.annotation
                kind = None
                if isinstance(annotation, ast.Subscript) and isinstance(
                    annotation.slice, ast.Tuple
                ):
                    kind = annotation.slice.elts[0]  # A[type, "help"]
                is_bool = isinstance(kind, ast.Name) and kind.id == "bool"
                flags["--" + node.target.id.replace("_", "-")] = is_bool
    return flags


def check_against_sglang(argv: list[str], flags: dict[str, bool]) -> None:
    i = 0
    while i < len(argv):
        flag = argv[i]
        assert flag in flags, f"{flag} is not a flag of sglang.launch_server"
        if flags[flag]:
            i += 1
        else:
            assert i + 1 < len(argv) and not argv[i + 1].startswith("--"), f"{flag} needs a value"
            i += 2


def test_command_lines_use_sglangs_own_flags():
    flags = sglang_flags()
    assert len(flags) > 100  # the fields were found
    config = LaunchConfig(
        model_path="/m",
        backend="sglang",
        num_servers=2,
        tp_size=2,
        mem_fraction_static=0.6,
        deterministic_inference=True,
    )
    for index in range(2):
        argv = config.argv(index, port=31000 + index, token="launch-abc")
        check_against_sglang(argv[3:], flags)
        assert "--enable-deterministic-inference" in argv
        assert argv[argv.index("--weight-version") + 1] == "launch-abc"


def test_servers_never_share_gpus_with_each_other_or_the_trainer():
    base = LaunchConfig(model_path="/m", backend="sglang", num_servers=3, tp_size=2)
    placed = base.for_trainer(trainer_gpus=2, sampling_seed=None)
    assert [placed.server_gpus(i) for i in range(3)] == [[2, 3], [4, 5], [6, 7]]
    ids = [placed.argv(i, port=1000 + i) for i in range(3)]
    assert [a[a.index("--base-gpu-id") + 1] for a in ids] == ["2", "4", "6"]
    wide = LaunchConfig(model_path="/m", backend="sglang", num_servers=2, gpus_per_server=4)
    assert [wide.for_trainer(4, None).server_gpus(i) for i in range(2)] == [
        [4, 5, 6, 7],
        [8, 9, 10, 11],
    ]
    colocated = LaunchConfig(model_path="/m", backend="sglang", num_servers=2, colocate=True)
    assert [colocated.for_trainer(2, None).server_gpus(i) for i in range(2)] == [[0], [1]]
    explicit = LaunchConfig(model_path="/m", backend="sglang", base_gpu_id=6)
    assert explicit.for_trainer(4, None).server_gpus(0) == [6]
    with pytest.raises(
        ValueError, match=r"base_gpu_id 1 puts rollout servers on the trainer's GPUs 0-3"
    ):
        LaunchConfig(model_path="/m", base_gpu_id=1).for_trainer(4, None)
    with pytest.raises(ValueError, match="gpus_per_server must be >= tp_size"):
        LaunchConfig(model_path="/m", tp_size=4, gpus_per_server=2)
    with pytest.raises(ValueError, match="base_port must leave 2 port"):
        LaunchConfig(model_path="/m", num_servers=2, base_port=65535)


def test_colocated_servers_start_with_the_memory_saver():
    for backend in ("sglang", "embedded"):
        colocated = LaunchConfig(model_path="/m", backend=backend, colocate=True)
        assert "--enable-memory-saver" in colocated.for_trainer(2, None).argv(0, port=1)
        apart = LaunchConfig(model_path="/m", backend=backend)
        assert "--enable-memory-saver" not in apart.for_trainer(2, None).argv(0, port=1)
    argv = LaunchConfig(model_path="/m", backend="sglang", colocate=True).argv(0, port=1)
    check_against_sglang(argv[3:], sglang_flags())  # SGLang's own flag of that name


def test_a_sampling_seed_makes_sglang_deterministic():
    base = LaunchConfig(model_path="/m", backend="sglang")
    assert "--enable-deterministic-inference" in base.for_trainer(0, 7).argv(0, port=1)
    assert "--enable-deterministic-inference" not in base.for_trainer(0, None).argv(0, port=1)


def fake_config(tmp_path, **overrides) -> LaunchConfig:
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    values = dict(
        model_path="/models/tiny",
        backend="sglang",
        num_servers=2,
        command=LAUNCHER,
        log_dir=str(tmp_path / "logs"),
        health_timeout_s=20,
        shutdown_grace_s=5,
        env={"FAKE_STATE_DIR": str(state), **overrides.pop("env", {})},
    )
    values.update(overrides)
    return LaunchConfig(**values)


def test_ports_default_to_free_ones_and_servers_prove_identity(tmp_path):
    with ServerGroup.launch(fake_config(tmp_path)) as group:
        ports = [int(u.rsplit(":", 1)[1]) for u in group.urls]
        assert len(set(ports)) == 2
        records = [json.loads(f.read_text()) for f in sorted((tmp_path / "state").iterdir())]
        tokens = {r["argv"][r["argv"].index("--weight-version") + 1] for r in records}
        assert tokens == set(group.tokens) and len(tokens) == 2
        assert all(t.startswith("launch-") for t in tokens)


def test_a_taken_port_names_port_and_owner(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(ServerLaunchError) as error:
            ServerGroup.launch(fake_config(tmp_path, num_servers=1, base_port=port))
    message = str(error.value)
    assert f"port {port} on 127.0.0.1 is taken by pid {os.getpid()}" in message
    assert "rollout.launch.base_port" in message
    assert not (tmp_path / "state").exists() or not any((tmp_path / "state").iterdir())


def test_a_server_that_is_not_ours_is_refused(tmp_path):
    """Whatever answers on the port must report the launch token (here it reports another
    version, as a server left by an earlier run would)."""
    config = fake_config(tmp_path, num_servers=1, env={"FAKE_WEIGHT_VERSION": "step-6"})
    with pytest.raises(ServerLaunchError, match="not as the rollout server launched here") as error:
        ServerGroup.launch(config)
    assert "weight_version is 'step-6'" in str(error.value)
    assert "belongs to pid" in str(error.value)


class _Router(BaseHTTPRequestHandler):
    workers: ClassVar[dict] = {}

    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path != "/workers":
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = json.dumps(self.workers).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_router_discovery_falls_back_to_workers():
    worker = f"http://127.0.0.1:{free_port()}"
    handler = type("Router", (_Router,), {"workers": {"workers": [{"url": worker}], "total": 1}})
    router = HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=router.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{router.server_address[1]}"
        assert list_router_workers(url) == [worker]
        handler.workers = {"total": 0}
        with pytest.raises(ServerLaunchError, match="/list_workers: HTTP 404; /workers answered"):
            list_router_workers(url)
    finally:
        router.shutdown()
        router.server_close()


def test_embedded_servers_prove_identity_and_a_second_run_cannot_take_their_port(
    tmp_path, tiny_model_dir
):
    config = LaunchConfig(
        model_path=str(tiny_model_dir),
        backend="embedded",
        log_dir=str(tmp_path / "logs"),
        health_timeout_s=180,
    )
    with ServerGroup.launch(config) as group:
        port = int(group.urls[0].rsplit(":", 1)[1])
        owner = group.processes[0].pid
        again = LaunchConfig(
            model_path=str(tiny_model_dir),
            backend="embedded",
            base_port=port,
            log_dir=str(tmp_path),
        )
        with pytest.raises(ServerLaunchError) as error:
            ServerGroup.launch(again)
    message = str(error.value)
    assert f"port {port} on 127.0.0.1 is taken by pid {owner} (" in message
    assert "oprd_mega.cli serve" in message
