"""Process lifetime: every process the project starts dies with its parent, and temporary
folders of a process that died are recognised and removed by a later run.

- :func:`die_with_parent`: the calling process gets a signal when its parent dies (Linux:
  ``prctl(PR_SET_PDEATHSIG)``; elsewhere a watchdog thread polling the parent pid). Ranks call it
  under torchrun, so a killed torchrun does not leave ranks training.
- :func:`child_dies_with_launcher`: a ``preexec_fn`` for ``subprocess.Popen`` (rollout servers).
- :func:`forked_children_die_with_this_process`: every child a process forks (``os.fork``,
  multiprocessing's fork context: Megatron's checkpoint writers) dies with it. A writer left
  behind can block forever on a queue lock its dead parent held.
- Megatron's checkpoint writer's ``Manager`` process runs :func:`die_with_parent` as its
  initializer, with the parent's pid taken before the start (``oprd_mega.parallel.writer_process``).
- :func:`exit_within_after_signal`: once SIGTERM arrives, the process has a bounded time to exit
  by itself, then a watchdog thread ends it: a main thread blocked in C (a gloo collective whose
  peer is gone) never runs its Python signal handler.
- :func:`exit_on_sigterm`: SIGTERM raises ``SystemExit``, so ``finally`` blocks (temporary
  folders) run, as they do on Ctrl-C; :func:`raise_if_terminated` before publishing a result
  catches a SIGTERM whose exception a finalizer swallowed.
- :func:`publishing`: the atomic rename that publishes a result, after which a SIGTERM exits at
  once saying the result is complete (no cleanup, no traceback from an exit-time finalizer).
- :func:`make_owned_temp_dir` / :func:`remove_stale_temp_dirs`: temporary folders whose names
  carry host and pid, so a later run can prove their owner dead and remove them.
- :func:`plain_permissions`: what ``mkdtemp``/``mkstemp`` make private (0700/0600) gets, before
  it is published by a rename, the permissions a plain ``mkdir``/``open`` gives under the
  umask, so a checkpoint or converted model is as readable as any other file of the run.

Standard library only: imported by every process of the project, before torch.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

_PR_SET_PDEATHSIG = 1
_WATCHDOG_INTERVAL_S = 1.0


@functools.cache
def _prctl() -> Callable[..., int] | None:
    """libc's ``prctl``, looked up once: a forked child must not ``dlopen`` (another thread of
    its parent may have held the loader's lock at the fork)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def _set_parent_death_signal(sig: int) -> bool:
    """``prctl(PR_SET_PDEATHSIG, sig)``; False where it is not available."""
    prctl = _prctl()
    return prctl is not None and prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0


def _watch_parent(parent: int, sig: int) -> None:
    stop = threading.Event()
    while not stop.wait(_WATCHDOG_INTERVAL_S):
        if os.getppid() != parent:
            os.kill(os.getpid(), sig)
            return


def die_with_parent(
    sig: int = signal.SIGTERM, parent: int | None = None, *, use_prctl: bool = True
) -> None:
    """Have this process receive ``sig`` when its parent (pid ``parent``, default the current
    one) dies. If the parent is already gone, the signal is sent at once. ``use_prctl=False``:
    only the watchdog thread (for a child whose forking thread may end before its parent)."""
    parent = os.getppid() if parent is None else parent
    if not (use_prctl and _set_parent_death_signal(sig)):
        threading.Thread(
            target=_watch_parent, args=(parent, sig), name="parent-watchdog", daemon=True
        ).start()
    if os.getppid() != parent:  # it died before the signal was armed
        os.kill(os.getpid(), sig)


_forking: dict[str, int | bool] = {}  # what the parent knew at fork time, read in the child
_fork_hook_installed = False


def _before_fork() -> None:
    _forking["pid"] = os.getpid()
    _forking["from_main_thread"] = threading.current_thread() is threading.main_thread()


def _after_fork_in_child() -> None:
    # Linux ties the parent-death signal to the forking *thread*: a child forked from a thread
    # that ends first would be killed with it, so such children watch the parent pid instead.
    die_with_parent(
        signal.SIGKILL, int(_forking["pid"]), use_prctl=bool(_forking["from_main_thread"])
    )


def forked_children_die_with_this_process() -> None:
    """From now on, every child this process forks gets SIGKILL when it dies (idempotent).

    Covers ``os.fork`` and multiprocessing's fork context, e.g. the writer processes Megatron's
    ``FileSystemWriterAsync`` forks per checkpoint save. SIGKILL: a writer whose parent died was
    seen blocked on a queue lock, where it would never act on a SIGTERM. The hook is inherited,
    so grandchildren die with their own parent in turn.
    """
    global _fork_hook_installed
    if not _fork_hook_installed:
        _prctl()
        os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
        _fork_hook_installed = True


