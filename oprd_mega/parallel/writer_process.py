"""Megatron's torch_dist writer collects results through a ``multiprocessing`` Manager process
(one per process, started at the first save, ~300 MB) and forks writer processes per save.
Started by Megatron, both outlive a crashed or killed parent. :func:`install` makes the writer
use a Manager started here, whose process dies with its parent
(:func:`oprd_mega.lifetime.die_with_parent`), and has every forked writer die with its parent
(:func:`oprd_mega.lifetime.forked_children_die_with_this_process`)."""

from __future__ import annotations

import functools
import multiprocessing
import os
import signal
from multiprocessing.managers import SyncManager
from typing import Any

from megatron.core.dist_checkpointing.strategies import filesystem_async

from oprd_mega.lifetime import die_with_parent, forked_children_die_with_this_process

_manager: SyncManager | None = None


def results_queue() -> Any:
    """The writer's results queue (what ``filesystem_async._get_write_results_queue`` returns),
    served by a Manager process that dies with this one."""
    global _manager
    if filesystem_async._results_queue is None:
        _manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
        # SIGKILL: the Manager has nothing to clean up, and a SIGTERM was seen to leave it. The
        # parent's pid is taken here: the spawned Manager imports this program's modules before
        # its initializer runs, and a parent killed meanwhile would leave it reparented, its
        # getppid() no longer the parent's.
        dies_with_us = functools.partial(die_with_parent, signal.SIGKILL, os.getpid())
        _manager.start(initializer=dies_with_us)
        filesystem_async._results_queue = _manager.Queue()
    return filesystem_async._results_queue


def install() -> None:
    """Route Megatron's writer to :func:`results_queue`; forked writers die with this process
    (idempotent)."""
    filesystem_async._get_write_results_queue = results_queue
    forked_children_die_with_this_process()
