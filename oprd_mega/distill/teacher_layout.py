"""The teacher on its own layout (``parallel.teacher``): its replicas share the step's work and
send each target to the student ranks that own the paired rows.

The student's data-parallel ranks each hold their own microbatches; the teacher's replicas
(its data-parallel ranks, each a TP x PP group of its own) do not line up with them. So:

1. every student replica's microbatches are shared with every rank (one all-gather of the
   token ids and masks, from the student's TP0/PP0 rank of each replica);
2. the step's microbatches, ordered by (student DP rank, index), are dealt round robin to the
   teacher replicas: unit ``k`` runs on teacher replica ``k % teacher_dp``, in the teacher's
   own process groups (the ``pg_collection`` it was built with,
   :func:`~oprd_mega.parallel.model_groups.init_model_groups`);
3. each tapped teacher layer's supervised rows (whole rows: the teacher runs without sequence
   parallelism) go point to point from the teacher's TP0 rank on the stage owning that layer
   to every student rank of the microbatch's DP rank on the stage owning the paired student
   layer; each student rank keeps the rows of its context-parallel chunks (the teacher runs
   whole sequences) and, under sequence parallelism, of its sequence shard;
4. with an OPD term, the teacher's final-norm states at the OPD rows go from its last stage to
   every student rank of the microbatch's DP rank on the student's last stage, where the
   student forms the teacher's logits with a copy of the teacher's head re-split at the
   student's TP (:func:`teacher_head_shard`, made once: the teacher is frozen).

All ranks walk the same (unit, pair) order, so sends and receives between two ranks match.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core.process_groups_config import ProcessGroupCollection

from oprd_mega.distill.batch import DistillMicrobatch, context_shard, sequence_major
from oprd_mega.distill.teacher import TeacherOutputs, TeacherPlan, current_device, run_teacher
from oprd_mega.models.running import output_weight, unwrap
from oprd_mega.parallel.context import context_positions
from oprd_mega.parallel.model_groups import groups_of


@dataclass(frozen=True)
class Coordinates:
    """One rank's (data-parallel, pipeline, tensor-parallel) ranks in one layout."""

    dp: int
    pp: int
    tp: int

    @staticmethod
    def of(groups: ProcessGroupCollection) -> Coordinates:
        """This rank's coordinates in the layout of ``groups``."""
        return Coordinates(groups.dp.rank(), groups.pp.rank(), groups.tp.rank())


