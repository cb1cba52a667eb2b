"""Run a script under ``torchrun`` as a subprocess, so a hang dumps stacks instead of eating CI.

Multi-process tests (gloo on CPU) call :func:`run_torchrun`; the child processes get
``PYTHONFAULTHANDLER=1`` and the whole launch is killed after ``timeout`` seconds, after a
SIGABRT-free stack dump requested through faulthandler's ``dump_traceback_later`` in the
worker (see :data:`FAULTHANDLER_PREAMBLE`).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

# Workers can exec this before their own code: it dumps every thread's stack to stderr and
# exits if the worker is still alive after the given number of seconds.
FAULTHANDLER_PREAMBLE = (
    "import faulthandler, os, sys; "
    "faulthandler.dump_traceback_later(int(os.environ.get('OPRD_TEST_HANG_S', '600')), exit=True)"
)


def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_torchrun(
    script: str | Path,
    *args: str,
    nproc: int,
    timeout: float = 300.0,
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Launch ``torchrun --nproc-per-node nproc script args`` on loopback and return its result.

    Raises ``AssertionError`` with both output streams when the launch fails or times out.
    """
    child_env = dict(os.environ)
    child_env.update(
        {
            "PYTHONFAULTHANDLER": "1",
            "OPRD_TEST_HANG_S": str(max(int(timeout) - 15, 10)),
            "OMP_NUM_THREADS": child_env.get("OMP_NUM_THREADS", "1"),
            "CUDA_VISIBLE_DEVICES": child_env.get("CUDA_VISIBLE_DEVICES", ""),
        }
    )
    if env:
        child_env.update(env)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc-per-node",
        str(nproc),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        str(script),
        *args,
    ]
    try:
        result = subprocess.run(
            cmd, env=child_env, cwd=cwd, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(
            f"torchrun {script} timed out after {timeout}s\n"
            f"--- stdout ---\n{exc.stdout}\n--- stderr ---\n{exc.stderr}"
        ) from exc
    if result.returncode != 0:
        raise AssertionError(
            f"torchrun {script} exited {result.returncode}\n"
            f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"
        )
    return result
