"""Run a script under ``torchrun`` as a subprocess, so a hang dumps stacks instead of eating CI.

Multi-process tests (gloo on CPU) call :func:`run_torchrun`; the child processes get
``PYTHONFAULTHANDLER=1`` and the whole launch is killed after ``timeout`` seconds, after a
SIGABRT-free stack dump requested through faulthandler's ``dump_traceback_later`` in the
worker (see :data:`FAULTHANDLER_PREAMBLE`).
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch.distributed as dist

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


# free_port() releases the port before torchrun binds it; another process on the machine may take
# it in between. Only the agent's rendezvous store failing to listen is retried (no worker has
# run yet then), never a worker's own failure.
PORT_ATTEMPTS = 3
_PORT_RACE = "The server socket has failed to listen on any local network address"


def lost_port_race(stderr: str) -> bool:
    """Whether a launch failed because its master port was taken before the store bound it:
    the agent's own rendezvous failed, no worker did (a worker's store failing to listen
    shows as the agent's ``ChildFailedError``)."""
    return (
        _PORT_RACE in stderr
        and "EADDRINUSE" in stderr
        and "in _rendezvous" in stderr
        and "ChildFailedError" not in stderr
    )


def torchrun_env(timeout: float = 300.0, env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a launch: this process's, with stack dumps after ``timeout - 15``
    seconds and one thread per process and no GPU unless set here, then ``env`` on top."""
    child_env = dict(os.environ)
    child_env.update(
        {
            "PYTHONFAULTHANDLER": "1",
            "OPRD_TEST_HANG_S": str(max(int(timeout) - 15, 10)),
            "OMP_NUM_THREADS": child_env.get("OMP_NUM_THREADS", "1"),
            "CUDA_VISIBLE_DEVICES": child_env.get("CUDA_VISIBLE_DEVICES", ""),
        }
    )
    child_env.update(env or {})
    return child_env


def torchrun_command(
    script: str | Path,
    *args: str,
    nproc: int,
    module: bool = False,
    nnodes: int = 1,
    node_rank: int = 0,
    port: int | None = None,
) -> list[str]:
    """``torchrun`` (as ``python -m torch.distributed.run``) of ``script args`` on loopback;
    ``module``: ``script`` is a module name (``-m``). Every node of a multi-node launch needs
    the same ``port``."""
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", str(nnodes), "--node-rank", str(node_rank),
        "--nproc-per-node", str(nproc),
        "--master-addr", "127.0.0.1", "--master-port", str(port or free_port()),
        "--log-dir", str(_torchrun_logs()),
        *(["-m"] if module else []), str(script), *args,
    ]  # fmt: skip


@functools.cache
def _torchrun_logs() -> Path:
    """One folder for every launch of this test process, removed at its exit: without
    ``--log-dir`` torchrun leaves a ``/tmp/torchelastic_*`` folder per launch (dozens a day)."""
    folder = Path(tempfile.mkdtemp(prefix="oprd-tests-torchrun-"))
    atexit.register(shutil.rmtree, folder, True)
    return folder


def run_torchrun(
    script: str | Path,
    *args: str,
    nproc: int,
    module: bool = False,
    timeout: float = 300.0,
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Launch ``torchrun --nproc-per-node nproc script args`` on loopback and return its result.

    Raises ``AssertionError`` with both output streams when the launch times out, or when it
    fails and ``check`` is true (false: the caller checks the exit code).
    """
    for attempt in range(PORT_ATTEMPTS):
        cmd = torchrun_command(script, *args, nproc=nproc, module=module)
        try:
            result = subprocess.run(
                cmd,
                env=torchrun_env(timeout, env),
                cwd=cwd,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(
                f"torchrun {script} timed out after {timeout}s\n"
                f"--- stdout ---\n{exc.stdout}\n--- stderr ---\n{exc.stderr}"
            ) from exc
        if not (result.returncode and lost_port_race(result.stderr)):
            break
        if attempt + 1 < PORT_ATTEMPTS:
            sys.stderr.write(f"torchrun {script}: master port taken meanwhile, relaunching\n")
    if check and result.returncode != 0:
        raise AssertionError(
            f"torchrun {script} exited {result.returncode}\n"
            f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"
        )
    return result


def stage_layers(model: Any) -> list[list[int]]:
    """In a worker: the global layer numbers each pipeline stage of ``model`` built, as
    Megatron placed them (collective over the world; every rank of a stage holds the same)."""
    mine = [layer.layer_number for layer in model.decoder.layers]
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return [list(stage) for stage in sorted({tuple(layers) for layers in every})]