def child_dies_with_launcher(sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A ``preexec_fn`` for ``subprocess.Popen``: the child gets ``sig`` when the launching
    process dies (call this in the launching thread: Linux ties the signal to it)."""
    launcher = os.getpid()

    def arm() -> None:
        _set_parent_death_signal(sig)
        if os.getppid() != launcher:
            os.kill(os.getpid(), sig)

    return arm


_exit_watchdog_installed = False


def exit_within_after_signal(grace_s: float, sig: int = signal.SIGTERM) -> bool:
    """After ``sig`` reaches a Python handler of this process, give the process ``grace_s``
    seconds to exit by itself (handlers, ``finally`` blocks), then exit it with ``128 + sig``.

    Python runs signal handlers in the main thread between bytecodes, so a main thread blocked
    in C, e.g. in a gloo barrier waiting for a dead peer, never runs them, and the rank stays
    (with the rollout servers it launched holding their ports). The interpreter's C-level
    handler still writes the signal's number to the wakeup fd, from any thread; a watchdog
    thread reads it. Children set to die with this process (:func:`die_with_parent` /
    :func:`child_dies_with_launcher`) follow it. Only signals with a Python handler are seen:
    under ``SIG_DFL`` the kernel ends the process at once anyway.

    Call from the main thread; returns False where the wakeup fd is taken or cannot be set.
    """
    global _exit_watchdog_installed
    if _exit_watchdog_installed:
        return True
    if threading.current_thread() is not threading.main_thread():
        return False
    receiver, sender = socket.socketpair()
    sender.setblocking(False)
    try:
        previous = signal.set_wakeup_fd(sender.fileno(), warn_on_full_buffer=False)
    except (ValueError, OSError):
        receiver.close(), sender.close()
        return False
    if previous != -1:  # someone else's (an event loop's): leave it theirs
        signal.set_wakeup_fd(previous)
        receiver.close(), sender.close()
        return False
    _exit_watchdog_installed = True

    def watch() -> None:
        while True:
            received = receiver.recv(64)
            if not received:
                return
            if int(sig) in received:
                time.sleep(grace_s)
                print(
                    f"[oprd-mega] pid {os.getpid()}: still running {grace_s:g} s after signal "
                    f"{int(sig)} (blocked in C, e.g. a collective whose peer is gone): exiting",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(128 + int(sig))

    # The sending end stays open for the process's life: the C handler writes to it.
    threading.Thread(target=watch, name="signal-exit-watchdog", daemon=True).start()
    _keep_open.append(sender)
    return True


_keep_open: list[socket.socket] = []
_terminated_by: int | None = None  # the signal exit_on_sigterm's handler received


def exit_on_sigterm() -> None:
    """Make SIGTERM raise ``SystemExit(143)`` in the main thread, so cleanup code runs."""

    def handler(signum: int, frame: object) -> None:
        global _terminated_by
        _terminated_by = signum
        raise SystemExit(128 + signum)

    global _exit_on_sigterm_handler
    _exit_on_sigterm_handler = handler
    signal.signal(signal.SIGTERM, handler)


_exit_on_sigterm_handler: Callable[[int, object], None] | None = None


def raise_if_terminated() -> None:
    """Raise the ``SystemExit`` a SIGTERM asked for, if its handler's was swallowed.

    The handler runs wherever the main thread is; inside a finalizer (``__del__``, a weakref
    callback) Python prints "Exception ignored" and carries on, so a terminated conversion
    could finish and exit 0. Call this before publishing a result.
    """
    if _terminated_by is not None:
        raise SystemExit(128 + _terminated_by)


@contextlib.contextmanager
def publishing(what: str) -> Iterator[None]:
    """Publish a result (an atomic rename) with SIGTERM held back; from then on a SIGTERM ends
    the process at once with ``128 + SIGTERM`` and one line saying ``what`` is complete.

    Without it the timing decided: a SIGTERM between the rename and the end of the program
    raised ``SystemExit`` after the output was whole (its cleanup then ran for nothing), or in
    an exit-time finalizer, which printed a traceback and exited 0. Only where
    :func:`exit_on_sigterm` handles SIGTERM, in the main thread; elsewhere a plain ``yield``.
    """
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is not _exit_on_sigterm_handler
        or _exit_on_sigterm_handler is None
    ):  # another program's handler (the trainer's, for its servers) stays in charge
        yield
        return
    held = {signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
        signal.signal(signal.SIGTERM, functools.partial(_exit_after_publishing, what))
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, held)  # a held SIGTERM arrives here


def _exit_after_publishing(what: str, signum: int, frame: object) -> None:
    print(f"[oprd-mega] signal {signum} after {what} was complete: exiting", file=sys.stderr)
    sys.stderr.flush()
    os._exit(128 + signum)


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (a zombie counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    return True


def _owner_tag() -> str:
    host = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())
    return f"{host}-{os.getpid()}"


def make_owned_temp_dir(parent: Path, name: str, private: bool = False) -> Path:
    """``parent/.<name>.tmp-<host>-<pid>-<random>``, after removing the leftovers of earlier
    processes of this host that are provably dead (see :func:`remove_stale_temp_dirs`); with
    the umask's permissions (it is published by a rename), or 0700 with ``private``."""
    remove_stale_temp_dirs(parent, name)
    folder = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-{_owner_tag()}-", dir=parent))
    if not private:
        plain_permissions(folder)
    return folder


def _umask() -> int:
    """This process's umask: Linux shows it in /proc/self/status; elsewhere it is read by
    setting it and setting it back."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def plain_permissions(path: Path) -> None:
    """Give ``path`` (made private by ``mkdtemp``/``mkstemp``) the permissions a plain
    ``mkdir``/``open`` would have given it under this process's umask."""
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~_umask())


def remove_stale_temp_dirs(parent: Path, name: str) -> list[Path]:
    """Remove ``parent/.<name>.tmp-<host>-<pid>-*`` folders whose host is this one and whose
    pid is not alive; returns them. Others (another host, a live pid, older unnamed ones) are
    left alone: their owner cannot be proven dead."""
    host = _owner_tag().rsplit("-", 1)[0]
    pattern = re.compile(rf"^\.{re.escape(name)}\.tmp-{re.escape(host)}-(\d+)-")
    removed = []
    if not parent.is_dir():
        return removed
    for path in parent.iterdir():
        match = pattern.match(path.name)
        if match and path.is_dir() and not pid_alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
