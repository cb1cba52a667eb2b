"""The test launcher tells a lost master-port race from a worker's own failure."""

from __future__ import annotations

import socket
import subprocess

from tests.torchrun_utils import lost_port_race, torchrun_command, torchrun_env


def test_a_taken_master_port_is_recognised_and_a_worker_error_is_not(tmp_path) -> None:
    script = tmp_path / "fail.py"
    script.write_text("raise SystemExit('worker failed on purpose')\n", encoding="utf-8")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        raced = subprocess.run(
            torchrun_command(script, nproc=1, port=port),
            env=torchrun_env(60),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert raced.returncode != 0 and lost_port_race(raced.stderr), raced.stderr[-2000:]
    # a worker failing on its own, also when its own store cannot listen, is not a port race
    store = tmp_path / "store.py"
    store.write_text(
        "import socket\n"
        "from datetime import timedelta\n"
        "import torch.distributed as dist\n"
        "with socket.socket() as s:\n"
        "    s.bind(('127.0.0.1', 0))\n"
        "    s.listen()\n"
        "    port = s.getsockname()[1]\n"
        "    dist.TCPStore('127.0.0.1', port, 1, True, timeout=timedelta(seconds=5))\n",
        encoding="utf-8",
    )
    for worker in (script, store):
        failed = subprocess.run(
            torchrun_command(worker, nproc=1),
            env=torchrun_env(60),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert failed.returncode != 0 and not lost_port_race(failed.stderr), worker.name
    assert "EADDRINUSE" in failed.stderr  # the worker's store really failed to listen
