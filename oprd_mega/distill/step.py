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
from oprd_mega.distill.projection import SHARED_KEY, is_projection_param, projection_of
from oprd_mega.distill.taps import StudentTaps, TapHead, TapInputs
from oprd_mega.distill.teacher import (
    TeacherOutputs,
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
    teachers: dict[str, TeacherResult] = field(default_factory=dict)
    """Each teacher's own share, by name. With several teachers the totals above are their
    weighted sums (``cosine``: the mean over their supervised tokens) and ``layer_loss`` /
    ``layer_cosine`` are left empty: per-layer values are per teacher."""


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


@dataclass
class StepTeacher:
    """One teacher of the step: its model (weights loaded), ``(student layer, teacher layer)``
    pairs, loss weight, the teacher-side bridge maps ``(P_T, mu_T)`` per teacher layer with the
    bridge projection, and its placement when it runs on a layout of its own (its
    ``pg_collection``; None: the student's groups). Its projection on the student is found by
    ``name`` (:func:`~oprd_mega.distill.projection.projection_of`)."""

    name: str
    model: torch.nn.Module
    pairs: list[tuple[int, int]]
    weight: float = 1.0
    bridge: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
    placement: TeacherPlacement | None = None


@dataclass
class TeacherResult:
    """One teacher's share of a step: its own (unweighted) losses and alignment."""

    loss: float = 0.0
    oprd_loss: float = 0.0
    cosine: float = 0.0
    layer_loss: dict[int, float] = field(default_factory=dict)
    layer_cosine: dict[int, float] = field(default_factory=dict)
    opd: dict[str, float] = field(default_factory=dict)
    supervised_tokens: int = 0
    opd_tokens: int = 0
    microbatches: int = 0
    seconds: float = 0.0


@dataclass
class _Teacher:
    """A teacher as the step runs it."""

    spec: StepTeacher
    plan: TeacherPlan
    head: torch.Tensor | None  # its output layer re-split at the student's TP (own layout, OPD)


class DistillStep:
    """The step for one student chunk (DDP-wrapped) and one or more teachers.

    Every teacher runs only on the microbatches routed to it (``DistillMicrobatch.teachers``;
    None: all teachers) and contributes its own token-mean losses times its weight:

        loss = sum_t weight_t * (oprd_weight * L_OPRD_t + L_OPD_t),

    each L_t normalised over teacher ``t``'s supervised tokens in the global batch. With one
    teacher of weight 1 this is the objective in the module docstring. A teacher with its own
    ``placement`` runs in its own groups and routes its targets; the student runs in
    ``parallel_state``'s groups.
    """

    def __init__(
        self,
        student: DistributedDataParallel,
        teachers: list[StepTeacher],
        optimizer,
        options: StepOptions,
    ) -> None:
        if not teachers:
            raise ValueError("step: no teacher")
        names = [t.name for t in teachers]
        if len(set(names)) != len(names):
            raise ValueError(f"step: teacher names must be distinct, got {names}")
        self.student, self.optimizer = student, optimizer
        self.options = options
        inner = unwrap(student)
        self.sequence_parallel = bool(inner.config.sequence_parallel)
        self.num_layers = int(inner.config.num_layers)
        student_stage = layer_stages(student)
        self.teachers: list[_Teacher] = []
        heads = []
        for spec in teachers:
            where = f"teachers[{spec.name}]" if len(teachers) > 1 else "teacher"
            if not spec.pairs:
                raise ValueError(f"{where}: distillation.layers: no supervised layer")
            config = unwrap(spec.model).config
            if spec.placement is not None and config.sequence_parallel:
                raise ValueError(f"{where}: the teacher on its own layout runs without SP")
            if spec.placement is None and bool(config.sequence_parallel) != self.sequence_parallel:
                raise ValueError(f"{where}: sequence_parallel must match the student's")
            if spec.bridge is not None:
                absent = sorted({t for _, t in spec.pairs} - set(spec.bridge))
                if absent:
                    raise ValueError(
                        f"{where}: projection.bridge_path: no P_T/mu_T for teacher layer(s) "
                        f"{absent}"
                    )
            teacher_stage = layer_stages(spec.model)  # in the teacher's own pipeline
            missing = sorted({t for _, t in spec.pairs} - set(teacher_stage))
            if missing and options.oprd_weight:
                raise ValueError(
                    f"{where}: tapped teacher layer(s) {missing} are deeper than the teacher "
                    f"model ({len(teacher_stage)} layers)"
                )
            # OPD with the teacher on its own layout: its head, re-split at the student's TP,
            # on the student's last stage (the teacher is frozen: copied once)
            head = (
                teacher_head_shard(spec.model, spec.placement)
                if spec.placement is not None and options.opd_kind is not None
                else None
            )
            plan = TeacherPlan(
                pairs=tuple(spec.pairs) if options.oprd_weight else (),
                student_stage=student_stage,
                teacher_stage=teacher_stage,
                sequence_parallel=self.sequence_parallel,
                target_dtype=options.target_dtype,
                bridge=spec.bridge,
                opd=options.opd_kind is not None,
            )
            self.teachers.append(_Teacher(spec, plan, head))
            heads.append(
                TapHead(
                    name=spec.name,
                    layers=tuple(student_layer for student_layer, _ in spec.pairs),
                    projection=projection_of(inner, spec.name if len(teachers) > 1 else None),
                    scale=options.oprd_weight * spec.weight / len(spec.pairs),
                )
            )
        self.taps = StudentTaps(inner, heads, options.kernel)

    def _counts(self, microbatches: list[DistillMicrobatch]) -> tuple[torch.Tensor, int]:
        """``[teachers, 3]``: each teacher's supervised tokens, OPD tokens and microbatches in
        the global batch; and the global batch's supervised tokens routed to any teacher."""
        teachers = len(self.teachers)
        counts = torch.zeros(teachers * 3 + 1, dtype=torch.float64, device=current_device())
        per_teacher = counts[:-1].view(teachers, 3)
        for batch in microbatches:
            if batch.teachers != ():
                counts[-1] += float(batch.supervised.sum())
            for n, teacher in enumerate(self.teachers):
                if batch.routed_to(teacher.spec.name):
                    per_teacher[n, 0] += float(batch.supervised.sum())
                    per_teacher[n, 1] += float(batch.predicts.sum())
                    per_teacher[n, 2] += 1
        dist.all_reduce(counts, group=parallel_state.get_data_parallel_group())
        counts = counts.cpu()
        return counts[:-1].view(teachers, 3), int(counts[-1])

    def run(self, microbatches: list[DistillMicrobatch]) -> StepResult:
        """Teacher passes, student forward/backward, optimizer step; metrics from every stage."""
        if not microbatches:
            raise ValueError("step: no microbatch")
        shapes = {batch.shape for batch in microbatches}
        if len(shapes) > 1:  # Megatron's pipeline exchanges fixed-shape activations
            raise ValueError(
                f"step: microbatches must share one [batch, seq] shape (pad them), got {shapes}"
            )
        start = time.perf_counter()
        options = self.options
        counts, supervised_any = self._counts(microbatches)
        whole = microbatches  # a teacher on its own layout runs whole sequences
        microbatches = [context_shard(batch) for batch in microbatches]  # this CP rank's share
        # distillation.overlap_teacher where the layout allows: every teacher on the student's
        # layout one microbatch ahead (on its routed ones), without a pipeline
        aheads: dict[int, TeacherAhead] = {}
        if options.overlap_teacher and parallel_state.get_pipeline_model_parallel_world_size() == 1:
            aheads = {
                n: TeacherAhead(t.spec.model, microbatches, t.plan, t.spec.name)
                for n, t in enumerate(self.teachers)
                if t.spec.placement is None
            }
        outputs, seconds = [], []
        for n, teacher in enumerate(self.teachers):
            teacher.spec.model.eval()
            teacher_start = time.perf_counter()
            name = teacher.spec.name
            if n in aheads:
                out = aheads[n].outputs  # filled microbatch by microbatch in forward_step
            elif teacher.spec.placement is None:
                routed = [batch for batch in microbatches if batch.routed_to(name)]
                out = (
                    teacher_pass(teacher.spec.model, routed, teacher.plan)
                    if routed
                    else TeacherOutputs({}, {})
                )
            else:  # collective over the world: every rank joins, routed microbatches or not
                routed = [batch for batch in whole if batch.routed_to(name)]
                out = teacher_pass_own_layout(
                    teacher.spec.model, routed, teacher.plan, teacher.spec.placement
                )
            outputs.append(out)
            seconds.append(time.perf_counter() - teacher_start)
        device = next(unwrap(self.student).parameters()).device
        inputs: dict[int, dict[str, TapInputs]] = {batch.index: {} for batch in microbatches}
        if options.oprd_weight:
            for n, teacher in enumerate(self.teachers):
                name = teacher.spec.name
                for batch in microbatches:
                    if batch.routed_to(name):
                        inputs[batch.index][name] = TapInputs(
                            rows=local_rows(batch.supervised, self.sequence_parallel).to(device),
                            targets=outputs[n].targets[batch.index],
                            token_weight=1.0 / max(float(counts[n, 0]), 1.0),
                        )
        self.taps.load(inputs)
        opd_sums = torch.zeros(len(self.teachers), len(OPD_METRICS), dtype=torch.float64)
        teacher_weights: list[torch.Tensor | None] = [None] * len(self.teachers)
        if options.opd_kind and parallel_state.is_pipeline_last_stage():
            teacher_weights = [
                output_weight(t.spec.model) if t.head is None else t.head for t in self.teachers
            ]

        def forward_step(data_iterator, model):
            batch = next(data_iterator)
            for ahead in aheads.values():
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
            for ahead in aheads.values():
                ahead.start_next(batch.index)

            def loss_func(output_tensor: torch.Tensor):
                routed = [n for n, t in enumerate(self.teachers) if batch.routed_to(t.spec.name)]
                if options.opd_kind is None or not routed:
                    loss = _ZeroAnchor.apply(output_tensor)
                else:
                    loss = 0.0
                    for n in routed:
                        term, sums = self._opd(
                            batch,
                            output_tensor,
                            outputs[n].opd_hidden[batch.index],
                            teacher_weights[n],
                            float(counts[n, 1]),
                        )
                        weight = self.teachers[n].spec.weight
                        loss = loss + (term if weight == 1.0 else weight * term)
                        opd_sums[n].add_(sums)
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
        result = self._metrics(opd_sums, counts, supervised_any)
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
        for n, ahead in aheads.items():
            seconds[n] += ahead.seconds
        for teacher, spent in zip(self.teachers, seconds, strict=True):
            result.teachers[teacher.spec.name].seconds = spent
        result.teacher_seconds = sum(seconds)
        result.seconds = time.perf_counter() - start
        return result

    def _opd(
        self,
        batch: DistillMicrobatch,
        hidden: torch.Tensor,
        teacher_hidden: torch.Tensor,
        teacher_weight: torch.Tensor,
        n_opd: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One teacher's OPD loss of one microbatch on the last stage (vocabulary-parallel
        logits) and its metric sums."""
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
            (rows.numel(),), 1.0 / max(n_opd, 1.0), dtype=torch.float32, device=full.device
        )
        group = parallel_state.get_tensor_model_parallel_group()
        result = opd_loss(
            student_rows,
            output_weight(self.student),
            teacher_hidden.to(student_rows.dtype),
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
        sums = torch.tensor(
            [float(result.loss.detach())]
            + [float(result.metrics[name]) for name in OPD_METRICS[1:]],
            dtype=torch.float64,
        )
        return result.loss, sums

    def _metrics(
        self, opd_sums: torch.Tensor, counts: torch.Tensor, supervised_any: int
    ) -> StepResult:
        """Per-teacher, per-layer loss and cosine from every stage, OPD metrics from the last
        stage; the totals weighted by the teachers' weights. ``counts`` and ``supervised_any``
        as :meth:`_counts` returns them."""
        stats = self.taps.stats
        device = current_device()  # NCCL reduces device tensors only
        count = len(self.teachers)
        layers = torch.zeros(count, 2, self.num_layers, dtype=torch.float64, device=device)
        opd_sums = opd_sums.to(device)
        for n, teacher in enumerate(self.teachers):
            for student_layer, _ in teacher.spec.pairs:
                key = (teacher.spec.name, student_layer)
                if key in stats.loss:
                    layers[n, 0, student_layer - 1] = float(stats.loss[key])
                    layers[n, 1, student_layer - 1] = float(stats.cosine[key])
        data_and_context = parallel_state.get_data_parallel_group(with_context_parallel=True)
        dist.all_reduce(layers, group=data_and_context)  # CP ranks summed their own chunks
        if self.sequence_parallel:  # each TP rank summed its own sequence shard
            dist.all_reduce(layers, group=parallel_state.get_tensor_model_parallel_group())
        dist.all_reduce(opd_sums, group=data_and_context)
        if not parallel_state.is_pipeline_last_stage():
            opd_sums.zero_()
        stacked = torch.cat([layers.reshape(-1), opd_sums.reshape(-1)])
        dist.all_reduce(stacked, group=parallel_state.get_pipeline_model_parallel_group())
        layers = stacked[: layers.numel()].reshape(count, 2, -1).cpu()
        opd_values = stacked[layers.numel() :].reshape(count, -1).cpu()
        options = self.options
        per_teacher: dict[str, TeacherResult] = {}
        for n, teacher in enumerate(self.teachers):
            tapped = [student_layer for student_layer, _ in teacher.spec.pairs]
            part = TeacherResult(
                supervised_tokens=int(counts[n, 0]),
                opd_tokens=int(counts[n, 1]),
                microbatches=int(counts[n, 2]),
            )
            if options.oprd_weight:
                part.layer_loss = {layer: float(layers[n, 0, layer - 1]) for layer in tapped}
                part.layer_cosine = {layer: float(layers[n, 1, layer - 1]) for layer in tapped}
                part.oprd_loss = sum(part.layer_loss.values()) / len(tapped)
                part.cosine = sum(part.layer_cosine.values()) / len(tapped)
                part.loss = options.oprd_weight * part.oprd_loss
            if options.opd_kind:
                part.opd = {
                    name: float(value)
                    for name, value in zip(OPD_METRICS, opd_values[n], strict=True)
                }
                part.loss += part.opd["pg_loss"]
            per_teacher[teacher.spec.name] = part
        weights = {t.spec.name: t.spec.weight for t in self.teachers}

        def weighted(values: dict[str, float]) -> float:
            return sum(weights[name] * value for name, value in values.items())

        if count == 1:
            only = next(iter(per_teacher.values()))
            return StepResult(
                loss=weighted({name: p.loss for name, p in per_teacher.items()}),
                oprd_loss=only.oprd_loss,
                cosine=only.cosine,
                layer_loss=dict(only.layer_loss),
                layer_cosine=dict(only.layer_cosine),
                opd=dict(only.opd),
                supervised_tokens=only.supervised_tokens,
                opd_tokens=only.opd_tokens,
                teachers=per_teacher,
            )
        supervised = sum(p.supervised_tokens for p in per_teacher.values())
        opd_names = OPD_METRICS if options.opd_kind else ()
        return StepResult(
            loss=weighted({name: p.loss for name, p in per_teacher.items()}),
            oprd_loss=weighted({name: p.oprd_loss for name, p in per_teacher.items()}),
            # the mean over every teacher's supervised tokens
            cosine=sum(p.cosine * p.supervised_tokens for p in per_teacher.values())
            / max(supervised, 1),
            opd={
                metric: weighted({name: p.opd[metric] for name, p in per_teacher.items()})
                for metric in opd_names
            },
            supervised_tokens=supervised_any,
            opd_tokens=sum(p.opd_tokens for p in per_teacher.values()),
            teachers=per_teacher,
        )
