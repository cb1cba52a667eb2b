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
    failed = subprocess.run(
        torchrun_command(script, nproc=1),
        env=torchrun_env(60),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert failed.returncode != 0 and not lost_port_race(failed.stderr)
