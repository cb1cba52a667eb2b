"""One distillation step under Megatron-Core: teacher pass, student forward/backward, optimizer.

Loss normalisation (METHOD.md): with ``N`` the number of supervised tokens in the *global*
batch (all microbatches, all data-parallel ranks; counted before the step and all-reduced),

    L_OPRD = (1 / |layers|) * sum_l sum_t (1 / N) * ||f(W h_s[l, t]) - f(h_t[phi(l), t])||^2 / d,

so every token weighs ``1 / N`` whatever the microbatch or data-parallel split. OPD terms are
token sums weighted by ``1 / N_opd`` (response tokens of the global batch) likewise. The
objective is ``loss_coef * L_OPRD`` (``oprd``), ``L_OPD`` (``opd-top1``/``opd-topk``) or
``L_OPD + mu * loss_coef * L_OPRD`` (``combined``).

Megatron runs with ``calculate_per_token_loss=True`` (no division by the microbatch count;
DDP sums gradients over data-parallel ranks) and a ``finalize_model_grads`` that applies no
token rescaling: the weights above already give the global mean. The student never runs its
output layer through Megatron: in OPRD-only mode nothing uses it, in OPD modes
:func:`oprd_mega.distill.opd.opd_loss` forms the logits in token chunks from its weight shard.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)

from oprd_mega.distill.batch import DistillMicrobatch, context_shard, local_rows, sequence_major
from oprd_mega.distill.opd import OPDOptions, opd_loss
from oprd_mega.distill.options import OptimizerOptions, StepOptions
from oprd_mega.distill.projection import PROJECTION_ATTR, SHARED_KEY, is_projection_param
from oprd_mega.distill.taps import StudentTaps, TapInputs
from oprd_mega.distill.teacher import (
    TeacherPlan,
    current_device,
    layer_stages,
    teacher_pass,
    without_output_layer,
)
from oprd_mega.distill.teacher_ahead import TeacherAhead
from oprd_mega.distill.teacher_layout import (
    TeacherPlacement,
    teacher_head_shard,
    teacher_pass_own_layout,
)
from oprd_mega.models.running import output_weight, unwrap
from oprd_mega.models.shapes import real_vocab_size

OPD_METRICS = ("pg_loss", "reward", "student_entropy", "teacher_entropy", "top16_overlap")


@dataclass
class StepResult:
    """Metrics of one step, identical on every rank."""

    loss: float
    oprd_loss: float
    cosine: float
    layer_loss: dict[int, float] = field(default_factory=dict)
    layer_cosine: dict[int, float] = field(default_factory=dict)
    opd: dict[str, float] = field(default_factory=dict)
    grad_norm: float | None = None
    supervised_tokens: int = 0
    opd_tokens: int = 0
    seconds: float = 0.0
    teacher_seconds: float = 0.0
    skipped: bool = False
    """The loss was not finite: no optimizer update was made."""


class _ZeroAnchor(torch.autograd.Function):
    """A zero scalar that depends on ``hidden`` (zero gradient): the last stage's output when
    only tapped layers carry losses."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.meta = (hidden.shape, hidden.dtype, hidden.device)
        return torch.zeros((), dtype=torch.float32, device=hidden.device)

    @staticmethod
    def backward(ctx, _grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        shape, dtype, device = ctx.meta
        return torch.zeros(shape, dtype=dtype, device=device)


def _finalize_grads(model_chunks: list, num_tokens=None, **kwargs) -> None:
    """Sum a shared projection's gradient over pipeline stages, then Megatron's finalisation
    without token rescaling (the loss is already a global token mean)."""
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        group = parallel_state.get_pipeline_model_parallel_group()
        for chunk in model_chunks:
            for name, param in chunk.named_parameters():
                if is_projection_param(name) and name.endswith(f"weights.{SHARED_KEY}"):
                    dist.all_reduce(param.main_grad, group=group)
    for chunk in model_chunks:
        if chunk.ddp_config.overlap_grad_reduce:
            _dispatch_waiting_buckets(chunk)
    kwargs.pop("pg_collection", None)
    finalize_model_grads(model_chunks, None, **kwargs)


def _dispatch_waiting_buckets(chunk: DistributedDataParallel) -> None:
    """Start the reduction of buckets still waiting for a gradient when backward is over.

    With ``overlap_grad_reduce`` Megatron dispatches a bucket once every parameter in it got
    its gradient in the last microbatch, as often as in the first step; parameters that got
    none there (the output layer in OPRD-only mode, a projection whose last microbatch had no
    supervised row) would leave their bucket waiting and ``finish_grad_sync`` would fail. Their
    gradients are complete, so they are marked ready now.
    """
    for group in chunk.bucket_groups:
        if group.grad_reduce_handle is not None and not group.is_first_batch:
            continue  # already dispatched (marking more ready would dispatch it twice)
        golden = group.golden_per_param_grad_ready_counts
        for param in group.params:
            for _ in range(golden.get(param, 1) - group.per_param_grad_ready_counts.get(param, 0)):
                group.register_grad_ready(param)
        if group.grad_reduce_handle is None and not group.is_first_batch:
            group.start_grad_sync()  # counts differ from the first step's: dispatch anyway


def wrap_student(
    model: torch.nn.Module,
    use_distributed_optimizer: bool = False,
    *,
    overlap_grad_reduce: bool = False,
    overlap_param_gather: bool = False,
) -> DistributedDataParallel:
    """Megatron DDP around the student chunk (projection attached first), set up for the step.

    ``overlap_grad_reduce``: each gradient bucket is reduced while backward still runs (the
    schedule holds reductions back until the last microbatch through ``no_sync``);
    ``overlap_param_gather`` (distributed optimizer only): the updated parameters are gathered
    asynchronously after the optimizer step.
    """
    if overlap_param_gather and not use_distributed_optimizer:
        raise ValueError(
            "training.overlap_param_gather needs optimizer.use_distributed_optimizer = true "
            "(only the distributed optimizer gathers parameters)"
        )
    shared = [n for n, _ in model.named_parameters() if n.endswith(f"weights.{SHARED_KEY}")]
    config = model.config
    if (
        overlap_grad_reduce
        and shared
        and (config.pipeline_model_parallel_size > 1 or config.recompute_granularity == "full")
    ):
        raise ValueError(
            "training.overlap_grad_reduce with a shared projection (distillation.projection."
            "per_layer = false) is not supported under parallel.pp > 1 (its gradient is summed "
            "over stages before the data-parallel reduction) nor with training.recompute."
            "granularity = 'full' (its gradient arrives once per checkpointed chunk, so "
            "Megatron cannot tell when it is complete)"
        )
    config.calculate_per_token_loss = True
    config.finalize_model_grads_func = _finalize_grads
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=overlap_grad_reduce,
        overlap_param_gather=overlap_param_gather,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    wrapped = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
    if overlap_grad_reduce:  # as Megatron-LM's training loop: no reduction before the last
        config.no_sync_func = wrapped.no_sync  # microbatch's backward; every pipeline stage
        # dispatches its buckets during its own last backward (no grad_sync_func: Megatron's
        # aligned mode would hold all stages but the first back to the end of the schedule)
    return wrapped


def build_optimizer(model: DistributedDataParallel, options: OptimizerOptions):
    """Megatron's AdamW over the student chunk (projection included).

    Megatron marks 1-D parameters and biases with ``wd_mult = 0`` but only its learning-rate
    scheduler applies the multipliers; they are applied here so the first step is right too.
    """
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    dtype = model.config.params_dtype
    config = OptimizerConfig(
        optimizer="adam",
        lr=options.lr,
        weight_decay=options.weight_decay,
        adam_beta1=options.betas[0],
        adam_beta2=options.betas[1],
        adam_eps=options.eps,
        clip_grad=options.clip_grad,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        params_dtype=dtype,
        use_distributed_optimizer=options.use_distributed_optimizer,
        overlap_param_gather=model.ddp_config.overlap_param_gather,
    )
    optimizer = get_megatron_optimizer(config, [model])
    for group in optimizer.param_groups:
        group["weight_decay"] = options.weight_decay * group.get("wd_mult", 1.0)
        group["lr"] = options.lr * group.get("lr_mult", 1.0)
    return optimizer


class DistillStep:
    """The step for one student chunk (DDP-wrapped) and one teacher chunk (same layout).

    ``pairs``: ``(student layer, teacher layer)`` for every tapped layer
    (:func:`oprd_mega.distill.layers.layer_pairs`); ``bridge``: teacher-side ``(P_T, mu_T)``
    per teacher layer with the bridge projection. ``teacher_placement``: the teacher was built
    in its own groups (``parallel.teacher``, its ``pg_collection``); its pass then runs there
    and routes the targets. The student runs in ``parallel_state``'s groups.
    """

    def __init__(
        self,
        student: DistributedDataParallel,
        teacher: torch.nn.Module,
        optimizer,
        pairs: list[tuple[int, int]],
        options: StepOptions,
        *,
        bridge: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
        teacher_placement: TeacherPlacement | None = None,
    ) -> None:
        if not pairs:
            raise ValueError("distillation.layers: no supervised layer")
        self.student, self.teacher, self.optimizer = student, teacher, optimizer
        self.pairs = list(pairs)
        self.options = options
        inner = unwrap(student)
        self.sequence_parallel = bool(inner.config.sequence_parallel)
        self.teacher_placement = teacher_placement
        if teacher_placement is not None and unwrap(teacher).config.sequence_parallel:
            raise ValueError("parallel.teacher: the teacher on its own layout runs without SP")
        if (
            teacher_placement is None
            and bool(unwrap(teacher).config.sequence_parallel) != self.sequence_parallel
        ):
            raise ValueError("teacher: sequence_parallel must match the student's")
        self.num_layers = int(inner.config.num_layers)
        projection = getattr(inner, PROJECTION_ATTR, None)
        self.taps = StudentTaps(
            inner,
            [student_layer for student_layer, _ in self.pairs],
            projection,
            options.kernel,
            scale=options.oprd_weight / len(self.pairs),
        )
        if bridge is not None:
            absent = sorted({t for _, t in self.pairs} - set(bridge))
            if absent:
                raise ValueError(
                    f"projection.bridge_path: no P_T/mu_T for teacher layer(s) {absent}"
                )
        teacher_stage = layer_stages(teacher)  # in the teacher's own pipeline
        missing = sorted({t for _, t in self.pairs} - set(teacher_stage))
        if missing and options.oprd_weight:
            raise ValueError(
                f"teacher: tapped teacher layer(s) {missing} are deeper than the teacher model "
                f"({len(teacher_stage)} layers)"
            )
        # OPD with the teacher on its own layout: its head, re-split at the student's TP, on
        # the student's last stage (the teacher is frozen: copied once)
        self.teacher_head = (
            teacher_head_shard(teacher, teacher_placement)
            if teacher_placement is not None and options.opd_kind is not None
            else None
        )
        self.plan = TeacherPlan(
            pairs=tuple(self.pairs) if options.oprd_weight else (),
            student_stage=layer_stages(student),
            teacher_stage=teacher_stage,
            sequence_parallel=self.sequence_parallel,
            target_dtype=options.target_dtype,
            bridge=bridge,
            opd=options.opd_kind is not None,
        )

    def _global_count(self, microbatches: list[DistillMicrobatch], name: str) -> int:
        count = torch.tensor(
            [float(getattr(batch, name).sum()) for batch in microbatches],
            dtype=torch.float64,
            device=current_device(),
        ).sum()
        dist.all_reduce(count, group=parallel_state.get_data_parallel_group())
        return int(count.item())

    def run(self, microbatches: list[DistillMicrobatch]) -> StepResult:
        """Teacher pass, student forward/backward, optimizer step; metrics from every stage."""
        if not microbatches:
            raise ValueError("step: no microbatch")
        shapes = {batch.shape for batch in microbatches}
        if len(shapes) > 1:  # Megatron's pipeline exchanges fixed-shape activations
            raise ValueError(
                f"step: microbatches must share one [batch, seq] shape (pad them), got {shapes}"
            )
        start = time.perf_counter()
        options = self.options
        n_sup = self._global_count(microbatches, "supervised")
        n_opd = self._global_count(microbatches, "predicts")
        whole = microbatches  # the teacher on its own layout runs whole sequences
        microbatches = [context_shard(batch) for batch in microbatches]  # this CP rank's share
        self.teacher.eval()
        teacher_start = time.perf_counter()
        # distillation.overlap_teacher where the layout allows (same layout, no pipeline)
        ahead = (
            TeacherAhead(self.teacher, microbatches, self.plan)
            if options.overlap_teacher
            and self.teacher_placement is None
            and parallel_state.get_pipeline_model_parallel_world_size() == 1
            else None
        )
        if ahead is not None:
            teacher_out = ahead.outputs  # filled microbatch by microbatch in forward_step
        elif self.teacher_placement is None:
            teacher_out = teacher_pass(self.teacher, microbatches, self.plan)
        else:
            teacher_out = teacher_pass_own_layout(
                self.teacher, whole, self.plan, self.teacher_placement
            )
        teacher_seconds = time.perf_counter() - teacher_start
        device = next(unwrap(self.student).parameters()).device
        self.taps.load(
            {
                batch.index: TapInputs(
                    rows=local_rows(batch.supervised, self.sequence_parallel).to(device),
                    targets=teacher_out.targets[batch.index],
                    token_weight=1.0 / max(n_sup, 1),
                )
                for batch in microbatches
            }
            if options.oprd_weight
            else {batch.index: None for batch in microbatches}  # type: ignore[misc]
        )
        opd_sums = torch.zeros(len(OPD_METRICS), dtype=torch.float64)
        teacher_weight = None
        if options.opd_kind and parallel_state.is_pipeline_last_stage():
            teacher_weight = (
                output_weight(self.teacher) if self.teacher_head is None else self.teacher_head
            )

        def forward_step(data_iterator, model):
            batch = next(data_iterator)
            if ahead is not None:
                ahead.ready(batch.index)
            self.taps.select(batch.index)
            try:
                with without_output_layer(model):
                    output = model(
                        batch.tokens.to(device),
                        None,
                        None,
                        packed_seq_params=batch.packed_seq_params(device),
                    )
            finally:
                self.taps.select(None)
            if ahead is not None:
                ahead.start_next(batch.index)

            def loss_func(output_tensor: torch.Tensor):
                if options.opd_kind is None:
                    loss = _ZeroAnchor.apply(output_tensor)
                else:
                    loss = self._opd(batch, output_tensor, teacher_out, teacher_weight, n_opd)
                    opd_sums.add_(self._last_opd)
                return loss, torch.tensor(0, dtype=torch.int), {}

            return output, loss_func

        self.student.train()
        self.student.zero_grad_buffer()
        self.optimizer.zero_grad()
        batch, seq = microbatches[0].shape
        get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(microbatches),
            model=[self.student],
            num_microbatches=len(microbatches),
            seq_length=seq,
            micro_batch_size=batch,
            forward_only=False,
        )
        result = self._metrics(opd_sums, n_sup, n_opd)
        if math.isfinite(result.loss):  # the same value on every rank: all skip or none
            _, grad_norm, _ = self.optimizer.step()
            result.grad_norm = None if grad_norm is None else float(grad_norm)
            if self.student.ddp_config.overlap_param_gather:
                # The weight sync reads the new weights right after the step, before any
                # forward would wait for the gather: complete it here.
                self.student.start_param_sync(force_sync=True)
        else:
            result.skipped = True
            self.student.zero_grad_buffer()
            self.optimizer.zero_grad()
        result.teacher_seconds = teacher_seconds + (ahead.seconds if ahead is not None else 0.0)
        result.seconds = time.perf_counter() - start
        return result

    def _opd(
        self,
        batch: DistillMicrobatch,
        hidden: torch.Tensor,
        teacher_out,
        teacher_weight: torch.Tensor,
        n_opd: int,
    ) -> torch.Tensor:
        """OPD loss of one microbatch on the last stage (vocabulary-parallel logits)."""
        if self.sequence_parallel:
            full = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True)
        elif parallel_state.get_tensor_model_parallel_world_size() > 1:
            full = copy_to_tensor_model_parallel_region(hidden)
        else:
            full = hidden
        rows = sequence_major(batch.predicts).nonzero().squeeze(1).to(full.device)
        student_rows = full.reshape(-1, full.shape[-1]).index_select(0, rows)
        labels = sequence_major(batch.labels).to(full.device).index_select(0, rows)
        token_weight = torch.full(
            (rows.numel(),), 1.0 / max(n_opd, 1), dtype=torch.float32, device=full.device
        )
        group = parallel_state.get_tensor_model_parallel_group()
        result = opd_loss(
            student_rows,
            output_weight(self.student),
            teacher_out.opd_hidden[batch.index].to(student_rows.dtype),
            teacher_weight,
            labels,
            token_weight,
            OPDOptions(
                kind=self.options.opd_kind,  # type: ignore[arg-type]
                k=self.options.top_k,
                chunk_tokens=self.options.opd_chunk_tokens,
                group=group if parallel_state.get_tensor_model_parallel_world_size() > 1 else None,
                vocab_size=real_vocab_size(self.student),
            ),
        )
        self._last_opd = torch.tensor(
            [float(result.loss.detach())]
            + [float(result.metrics[name]) for name in OPD_METRICS[1:]],
            dtype=torch.float64,
        )
        return result.loss

    def _metrics(self, opd_sums: torch.Tensor, n_sup: int, n_opd: int) -> StepResult:
        """Per-layer loss and cosine from every stage, OPD metrics from the last stage."""
        stats = self.taps.stats
        device = current_device()  # NCCL reduces device tensors only
        layers = torch.zeros(2, self.num_layers, dtype=torch.float64, device=device)
        opd_sums = opd_sums.to(device)
        for layer, value in stats.loss.items():
            layers[0, layer - 1] = float(value)
            layers[1, layer - 1] = float(stats.cosine[layer])
        data_and_context = parallel_state.get_data_parallel_group(with_context_parallel=True)
        dist.all_reduce(layers, group=data_and_context)  # CP ranks summed their own chunks
        if self.sequence_parallel:  # each TP rank summed its own sequence shard
            dist.all_reduce(layers, group=parallel_state.get_tensor_model_parallel_group())
        dist.all_reduce(opd_sums, group=data_and_context)
        if not parallel_state.is_pipeline_last_stage():
            opd_sums.zero_()
        stacked = torch.cat([layers.reshape(-1), opd_sums])
        dist.all_reduce(stacked, group=parallel_state.get_pipeline_model_parallel_group())
        layers = stacked[: layers.numel()].reshape(2, -1)
        opd_values = stacked[layers.numel() :]
        tapped = [student_layer for student_layer, _ in self.pairs]
        layer_loss = {layer: float(layers[0, layer - 1]) for layer in tapped}
        layer_cosine = {layer: float(layers[1, layer - 1]) for layer in tapped}
        oprd_loss = sum(layer_loss.values()) / len(tapped)
        opd = (
            {name: float(value) for name, value in zip(OPD_METRICS, opd_values, strict=True)}
            if self.options.opd_kind
            else {}
        )
        total = self.options.oprd_weight * oprd_loss if self.options.oprd_weight else 0.0
        if opd:
            total += opd["pg_loss"]
        return StepResult(
            loss=total,
            oprd_loss=oprd_loss if self.options.oprd_weight else 0.0,
            cosine=sum(layer_cosine.values()) / len(tapped) if self.options.oprd_weight else 0.0,
            layer_loss=layer_loss if self.options.oprd_weight else {},
            layer_cosine=layer_cosine if self.options.oprd_weight else {},
            opd=opd,
            supervised_tokens=n_sup,
            opd_tokens=n_opd,
        )
