"""No orphans: ranks, launched servers and Megatron's writer processes die with their parent;
a terminated conversion removes its temporary folder and a later one removes a killed one's.

The kill tests look at the process table afterwards (psutil).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from oprd_mega.lifetime import (
    make_owned_temp_dir,
    pid_alive,
    plain_permissions,
    remove_stale_temp_dirs,
)
from tests.torchrun_utils import free_port, torchrun_command, torchrun_env
from tools.tiny_hf import make_tiny_model_dir

WORKER = Path(__file__).with_name("lifetime_worker.py")
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="Linux process table")


def _gone(pids: list[int], within_s: float) -> list[str]:
    """The processes still alive (zombies count as dead) after waiting up to ``within_s``, each
    as "pid (parent P): command line"."""
    deadline = time.monotonic() + within_s
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [pid for pid in alive if pid_alive(pid)]
    return [_describe(pid) for pid in alive]


def _describe(pid: int) -> str:
    try:
        process = psutil.Process(pid)
        return f"{pid} (parent {process.ppid()}): {' '.join(process.cmdline())[:200]}"
    except psutil.NoSuchProcess:
        return f"{pid} (gone since)"


@pytest.fixture
def cpu_hog() -> Iterator[None]:
    """Every core busy beside the test, as a loaded machine or CI is: orphans that a quiet
    machine hides (a writer forked mid-save, a slow start) show under load."""
    hogs = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"], env=ENV)
        for _ in range(os.cpu_count() or 2)
    ]
    try:
        yield
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


def _read_pids(proc: subprocess.Popen, count: int, timeout_s: float) -> list[dict]:
    found: list[dict] = []
    deadline = time.monotonic() + timeout_s
    assert proc.stdout is not None
    while len(found) < count and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        # Ranks print at the same time on torchrun's shared stdout: one line may hold two.
        for chunk in line.split("PIDS ")[1:]:
            found.append(json.JSONDecoder().raw_decode(chunk.strip())[0])
    assert len(found) == count, f"worker did not start: {proc.poll()}"
    return found


def _kill_tree(proc: subprocess.Popen) -> None:
    for child in psutil.Process(proc.pid).children(recursive=True):
        child.kill()
    proc.kill()
    proc.wait(timeout=30)


@pytest.mark.usefixtures("cpu_hog")
def test_ranks_stop_when_torchrun_is_killed() -> None:
    command = torchrun_command(WORKER, "rank", nproc=2)
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=torchrun_env(env=ENV))
    try:
        reported = _read_pids(proc, 2, timeout_s=240)
    except BaseException:
        _kill_tree(proc)
        raise
    ranks = [r["rank"] for r in reported]
    assert all(r["exit_watchdog"] for r in reported)  # init_distributed set it under torchrun
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert _gone(ranks, within_s=20) == []


def test_a_rank_blocked_in_a_collective_acts_on_sigterm_within_the_grace() -> None:
    """Rank 0 waits in a barrier its live peer never joins, with a Python SIGTERM handler (as
    rank 0 has for its servers): the handler cannot run there, so without the watchdog the rank
    stays until gloo's timeout (30 minutes). The worker sets the grace to 3 s."""
    command = torchrun_command(WORKER, "barrier", nproc=2)
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=torchrun_env(env=ENV))
    try:
        [blocked] = [r["rank"] for r in _read_pids(proc, 2, timeout_s=240) if r["blocked"]]
        time.sleep(2)  # in the barrier by now
        os.kill(blocked, signal.SIGTERM)
        assert _gone([blocked], within_s=3 + 15) == []
    finally:
        _kill_tree(proc)


@pytest.mark.usefixtures("cpu_hog")
def test_a_launched_server_dies_with_its_launcher(tmp_path: Path) -> None:
    model = make_tiny_model_dir(tmp_path / "model", layers=1, hidden=32)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), "server", str(model), str(port), str(tmp_path / "logs")],
        stdout=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        servers = _read_pids(proc, 1, timeout_s=300)[0]["servers"]
    except BaseException:
        _kill_tree(proc)
        raise
    assert all(pid_alive(pid) for pid in servers)
    proc.send_signal(signal.SIGKILL)  # no atexit, no signal handler: only the kernel's signal
    proc.wait(timeout=30)
    assert _gone(servers, within_s=30) == []


