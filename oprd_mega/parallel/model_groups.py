"""A second set of Megatron model-parallel groups over the same ranks: the teacher's layout.

Megatron-Core 0.16's ``GPTModel`` hands one ``ProcessGroupCollection`` (``pg_collection``) down
to the embedding (tp), ``TransformerBlock`` / ``TransformerLayer`` (tp, pp rank for the layer
offset), attention (tp, cp), the MLP and the tensor-parallel linears (tp) and the output layer
(tp, embd); a model built with the teacher's collection computes in the teacher's groups.
Other paths still read the global ``parallel_state``: this project's builder (TP/PP sizes,
first/last stage, ``get_num_layers_to_build``), ``get_forward_backward_func`` (the schedule from
the global PP size) and the schedules' default groups and p2p communicator, and the step's own
helpers (``layer_stages``, ``local_rows``). No pg_collection reaches those, so
:meth:`ModelGroups.active` swaps Megatron's ``parallel_state`` globals to this set for the
duration of a ``with`` block (build, weight load, teacher pass) and restores them on exit; a
model built inside it keeps the collection it was built with
(``ProcessGroupCollection.use_mpu_process_groups()`` inside ``GPTModel``).

The groups are made by Megatron's own ``initialize_model_parallel`` (same rank order as the
student's: tp fastest, then dp, then pp), never by hand.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist
from megatron.core import parallel_state

from oprd_mega.parallel.layout import ParallelLayout

# parallel_state's module globals that hold groups, ranks and sizes (_TENSOR_MODEL_PARALLEL_GROUP,
# _MPU_PIPELINE_MODEL_PARALLEL_RANK, _GLOBAL_MEMORY_BUFFER, ...).
_STATE_NAME = re.compile(r"_[A-Z][A-Z0-9_]*$")


def _snapshot() -> dict[str, Any]:
    return {name: value for name, value in vars(parallel_state).items() if _STATE_NAME.match(name)}


def _restore(state: dict[str, Any]) -> None:
    for name, value in state.items():
        setattr(parallel_state, name, value)


@dataclass(frozen=True)
class ModelGroups:
    """Megatron's parallel state for one layout (``layout``), held apart from the global one."""

    layout: ParallelLayout
    state: dict[str, Any]

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """``parallel_state`` answers for this layout inside the block (not thread-safe: the
        global state is swapped)."""
        saved = _snapshot()
        _restore(self.state)
        try:
            yield
        finally:
            _restore(saved)


def init_model_groups(layout: ParallelLayout, *, timeout_minutes: int = 30) -> ModelGroups:
    """Megatron's groups for ``layout`` over every rank (collective over the world), leaving the
    current (student's) ``parallel_state`` as it was. Raises if tp * pp does not divide the
    world size."""
    if not parallel_state.model_parallel_is_initialized():
        raise RuntimeError("init_model_groups: initialise the student's layout first")
    layout.data_parallel_size(dist.get_world_size())
    current = _snapshot()
    # Megatron's destroy_model_parallel would also destroy the current gloo groups: only the
    # references are cleared here, so initialize_model_parallel builds a fresh set.
    _restore({name: {} if isinstance(value, dict) else None for name, value in current.items()})
    try:
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=layout.tp,
            pipeline_model_parallel_size=layout.pp,
            distributed_timeout_minutes=timeout_minutes,
        )
        return ModelGroups(layout=layout, state=_snapshot())
    finally:
        _restore(current)
