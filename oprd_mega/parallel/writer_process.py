"""Megatron's torch_dist writer collects results through a ``multiprocessing`` Manager process
(one per process, started at the first save, ~300 MB). Started by Megatron it outlives a
crashed or killed parent; :func:`install` makes the writer use one started here instead, whose
process dies with its parent (:func:`oprd_mega.lifetime.die_with_parent`)."""

from __future__ import annotations

import functools
import multiprocessing
import signal
from multiprocessing.managers import SyncManager
from typing import Any

from megatron.core.dist_checkpointing.strategies import filesystem_async

from oprd_mega.lifetime import die_with_parent

_manager: SyncManager | None = None


def results_queue() -> Any:
    """The writer's results queue (what ``filesystem_async._get_write_results_queue`` returns),
    served by a Manager process that dies with this one."""
    global _manager
    if filesystem_async._results_queue is None:
        _manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
        # SIGKILL: the Manager has nothing to clean up, and a SIGTERM was seen to leave it.
        _manager.start(initializer=functools.partial(die_with_parent, signal.SIGKILL))
        filesystem_async._results_queue = _manager.Queue()
    return filesystem_async._results_queue


def install() -> None:
    """Route Megatron's writer to :func:`results_queue` (idempotent)."""
    filesystem_async._get_write_results_queue = results_queue