@pytest.mark.parametrize("forked_from", ["writer", "thread-fork"])
@pytest.mark.usefixtures("cpu_hog")
def test_a_forked_writer_blocked_on_its_dead_parent_dies_with_it(forked_from: str) -> None:
    """Megatron forks a checkpoint writer per save; killed mid-save, its parent leaves it
    blocked in ``task_done`` for ever (seen: alive 40 minutes later, parent 1)."""
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), forked_from], stdout=subprocess.PIPE, text=True, env=ENV
    )
    try:
        reported = _read_pids(proc, 1, timeout_s=120)[0]
    except BaseException:
        _kill_tree(proc)
        raise
    if forked_from == "thread-fork":  # the forking thread's end did not take the child with it
        assert reported["alive"] == reported["writers"]
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert _gone(reported["writers"], within_s=10) == []


def _convert(hf: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "oprd_mega.convert.cli", "hf-to-mcore", "--no-progress",
         "--hf", str(hf), "--mcore", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV,
    )  # fmt: skip


def _interrupt_mid_conversion(hf: Path, out: Path, sig: int) -> tuple[subprocess.Popen, list]:
    """Start a conversion, send ``sig`` once its temporary folder exists; returns the process
    and the children it had then."""
    proc = _convert(hf, out)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if any(out.parent.glob(f".{out.name}.tmp-*/.part-00002")):
            break
        time.sleep(0.02)
    # Freeze it first: on a fast machine the last layers took less time than one poll, and the
    # conversion finished (exit 0) before the signal came. A stopped process gets ``sig`` as
    # the first thing it sees when it continues.
    os.kill(proc.pid, signal.SIGSTOP)
    assert proc.poll() is None, f"conversion ended before it was interrupted: {proc.stderr}"
    children = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    proc.send_signal(sig)
    os.kill(proc.pid, signal.SIGCONT)
    proc.wait(timeout=60)
    return proc, children


@pytest.fixture(scope="module")
def big_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Enough layers that the conversion is still running when its third layer's file appears.
    return make_tiny_model_dir(tmp_path_factory.mktemp("hf") / "hf", layers=8, hidden=64)


@pytest.mark.usefixtures("cpu_hog")
def test_sigterm_of_a_conversion_removes_its_temporary_folder(
    big_model: Path, tmp_path: Path
) -> None:
    out = tmp_path / "mcore"
    proc, children = _interrupt_mid_conversion(big_model, out, signal.SIGTERM)
    assert proc.returncode == 128 + signal.SIGTERM
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert _gone(children, within_s=20) == []