@dataclass(frozen=True)
class TeacherPlacement:
    """Where every global rank sits in the student's and in the teacher's layout, and the
    student's own groups on this rank (where each student rank keeps its rows)."""

    student_groups: ProcessGroupCollection
    student: tuple[Coordinates, ...]
    teacher: tuple[Coordinates, ...]
    teacher_dp: int

    @staticmethod
    def gather(student: torch.nn.Module, teacher: torch.nn.Module) -> TeacherPlacement:
        """From the process groups each model was built with (collective over the world)."""
        student_groups, teacher_groups = groups_of(student), groups_of(teacher)
        mine = (Coordinates.of(student_groups), Coordinates.of(teacher_groups))
        gathered: list[tuple[Coordinates, Coordinates] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        pairs = [pair for pair in gathered if pair is not None]
        return TeacherPlacement(
            student_groups=student_groups,
            student=tuple(s for s, _ in pairs),
            teacher=tuple(t for _, t in pairs),
            teacher_dp=teacher_groups.dp.size(),
        )

    def teacher_rank(self, replica: int, stage: int, tp: int = 0) -> int:
        """The global rank of teacher replica ``replica``'s TP rank ``tp`` on pipeline
        ``stage``."""
        return self.teacher.index(Coordinates(replica, stage, tp))

    def last_stages(self) -> tuple[int, int]:
        """The last pipeline stage of the teacher's layout and of the student's."""
        return max(c.pp for c in self.teacher), max(c.pp for c in self.student)

    def student_ranks(self, dp: int, stage: int) -> list[int]:
        """Every global rank of student replica ``dp`` on pipeline ``stage`` (all TP ranks)."""
        return [rank for rank, c in enumerate(self.student) if (c.dp, c.pp) == (dp, stage)]


def teacher_pass_own_layout(
    teacher: torch.nn.Module,
    microbatches: list[DistillMicrobatch],
    plan: TeacherPlan,
    placement: TeacherPlacement,
) -> TeacherOutputs:
    """The teacher pass when the teacher has its own layout (collective over the world).

    ``microbatches`` are this rank's whole ones (before :func:`context_shard`): the teacher
    runs whole sequences and each rank keeps its context chunks' rows of what it receives.
    ``plan.teacher_stage`` is in the teacher's pipeline, ``plan.student_stage`` in the
    student's; the targets are keyed like :func:`~oprd_mega.distill.teacher.teacher_pass`'s.
    """
    me = dist.get_rank()
    units = _step_units(microbatches, placement)
    replica = placement.teacher[me].dp
    mine = [
        dataclasses.replace(batch, index=k)
        for k, (_, batch) in enumerate(units)
        if k % placement.teacher_dp == replica
    ]
    teacher_plan = dataclasses.replace(plan, sequence_parallel=False)
    kept: dict[tuple[int, int], torch.Tensor] = {}
    by_shape: dict[tuple[int, int], list[DistillMicrobatch]] = defaultdict(list)
    for batch in mine:  # Megatron's pipeline exchanges fixed-shape activations
        by_shape[batch.shape].append(batch)
    opd_kept: dict[int, torch.Tensor] = {}
    for batches in by_shape.values():  # in the teacher's own groups (its pg_collection)
        rows, states = run_teacher(teacher, batches, teacher_plan)
        kept.update(rows)
        opd_kept.update(states)
    hidden = int(unwrap(teacher).config.hidden_size)
    dtype = torch.float32 if plan.bridge is not None else plan.target_dtype
    targets: dict[int, dict[int, torch.Tensor]] = {batch.index: {} for batch in microbatches}
    requests = []
    for k, (dp, batch) in enumerate(units):
        count = int(batch.supervised.sum())
        for student_layer, teacher_layer in plan.pairs:
            source = placement.teacher_rank(
                k % placement.teacher_dp, plan.teacher_stage[teacher_layer]
            )
            destinations = placement.student_ranks(dp, plan.student_stage[student_layer])
            if me == source:
                tensor = kept[(k, teacher_layer)].contiguous()
                for destination in destinations:
                    if destination == me:
                        targets[batch.index][student_layer] = tensor
                    else:
                        requests.append(dist.isend(tensor, dst=destination))
            elif me in destinations:
                buffer = torch.empty(
                    count,
                    plan.target_width(teacher_layer, hidden),
                    dtype=dtype,
                    device=current_device(),
                )
                requests.append(dist.irecv(buffer, src=source))
                targets[batch.index][student_layer] = buffer
    opd_hidden: dict[int, torch.Tensor] = {}
    if plan.opd:  # final-norm states at the OPD rows: last teacher stage -> last student stage
        teacher_last, student_last = placement.last_stages()
        for k, (dp, batch) in enumerate(units):
            source = placement.teacher_rank(k % placement.teacher_dp, teacher_last)
            destinations = placement.student_ranks(dp, student_last)
            if me == source:
                tensor = opd_kept[k].contiguous()
                for destination in destinations:
                    if destination == me:
                        opd_hidden[batch.index] = tensor
                    else:
                        requests.append(dist.isend(tensor, dst=destination))
            elif me in destinations:
                count = int(batch.predicts.sum())
                buffer = torch.empty(
                    count, hidden, dtype=plan.target_dtype, device=current_device()
                )
                requests.append(dist.irecv(buffer, src=source))
                opd_hidden[batch.index] = buffer
    for request in requests:
        request.wait()
    cp_group, tp_group = placement.student_groups.cp, placement.student_groups.tp
    cp = cp_group.size()
    for batch in microbatches:  # whole rows -> this rank's context chunks and sequence shard
        keep = None
        if cp > 1:
            keep = _context_rows(batch.supervised, batch.cu_seqlens, cp_group)
            if batch.index in opd_hidden:
                states = opd_hidden[batch.index]
                chosen = _context_rows(batch.predicts, batch.cu_seqlens, cp_group)
                opd_hidden[batch.index] = states[chosen.to(states.device)]
        if plan.sequence_parallel:
            shard = context_shard(batch, cp, cp_group.rank()).supervised
            shard = _shard_of_rows(shard, tp_group).nonzero().squeeze(1)
            keep = shard if keep is None else keep[shard]
        if keep is not None:
            for layer, rows in targets[batch.index].items():
                targets[batch.index][layer] = rows[keep.to(rows.device)]
    return TeacherOutputs(targets=targets, opd_hidden=opd_hidden)


def _context_rows(
    mask: torch.Tensor, cu_seqlens: torch.Tensor | None, cp_group: dist.ProcessGroup
) -> torch.Tensor:
    """Indices into a whole microbatch's rows for ``mask`` (sequence-major) of the rows this
    rank holds in the student's context-parallel group ``cp_group``, in the order of its share
    (:func:`context_shard`)."""
    batch, seq = mask.shape
    bounds = [0, seq] if cu_seqlens is None else cu_seqlens.tolist()
    positions = context_positions(bounds, cp_group.size(), cp_group.rank())
    flat_mask = sequence_major(mask)
    row_of = torch.cumsum(flat_mask.long(), 0) - 1  # whole row index of each masked slot
    slots = (positions[:, None] * batch + torch.arange(batch)[None, :]).reshape(-1)
    return row_of[slots[flat_mask[slots]]]


def teacher_head_shard(
    teacher: torch.nn.Module, placement: TeacherPlacement
) -> torch.Tensor | None:
    """The teacher's output-layer rows ``[vocab / student tp, h_T]`` that this rank's student
    TP rank owns, on the student's last pipeline stage (None elsewhere), for OPD's
    vocabulary-parallel logits at the student's TP (collective over the world).

    Teacher replica 0's last-stage TP ranks send the overlapping row ranges of their shards;
    the padded vocabulary is the same at every TP size, so the shards tile the same rows.
    """
    me = dist.get_rank()
    inner = unwrap(teacher)
    vocab, hidden = int(inner.vocab_size), int(inner.config.hidden_size)
    teacher_tp = 1 + max(c.tp for c in placement.teacher)
    student_tp = 1 + max(c.tp for c in placement.student)
    if vocab % teacher_tp or vocab % student_tp:
        raise ValueError(
            f"parallel.teacher: the padded vocabulary ({vocab}) must split evenly over the "
            f"teacher's tp ({teacher_tp}) and the student's ({student_tp})"
        )
    teacher_rows, student_rows = vocab // teacher_tp, vocab // student_tp
    teacher_last, student_last = placement.last_stages()
    local = None
    if placement.teacher[me].pp == teacher_last and placement.teacher[me].dp == 0:
        local = output_weight(teacher).detach()
    dtype = inner.config.params_dtype
    shard = None
    requests, pieces = [], []
    for destination, student in enumerate(placement.student):
        if student.pp != student_last:
            continue
        low, high = student.tp * student_rows, (student.tp + 1) * student_rows
        if destination == me:
            shard = torch.empty(student_rows, hidden, dtype=dtype, device=current_device())
        for j in range(teacher_tp):
            start, stop = max(low, j * teacher_rows), min(high, (j + 1) * teacher_rows)
            if start >= stop:
                continue
            source = placement.teacher_rank(0, teacher_last, j)
            if source == me:
                rows = local[start - j * teacher_rows : stop - j * teacher_rows]  # type: ignore[index]
                if destination == me:
                    shard[start - low : stop - low] = rows  # type: ignore[index]
                else:
                    pieces.append(rows)
                    requests.append(dist.isend(rows, dst=destination))
            elif destination == me:
                buffer = torch.empty(stop - start, hidden, dtype=dtype, device=current_device())
                requests.append(dist.irecv(buffer, src=source))
                pieces.append((start - low, buffer))
    for request in requests:
        request.wait()
    for piece in pieces:
        if isinstance(piece, tuple):
            offset, buffer = piece
            shard[offset : offset + buffer.shape[0]] = buffer  # type: ignore[index]
    return shard


def _step_units(
    microbatches: list[DistillMicrobatch], placement: TeacherPlacement
) -> list[tuple[int, DistillMicrobatch]]:
    """Every student replica's microbatches as ``(student DP rank, microbatch)``, ordered."""
    me = dist.get_rank()
    here = placement.student[me]
    shared = microbatches if (here.pp, here.tp) == (0, 0) else None
    gathered: list[list[DistillMicrobatch] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, shared)
    by_dp = {
        placement.student[rank].dp: batches
        for rank, batches in enumerate(gathered)
        if batches is not None
    }
    return [(dp, batch) for dp in sorted(by_dp) for batch in by_dp[dp]]


def _shard_of_rows(supervised: torch.Tensor, tp_group: dist.ProcessGroup) -> torch.Tensor:
    """Which of a microbatch's supervised rows (sequence-major) fall in this TP rank's sequence
    shard under the student's sequence parallelism (``tp_group``: the student's): a boolean mask
    over those rows."""
    tp, rank = tp_group.size(), tp_group.rank()
    batch, seq = supervised.shape
    positions = sequence_major(supervised).nonzero().squeeze(1)
    shard = (seq // tp) * batch
    return (positions >= rank * shard) & (positions < (rank + 1) * shard)
