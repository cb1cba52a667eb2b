"""The teacher pass: forward only, supervised rows of the tapped layers, delivered by stage.

The teacher runs through Megatron's forward-only schedule in its own process groups (the
``pg_collection`` it was built with: the student's layout here, its own with
:mod:`oprd_mega.distill.teacher_layout`). For OPRD alone it is the truncated model (no final
norm, no output layer: :func:`oprd_mega.models.build_truncated_model` up to the deepest tapped
teacher layer).
For OPD it is the full model, run without its output layer: the final-norm states at the OPD
positions are kept and the student's step forms the logits chunk by chunk with the teacher's
output-layer shard.

Each tap keeps only this rank's supervised rows (its sequence shard under sequence
parallelism) in ``target_dtype`` (bf16 by default), or the r-dim bridge projection
``P_T (h - mu_T)``. Student and teacher split their layers over pipeline stages differently
when depths differ; targets are sent point to point within the pipeline group to the stage
that owns the paired student layer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

from oprd_kernels import bridge_project
from oprd_mega.distill.batch import DistillMicrobatch, local_rows, sequence_major
from oprd_mega.models.running import forward_only, layer_hooks, unwrap
from oprd_mega.parallel.model_groups import groups_of, is_last_stage


@contextlib.contextmanager
def without_output_layer(model: torch.nn.Module) -> Iterator[None]:
    """Run a ``GPTModel`` forward that stops after the decoder (final norm, no logits)."""
    inner = unwrap(model)
    saved = inner.post_process
    inner.post_process = False
    try:
        yield
    finally:
        inner.post_process = saved


def layer_stages(model: torch.nn.Module) -> dict[int, int]:
    """Global layer number -> pipeline rank that owns it, in the model's own pipeline
    (collective over its pipeline group)."""
    mine = [layer.layer_number for layer in unwrap(model).decoder.layers]
    group = groups_of(model).pp
    size = group.size()
    if size == 1:
        return dict.fromkeys(mine, 0)
    gathered: list[list[int]] = [[] for _ in range(size)]
    dist.all_gather_object(gathered, mine, group=group)
    return {layer: stage for stage, layers in enumerate(gathered) for layer in layers}


@dataclass(frozen=True)
class TeacherPlan:
    """Which teacher layer feeds which student layer, where both live, what is shipped."""

    pairs: tuple[tuple[int, int], ...]  # (student layer, teacher layer)
    student_stage: dict[int, int]
    teacher_stage: dict[int, int]
    sequence_parallel: bool
    target_dtype: torch.dtype = torch.bfloat16
    bridge: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None  # layer -> (P_T, mu_T)
    opd: bool = False

    def target_width(self, teacher_layer: int, hidden: int) -> int:
        """d_T, or r with the bridge."""
        return hidden if self.bridge is None else int(self.bridge[teacher_layer][0].shape[0])


@dataclass
class TeacherOutputs:
    """Per microbatch index: student layer -> targets ``[rows, d]`` on this rank's stage, and
    the final-norm teacher states ``[opd rows, h_T]`` at the OPD positions (last stage only)."""

    targets: dict[int, dict[int, torch.Tensor]]
    opd_hidden: dict[int, torch.Tensor]


def teacher_pass(
    teacher: torch.nn.Module, microbatches: list[DistillMicrobatch], plan: TeacherPlan
) -> TeacherOutputs:
    """Run the teacher over ``microbatches`` and deliver the targets (collective over PP)."""
    kept, opd_hidden = run_teacher(teacher, microbatches, plan)
    targets = _deliver(kept, microbatches, plan, teacher)
    return TeacherOutputs(targets=targets, opd_hidden=opd_hidden)


def run_teacher(
    teacher: torch.nn.Module, microbatches: list[DistillMicrobatch], plan: TeacherPlan
) -> tuple[dict[tuple[int, int], torch.Tensor], dict[int, torch.Tensor]]:
    """The teacher's forward over ``microbatches`` (collective over its own model-parallel
    groups, ``teacher.pg_collection``): ``(microbatch index, teacher layer) -> rows`` kept on the
    stage owning that layer, and the OPD states per microbatch index (last stage)."""
    inner = unwrap(teacher)
    groups = groups_of(teacher)
    if not plan.opd and getattr(inner, "output_layer", None) is not None:
        raise ValueError(
            "teacher: OPRD alone needs the truncated teacher (build_truncated_model): this one "
            "has an output layer"
        )
    if plan.opd and not inner.post_process and is_last_stage(groups):
        raise ValueError("teacher: OPD needs the teacher's final norm and output layer")
    tapped = {teacher_layer for _, teacher_layer in plan.pairs}
    kept: dict[tuple[int, int], torch.Tensor] = {}
    opd_hidden: dict[int, torch.Tensor] = {}
    current: list[DistillMicrobatch] = []

    def keep(module: torch.nn.Module, _inputs: tuple, output) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        batch = current[-1]
        rows = local_rows(batch.supervised, plan.sequence_parallel, groups.tp).to(hidden.device)
        selected = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)
        layer = module.layer_number
        if plan.bridge is not None:
            projection, mean = plan.bridge[layer]
            selected = bridge_project(
                selected,
                projection.to(selected.device),
                mean.to(selected.device),
                out_dtype=torch.float32,
            )
        else:
            selected = selected.to(plan.target_dtype)
        kept[(batch.index, layer)] = selected

    def forward(model: torch.nn.Module, batch: DistillMicrobatch) -> torch.Tensor:
        current.append(batch)
        with without_output_layer(model):
            device = _device(model)
            return model(
                batch.tokens.to(device),
                None,
                None,
                packed_seq_params=batch.packed_seq_params(device),
            )

    def outputs(batch: DistillMicrobatch, output_tensor: torch.Tensor) -> dict:
        if plan.opd:
            full = output_tensor
            if plan.sequence_parallel:
                full = gather_from_sequence_parallel_region(
                    full, tensor_parallel_output_grad=False, group=groups.tp
                )
            rows = sequence_major(batch.predicts).nonzero().squeeze(1).to(full.device)
            opd_hidden[batch.index] = (
                full.reshape(-1, full.shape[-1]).index_select(0, rows).to(plan.target_dtype)
            )
        return {}

    batch, seq = microbatches[0].shape
    with layer_hooks(teacher, keep, tapped):
        forward_only(
            teacher,
            microbatches,
            seq_length=seq,
            micro_batch_size=batch,
            forward=forward,
            outputs=outputs,
        )
    return kept, opd_hidden


def _device(model: torch.nn.Module) -> torch.device:
    return next(unwrap(model).parameters()).device


def _deliver(
    kept: dict[tuple[int, int], torch.Tensor],
    microbatches: list[DistillMicrobatch],
    plan: TeacherPlan,
    teacher: torch.nn.Module,
) -> dict[int, dict[int, torch.Tensor]]:
    """Move each teacher layer's rows to the stage of its student layer (same TP/DP rank: the
    teacher shares the student's layout here, so its pipeline group is the student's)."""
    hidden = int(unwrap(teacher).config.hidden_size)
    groups = groups_of(teacher)
    group = groups.pp
    stage = group.rank()
    out: dict[int, dict[int, torch.Tensor]] = {batch.index: {} for batch in microbatches}
    requests = []
    for batch in microbatches:
        count = int(local_rows(batch.supervised, plan.sequence_parallel, groups.tp).numel())
        for student_layer, teacher_layer in plan.pairs:
            source = plan.teacher_stage[teacher_layer]
            destination = plan.student_stage[student_layer]
            if stage == source == destination:
                out[batch.index][student_layer] = kept[(batch.index, teacher_layer)]
            elif stage == source:
                tensor = kept[(batch.index, teacher_layer)].contiguous()
                peer = dist.get_global_rank(group, destination)
                requests.append(dist.isend(tensor, dst=peer, group=group))
            elif stage == destination:
                dtype = torch.float32 if plan.bridge is not None else plan.target_dtype
                buffer = torch.empty(
                    count,
                    plan.target_width(teacher_layer, hidden),
                    dtype=dtype,
                    device=current_device(),
                )
                peer = dist.get_global_rank(group, source)
                requests.append(dist.irecv(buffer, src=peer, group=group))
                out[batch.index][student_layer] = buffer
    for request in requests:
        request.wait()
    return out


def current_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
