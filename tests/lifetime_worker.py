"""Processes for the lifetime kill tests; each prints ``PIDS <json>`` once its children are up,
then sleeps until it is killed.

Usage: lifetime_worker.py rank | barrier | server MODEL_DIR PORT LOG_DIR | writer | thread-fork
"""

import json
import multiprocessing
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root

import oprd_mega  # noqa: F401  (the package a spawned child re-imports)


def report(**pids: object) -> None:
    print("PIDS " + json.dumps(pids), flush=True)
    time.sleep(600)


def _finish_task(count_queue: multiprocessing.JoinableQueue) -> None:
    """What Megatron's forked checkpoint writer does last: mark its task done. Its parent waits
    in ``count_queue.join()``; if that parent is dead, ``task_done``'s notify waits forever for
    the dead waiter to wake."""
    time.sleep(2)
    count_queue.get()
    count_queue.task_done()
    time.sleep(600)


def _fork_writer() -> multiprocessing.Process:
    context = multiprocessing.get_context("fork")
    count_queue = context.JoinableQueue()
    count_queue.put(0)
    writer = context.Process(target=_finish_task, args=(count_queue,))
    writer.start()
    threading.Thread(target=count_queue.join, daemon=True).start()
    return writer


def main() -> None:
    mode = sys.argv[1]
    if mode == "rank":  # under torchrun
        from oprd_mega import lifetime
        from oprd_mega.parallel import init_distributed

        init_distributed()
        report(rank=os.getpid(), exit_watchdog=lifetime._exit_watchdog_installed)
    elif mode == "barrier":  # under torchrun: rank 0 waits in a barrier rank 1 never joins
        import signal

        import torch.distributed as dist

        from oprd_mega.lifetime import exit_within_after_signal
        from oprd_mega.parallel import init_distributed

        exit_within_after_signal(3.0)  # init_distributed's own call (30 s) then keeps this one
        init_distributed()
        if dist.get_rank() == 0:
            # A Python handler, as rank 0's rollout-server group installs: Python runs it only
            # between bytecodes, never while the barrier blocks in C.
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
            print("PIDS " + json.dumps({"rank": os.getpid(), "blocked": True}), flush=True)
            dist.barrier()
            print("barrier returned", flush=True)
        else:
            report(rank=os.getpid(), blocked=False)
    elif mode == "server":
        from oprd_mega.rollout.servers import LaunchConfig, ServerGroup

        config = LaunchConfig(
            model_path=sys.argv[2],
            backend="embedded",
            base_port=int(sys.argv[3]),
            log_dir=sys.argv[4],
            health_timeout_s=240,
        )
        group = ServerGroup.launch(config)
        report(servers=[p.pid for p in group.processes])
    elif mode == "writer":  # forks as Megatron's FileSystemWriterAsync does, from the main thread
        from oprd_mega.parallel.writer_process import install

        install()
        report(writers=[_fork_writer().pid])
    elif mode == "thread-fork":  # forked from a thread that ends at once
        from oprd_mega.lifetime import forked_children_die_with_this_process

        forked_children_die_with_this_process()
        writers: list[int] = []
        thread = threading.Thread(target=lambda: writers.append(_fork_writer().pid))
        thread.start()
        thread.join()
        time.sleep(3)  # the forking thread is gone: its children must still be alive
        report(writers=writers, alive=[pid for pid in writers if _alive(pid)])


def _alive(pid: int) -> bool:
    from oprd_mega.lifetime import pid_alive

    return pid_alive(pid)


if __name__ == "__main__":
    main()
