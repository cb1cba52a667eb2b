"""Server management with a fake launcher: flags, health wait, clean shutdown on every path."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from oprd_mega.rollout.servers import LaunchConfig, ServerGroup, ServerLaunchError
from tests.torchrun_utils import free_port

LAUNCHER = (sys.executable, str(Path(__file__).with_name("fake_launcher.py")))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has exited: its parent (the test or the launcher) has not reaped it yet.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def wait_dead(pids, timeout=10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(alive(p) for p in pids):
            return True
        time.sleep(0.05)
    return False


def survivors(state: Path) -> list[int]:
    """Live processes started for this test: they inherit FAKE_STATE_DIR=<state>."""
    marker = f"FAKE_STATE_DIR={state}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if marker in (proc / "environ").read_bytes().split(b"\0") and alive(int(proc.name)):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def no_survivors(state: Path, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while survivors(state):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def recorded(state: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(state.glob("server-*.json"))]


def two_ports() -> int:
    while True:
        base = free_port()
        try:
            import socket

            with socket.socket() as sock:
                sock.bind(("127.0.0.1", base + 1))
            return base
        except OSError:
            continue


def config(tmp_path, **overrides) -> LaunchConfig:
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    env = {"FAKE_STATE_DIR": str(state), **overrides.pop("env", {})}
    values = dict(
        model_path="/models/tiny",
        backend="sglang",
        num_servers=2,
        tp_size=2,
        base_port=two_ports(),
        mem_fraction_static=0.7,
        extra_args=("--enable-return-hidden-states", "--log-level", "warning"),
        command=LAUNCHER,
        log_dir=str(tmp_path / "logs"),
        health_timeout_s=20,
        shutdown_grace_s=5,
        env=env,
    )
    values.update(overrides)
    return LaunchConfig(**values)


def test_launch_passes_flags_waits_and_shuts_down_children(tmp_path):
    cfg = config(tmp_path)
    with ServerGroup.launch(cfg) as group:
        assert group.urls == [f"http://127.0.0.1:{cfg.base_port + i}" for i in range(2)]
        records = recorded(tmp_path / "state")
        assert len(records) == 2
        for i, rec in enumerate(records):
            argv = rec["argv"]
            assert argv[argv.index("--model-path") + 1] == "/models/tiny"
            assert argv[argv.index("--tp-size") + 1] == "2"
            assert argv[argv.index("--port") + 1] == str(cfg.base_port + i)
            assert argv[argv.index("--mem-fraction-static") + 1] == "0.7"
            assert argv[-3:] == ["--enable-return-hidden-states", "--log-level", "warning"]
        pids = [p for rec in records for p in rec["pids"]]
        assert all(alive(p) for p in pids)
    assert wait_dead(pids), "a server or its child outlived shutdown"
    assert no_survivors(tmp_path / "state")


def test_default_sglang_command_line():
    argv = LaunchConfig(model_path="m", backend="sglang", base_port=31000, tp_size=4).argv(1)
    assert argv[:3] == [sys.executable, "-m", "sglang.launch_server"]
    assert argv[3:] == [
        "--model-path",
        "m",
        "--tp-size",
        "4",
        "--host",
        "127.0.0.1",
        "--port",
        "31001",
        "--base-gpu-id",
        "4",
    ]
    embedded = LaunchConfig(model_path="m", backend="embedded", base_port=31000).argv(0)
    assert embedded[1:4] == ["-m", "oprd_mega.cli", "serve"]
    auto = LaunchConfig(model_path="m").argv(0, port=31000)
    has_sglang = importlib.util.find_spec("sglang") is not None
    assert ("sglang.launch_server" in auto) == has_sglang
    with pytest.raises(ValueError, match="num_servers"):
        LaunchConfig(model_path="m", num_servers=0)


def test_early_exit_names_server_and_log_and_cleans_up(tmp_path):
    cfg = config(tmp_path, env={"FAKE_FAIL": "1"}, num_servers=1)
    with pytest.raises(ServerLaunchError) as info:
        ServerGroup.launch(cfg)
    message = str(info.value)
    assert f"http://127.0.0.1:{cfg.base_port}" in message
    assert "exited with code 3" in message and "CUDA out of memory (simulated)" in message
    assert no_survivors(tmp_path / "state")


def test_health_timeout_cleans_up(tmp_path):
    cfg = config(tmp_path, env={"FAKE_DELAY": "60"}, health_timeout_s=1.5)
    with pytest.raises(ServerLaunchError, match=r"not healthy after 1\.5s"):
        ServerGroup.launch(cfg)
    assert no_survivors(tmp_path / "state")


def test_a_relaunch_keeps_the_earlier_logs(tmp_path):
    """A server relaunched into the same log_dir (restarted after it died, a resumed run)
    writes a new log; the earlier ones are kept, numbered in launch order."""
    for _ in range(3):
        with ServerGroup.launch(config(tmp_path, num_servers=1)):
            pass
    logs = tmp_path / "logs"
    assert sorted(p.name for p in logs.iterdir()) == [
        "rollout-server-0.log",
        "rollout-server-0.log.1",
        "rollout-server-0.log.2",
    ]


def test_a_temporary_log_folder_goes_with_a_clean_exit_and_stays_after_an_error(
    tmp_path, monkeypatch
):
    import tempfile

    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    with ServerGroup.launch(config(tmp_path, log_dir=None, num_servers=1)) as group:
        assert group.logs[0].parent.parent == temp and group.logs[0].is_file()
    assert list(temp.iterdir()) == []
    failing = config(tmp_path, log_dir=None, num_servers=1)
    with pytest.raises(RuntimeError, match="training failed"), ServerGroup.launch(failing) as group:
        raise RuntimeError("training failed")
    assert [p.name for p in temp.iterdir()] == [group.logs[0].parent.name]
    assert group.logs[0].is_file()  # an error may name it: it is still there to read
    with pytest.raises(ServerLaunchError) as info:
        ServerGroup.launch(config(tmp_path, log_dir=None, num_servers=1, env={"FAKE_FAIL": "1"}))
    named = next(p for p in temp.iterdir() if str(p) in str(info.value))
    assert "CUDA out of memory (simulated)" in (named / "rollout-server-0.log").read_text()


def test_exception_inside_with_shuts_down(tmp_path):
    with pytest.raises(RuntimeError, match="training failed"), ServerGroup.launch(config(tmp_path)):
        raise RuntimeError("training failed")
    pids = [p for rec in recorded(tmp_path / "state") for p in rec["pids"]]
    assert len(pids) == 4 and wait_dead(pids)
    assert no_survivors(tmp_path / "state")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_trainer_shuts_servers_down(tmp_path, signum):
    cfg = config(tmp_path)
    script = textwrap.dedent(
        f"""
        import signal, sys, time
        # A foreground trainer's SIGINT disposition, also when this suite runs as a background
        # job (where the shell starts children with SIGINT ignored).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        from oprd_mega.rollout.servers import LaunchConfig, ServerGroup
        cfg = LaunchConfig(**{{**{cfg.__dict__!r}, "command": tuple({list(LAUNCHER)!r})}})
        group = ServerGroup.launch(cfg)
        print("ready", flush=True)
        time.sleep(120)
        """
    )
    trainer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert trainer.stdout.readline().strip() == "ready"
        pids = [p for rec in recorded(tmp_path / "state") for p in rec["pids"]]
        assert len(pids) == 4 and all(alive(p) for p in pids)
        trainer.send_signal(signum)
        trainer.wait(timeout=30)
        assert trainer.returncode != 0
        assert wait_dead(pids), "servers outlived the trainer"
        assert no_survivors(tmp_path / "state")
    finally:
        if trainer.poll() is None:
            trainer.kill()


def test_attach_to_router_lists_workers(tmp_path):
    worker_port = free_port()

    class Router(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            body = b""
            if self.path == "/list_workers":
                body = json.dumps({"urls": [f"http://127.0.0.1:{worker_port}"]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    servers = [HTTPServer(("127.0.0.1", 0), Router), HTTPServer(("127.0.0.1", worker_port), Router)]
    for srv in servers:
        threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        router = f"http://127.0.0.1:{servers[0].server_address[1]}"
        group = ServerGroup.attach([], router_url=router, health_timeout_s=5)
        assert group.urls == [router]
        assert group.control_urls == [f"http://127.0.0.1:{worker_port}"]
        group.shutdown()  # attached servers are not ours: nothing is killed
        with pytest.raises(ServerLaunchError, match="not healthy"):
            ServerGroup.attach([f"http://127.0.0.1:{free_port()}"], health_timeout_s=0.5)
    finally:
        for srv in servers:
            srv.shutdown()
            srv.server_close()
