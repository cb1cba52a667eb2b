"""Each model's process groups: Megatron-Core's ``ProcessGroupCollection`` (``pg_collection``).

The student's groups are the ones Megatron's ``initialize_model_parallel`` made at start-up
(``parallel_state``'s globals, :func:`global_groups`). A model on a layout of its own (the
teacher's ``parallel.teacher``) gets a second collection over the same ranks from
:func:`init_model_groups`: the groups are made with ``dist.new_group`` from the rank lists of
Megatron's own ``RankGenerator`` (the same order as the student's: tp fastest, then cp, dp,
pp), and ``parallel_state`` is neither read nor changed.

A collection is handed to the builder (:func:`oprd_mega.models.build_gpt_model`), which gives
it to ``GPTModel`` (embedding, layers, attention, linears and output layer compute in its
groups) and keeps it on the model (``model.pg_collection``). The code that runs a built model
(the forward-only schedule, the teacher pass, layer placement, weight loading, the weight
sync's gather and probe, the projection's checkpoint shards) reads the groups from there
(:func:`groups_of`); no code swaps ``parallel_state``'s globals.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.process_groups_config import ProcessGroupCollection

from oprd_mega.parallel.layout import ParallelLayout

# Megatron's rank order (initialize_model_parallel's default ``order``).
_ORDER = "tp-cp-ep-dp-pp"
# collection field -> the dimensions of Megatron's RankGenerator its groups span
_SPANS = {
    "tp": "tp",
    "cp": "cp",
    "dp": "dp",
    "dp_cp": "dp-cp",
    "pp": "pp",
    "mp": "tp-pp",
    "tp_cp": "tp-cp",
    "tp_dp_cp": "tp-dp-cp",
}


def global_groups() -> ProcessGroupCollection:
    """The groups ``parallel_state`` holds (the student's): what ``GPTModel`` takes by default."""
    return ProcessGroupCollection.use_mpu_process_groups()


def groups_of(model: torch.nn.Module) -> ProcessGroupCollection:
    """The collection a built model computes in (``GPTModel.pg_collection``), inside any
    DDP / Float16Module wrappers."""
    while hasattr(model, "module"):  # Megatron's DDP holds a pg_collection of its own
        model = model.module
    groups = getattr(model, "pg_collection", None)
    if groups is None:
        raise ValueError(f"{type(model).__name__} holds no pg_collection (not a Megatron model)")
    return groups


def is_first_stage(groups: ProcessGroupCollection) -> bool:
    """Whether this rank is on the first pipeline stage of ``groups``' layout."""
    return groups.pp.rank() == 0


def is_last_stage(groups: ProcessGroupCollection) -> bool:
    """Whether this rank is on the last pipeline stage of ``groups``' layout."""
    return groups.pp.rank() == groups.pp.size() - 1


def group_ranks(layout: ParallelLayout, world_size: int) -> dict[str, list[list[int]]]:
    """Every group of each kind (a ``ProcessGroupCollection`` field) for ``layout`` over
    ``world_size`` ranks, from Megatron's ``RankGenerator``. Raises if tp * pp * cp does not
    divide the world size."""
    dp = layout.data_parallel_size(world_size)
    ranks = parallel_state.RankGenerator(
        tp=layout.tp, ep=1, dp=dp, pp=layout.pp, cp=layout.cp, order=_ORDER
    )
    out = {name: ranks.get_ranks(span) for name, span in _SPANS.items()}
    # Megatron's default_embedding_ranks / default_position_embedding_ranks: the word
    # embeddings live on the first and last stage, the position embeddings on the first.
    out["embd"] = [[pp[0], pp[-1]] if len(pp) > 1 else [pp[0]] for pp in out["pp"]]
    out["pos_embd"] = [[pp[0]] for pp in out["pp"]]
    return out


def init_model_groups(
    layout: ParallelLayout, *, timeout_minutes: int = 30
) -> ProcessGroupCollection:
    """A collection for ``layout`` (tp, pp, cp) over every rank (collective over the world);
    ``parallel_state`` is left as it is. Raises if tp * pp * cp does not divide the world size.
    A rank outside every embedding group holds ``embd`` None, as in ``parallel_state``."""
    me = dist.get_rank()
    timeout = timedelta(minutes=timeout_minutes)
    return ProcessGroupCollection(
        **{
            name: _create(rank_lists, me, timeout)
            for name, rank_lists in group_ranks(layout, dist.get_world_size()).items()
        }
    )


def _create(rank_lists: list[list[int]], me: int, timeout: timedelta) -> dist.ProcessGroup | None:
    """Every rank creates every group (``new_group`` is collective); this rank's is kept."""
    found = None
    for members in rank_lists:
        group = dist.new_group(members, timeout=timeout)
        if me in members:
            found = group
    return found