@pytest.mark.usefixtures("cpu_hog")
def test_sigkill_of_a_conversion_leaves_nothing_a_later_run_keeps(
    big_model: Path, tmp_path: Path
) -> None:
    out = tmp_path / "mcore"
    proc, children = _interrupt_mid_conversion(big_model, out, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    # The writer's Manager, its resource tracker and the writers forked for the save.
    assert children and _gone(children, within_s=20) == []
    [stale] = list(tmp_path.glob(".mcore.tmp-*"))
    small = make_tiny_model_dir(tmp_path / "small", layers=1, hidden=32)
    again = _convert(small, out)  # a later run to the same target
    _, stderr = again.communicate(timeout=300)
    assert again.returncode == 0, stderr[-3000:]
    assert not stale.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["mcore", "small"]


def test_only_temporary_folders_of_dead_owners_are_removed(tmp_path: Path) -> None:
    finished = subprocess.Popen(["true"])
    finished.wait()
    mine = make_owned_temp_dir(tmp_path, "out")
    host_and_pid = mine.name.split(".tmp-")[1].rsplit("-", 1)[0]
    host = host_and_pid.rsplit("-", 1)[0]
    stale = tmp_path / f".out.tmp-{host}-{finished.pid}-abc"
    other_host = tmp_path / f".out.tmp-elsewhere-{finished.pid}-abc"
    other_name = tmp_path / f".other.tmp-{host}-{finished.pid}-abc"
    for path in (stale, other_host, other_name):
        path.mkdir()
    assert remove_stale_temp_dirs(tmp_path, "out") == [stale]
    assert mine.is_dir() and other_host.is_dir() and other_name.is_dir()


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_published_folders_and_files_get_the_umask_permissions(tmp_path: Path, umask: int) -> None:
    """What is published by a rename (checkpoints, converted models, figures) is as readable
    as what ``mkdir``/``open`` make under the same umask; released weights stay private."""
    previous = os.umask(umask)
    try:
        reference_dir = tmp_path / "made-by-mkdir"
        reference_dir.mkdir()
        reference_file = tmp_path / "made-by-open"
        reference_file.write_text("x")
        published = make_owned_temp_dir(tmp_path, "out")
        private = make_owned_temp_dir(tmp_path, "spill", private=True)
        handle, name = tempfile.mkstemp(dir=tmp_path)
        os.close(handle)
        plain_permissions(Path(name))
    finally:
        os.umask(previous)
    assert published.stat().st_mode & 0o777 == reference_dir.stat().st_mode & 0o777
    assert Path(name).stat().st_mode & 0o777 == reference_file.stat().st_mode & 0o777
    assert private.stat().st_mode & 0o777 == 0o700


_SIGTERM_IN_A_FINALIZER = """
import os, signal
from oprd_mega.lifetime import exit_on_sigterm, raise_if_terminated
exit_on_sigterm()
class Finalized:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        sum(range(100_000))  # the handler runs here; Python ignores its SystemExit
Finalized()
print("carried on", flush=True)
raise_if_terminated()
print("published", flush=True)
"""


def test_a_sigterm_swallowed_by_a_finalizer_still_stops_before_publishing() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _SIGTERM_IN_A_FINALIZER], capture_output=True, text=True, env=ENV
    )
    assert "Exception ignored" in done.stderr  # the handler's own SystemExit was lost
    assert done.stdout.split() == ["carried", "on"]
    assert done.returncode == 128 + signal.SIGTERM


_SIGTERM_AROUND_PUBLISHING = """
import atexit, os, signal, sys
from pathlib import Path
from oprd_mega.lifetime import exit_on_sigterm, publishing
exit_on_sigterm()
tmp, out = Path(sys.argv[1]) / "tmp", Path(sys.argv[1]) / "out"
tmp.mkdir()
when = sys.argv[2]
if when == "finalizer":  # as a multiprocessing finalizer runs at exit
    atexit.register(lambda: (os.kill(os.getpid(), signal.SIGTERM), sum(range(100_000))))
with publishing(f"the folder {out}"):
    if when == "rename":
        os.kill(os.getpid(), signal.SIGTERM)  # held until the result is published
    os.replace(tmp, out)
print("published", flush=True)
"""


@pytest.mark.parametrize("when", ["rename", "finalizer"])
def test_a_sigterm_after_publishing_exits_143_saying_the_output_is_complete(
    when: str, tmp_path: Path
) -> None:
    """The same outcome whatever the timing: the output is whole, one line says so, exit 143
    (a SIGTERM in an exit-time finalizer once printed a traceback and exited 0)."""
    done = subprocess.run(
        [sys.executable, "-c", _SIGTERM_AROUND_PUBLISHING, str(tmp_path), when],
        capture_output=True, text=True, env=ENV, timeout=60,
    )  # fmt: skip
    assert done.returncode == 128 + signal.SIGTERM, done.stderr
    assert (tmp_path / "out").is_dir() and not (tmp_path / "tmp").exists()
    assert done.stderr.splitlines() == [
        f"[oprd-mega] signal 15 after the folder {tmp_path / 'out'} was complete: exiting"
    ]
    assert done.stdout.split() == ([] if when == "rename" else ["published"])
