"""The on-policy training loop: rollouts -> schedule -> teacher pass + student step -> optimizer
-> weight sync (checked) -> metrics -> evaluation -> checkpoint. With ``rollout.max_staleness``
above 0 the rollouts of the coming steps generate while a step trains
(:mod:`oprd_mega.train.rollout_pipeline`).

Every rank runs :class:`Trainer`; rank 0 also owns the rollout servers, the prompts, the
evaluation and the metrics files, and shares what the other ranks need (the step's samples,
errors) by broadcast, so a failure on rank 0 stops every rank with the same message.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.optimizer import distrib_optimizer
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from oprd_mega.bridge.loaded import check_bridge_against
from oprd_mega.config import (
    ConfigError,
    TrainConfig,
    check_paths,
    config_diff,
    data_parallel_size,
    dump_config,
)
from oprd_mega.config.against_models import check_all_models
from oprd_mega.config.model_files import check_model_files, model_args
from oprd_mega.convert.gather import gather_hf_weights
from oprd_mega.convert.hf_io import HFCheckpointReader, write_hf_directory
from oprd_mega.convert.mcore_io import load_hf_weights
from oprd_mega.data.microbatches import StepSample, model_dims, plan_step, rank_microbatches
from oprd_mega.data.prompts import load_prompts
from oprd_mega.data.routing import PromptRouter, check_routes
from oprd_mega.data.scheduler import CostModel
from oprd_mega.distill.build import TeacherSetup, build_step, build_teacher
from oprd_mega.distill.layers import teacher_depth
from oprd_mega.models import build_gpt_model
from oprd_mega.models.builder import resolve_dtype
from oprd_mega.models.shapes import sequence_multiple
from oprd_mega.models.specs import resolve_use_te
from oprd_mega.parallel import init_distributed, on_rank0
from oprd_mega.parallel.model_groups import init_model_groups
from oprd_mega.rollout.client import RolloutError
from oprd_mega.rollout.megatron_sync import sync_model_weights
from oprd_mega.rollout.weight_sync import WeightSyncError
from oprd_mega.train.checkpoint import (
    TrainerState,
    check_fits,
    check_fresh_start,
    find_latest,
    load_newest_intact,
    resume_candidates,
    save_checkpoint,
    saved_config,
)
from oprd_mega.train.evaluation import describe_eval, evaluation_sets, load_eval_set, score
from oprd_mega.train.logs import Progress, StepLog, ensure_logging, logger
from oprd_mega.train.lr_schedule import learning_rate, set_learning_rate
from oprd_mega.train.metrics import (
    MetricsWriter,
    StepTimer,
    objective_records,
    peak_memory_mib,
    teacher_records,
)
from oprd_mega.train.prompt_stream import PromptStream
from oprd_mega.train.rollout_pipeline import RolloutPipeline
from oprd_mega.train.rollouts import RolloutService


class TrainingError(RuntimeError):
    """The run cannot go on; the message says why and where (step, server, file)."""


class ServersLostError(TrainingError):
    """The rollout servers stopped answering."""


def say(message: str) -> None:
    """An INFO event of rank 0 (the ``oprd_mega`` logger: timestamp, level, message)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        logger.info(message)


def _transformer_impls(config: TrainConfig) -> dict[str, bool]:
    """Whether the student and each teacher (by name) build Transformer Engine layers (checked
    before any server)."""
    sections = [("student", "student.transformer_impl", config.student)]
    sections += [(e.name, e.key("transformer_impl"), e.model) for e in config.teacher_list]
    use_te = {}
    for role, key, section in sections:
        try:
            use_te[role] = resolve_use_te(section.transformer_impl, key)
        except ValueError as error:
            raise ConfigError([str(error)]) from error
    return use_te


def shared(producer: Callable[[], Any], what: str) -> Any:
    """Run ``producer`` on rank 0 and give its value to every rank; an exception there becomes
    the same :class:`TrainingError` on every rank (``what`` says which part failed)."""

    def outcome() -> tuple[str, Any]:
        try:
            return "ok", producer()
        except RolloutError as exc:
            return "lost", f"{what}: {exc}"
        except Exception as exc:
            return "error", f"{what}: {exc}"

    kind, value = on_rank0(outcome, what)
    if kind == "ok":
        return value
    error = ServersLostError(value) if kind == "lost" else TrainingError(value)
    error.shared = True  # every rank raises it: rank 0 reports it
    raise error


@dataclass
class EvalResult:
    """Held-out accuracy at one step."""

    step: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainSummary:
    """What a finished run reports (rank 0 has the evaluations)."""

    steps_run: int
    final_step: int
    evaluations: list[EvalResult]
    checkpoint: Path | None
    skipped_steps: int
    seconds: float


class Trainer:
    """One OPRD (or OPD) training run; build it on every rank, then :meth:`run`."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.dp_size = data_parallel_size(config, self.world_size)
        self.loop = asyncio.new_event_loop()
        self.rollouts: Any = None
        self.pipeline: RolloutPipeline | None = None  # rank 0
        self.idle_mark = 0.0  # the servers' idle seconds at the last step's end (rank 0)
        self.metrics: Any = None
        self.progress: Any = None
        self.evaluations: list[EvalResult] = []
        self.step_log = StepLog(config.schedule.steps)
        self.restarts = 0
        self.last_checkpoint: Path | None = None

    # ------------------------------------------------------------------ set-up

    def setup(self) -> None:
        """Check inputs, start the servers, build models and optimizer, resume if asked."""
        config = self.config
        self.student_args = model_args(config.student)
        self.teacher_entries = config.teacher_list
        self.teacher_args = [model_args(entry.model) for entry in self.teacher_entries]
        self.pairs = check_all_models(config, self.student_args, self.teacher_args)
        self.several = len(self.teacher_entries) > 1
        self.use_te = _transformer_impls(config)
        if config.optimizer.use_distributed_optimizer:
            _require_apex_or_te()
        self.bridges: list[Any] = []
        for entry, t_args, pairs in zip(
            self.teacher_entries, self.teacher_args, self.pairs, strict=True
        ):
            bridge = None
            if config.distillation.uses_oprd and entry.projection.mode == "bridge":
                try:  # a bridge built for other models fails here, before any server starts
                    bridge = check_bridge_against(
                        entry.projection.bridge_path,
                        self.student_args,
                        t_args,
                        pairs,
                        where=entry.key("projection.bridge_path"),
                    )
                except ValueError as exc:
                    raise TrainingError(str(exc)) from exc
            self.bridges.append(bridge)
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.cost = self._cost_model()  # fixed for the run: built once, not per step
        self.pad_id = _pad_id(config.student.path)
        self.resume_from = self._find_resume()
        export = config.checkpoint.export_hf
        if export is not None and Path(export).exists():  # found now, not after training
            raise TrainingError(f"checkpoint.export_hf = {export!r} exists; choose a new directory")
        self.prompts, self.eval_prompts, self.tokenizer = None, None, None
        # Servers first: an unreachable one stops the run before any model is built.
        shared(self._start_rollouts, "rollout servers")
        shared(self._load_prompts, "prompts")
        self._build_models()
        self.start_step = 0
        if self.resume_from is not None:
            self._resume(self.resume_from)
        # Versions must be unique per server lifetime and sync directory, also across restarts.
        self.run_id = shared(lambda: secrets.token_hex(3), "run id")
        self.weight_version = self._version(self.start_step)
        self.version_step = self.start_step  # the step number in weight_version
        if self.rank == 0:
            self._open_metrics()
            dump_config(config, Path(config.metrics.dir) / "config.yaml")

    def _find_resume(self) -> Path | None:
        option = self.config.checkpoint.resume
        if option == "never":
            check_fresh_start(self.config.checkpoint.dir)
            return None
        found = find_latest(self.config.checkpoint.dir)
        if found is None and option == "always":
            raise TrainingError(
                f"checkpoint.resume = 'always': no checkpoint in {self.config.checkpoint.dir}"
            )
        return found

    def _start_rollouts(self) -> None:
        self.rollouts = RolloutService(self.config, self.loop)
        say(f"rollout servers ready: {', '.join(self.rollouts.servers.urls)}")

    def _load_prompts(self) -> None:
        data = self.config.data
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.config.student.path)
        except (OSError, ValueError) as exc:
            raise TrainingError(
                f"student.path = {self.config.student.path!r}: no loadable tokenizer ({exc})"
            ) from exc
        prompts = load_prompts(data.path, self.tokenizer, **data.load_options())
        self.prompts = PromptStream(prompts, self.config.seed, data.shuffle)
        rollout = self.config.rollout
        router = PromptRouter.of(self.config)
        self.pipeline = RolloutPipeline(
            self.rollouts.submit,
            self.rollouts.abort_all,
            lambda count: [(p.prompt_ids, router.route(p)) for p in self.prompts.take(count)],
            rollout.sampling,
            self.config.batch.prompts_per_step,
            max_staleness=rollout.max_staleness,
            partial=rollout.partial,
            chunk_tokens=rollout.partial_chunk_tokens,
        )
        self.eval_prompts = [
            (eval_set, load_eval_set(eval_set, self.tokenizer, **data.rendering_options()))
            for eval_set in evaluation_sets(self.config)
        ]

    def _build_models(self) -> None:
        config = self.config
        distill = config.distillation
        sp = config.parallel.sp
        s_args, t_args = self.student_args, self.teacher_args
        student = build_gpt_model(
            s_args,
            params_dtype=resolve_dtype(config.student.dtype),
            sequence_parallel=sp,
            use_te=self.use_te["student"],
            recompute=config.training.recompute,
        )
        if self.resume_from is None:
            load_hf_weights(student, s_args, HFCheckpointReader(config.student.path))
        options = distill.step_options()
        groups: dict[tuple[int, int], Any] = {}  # one set of groups per teacher layout
        setups = []
        for entry, t_args, pairs, bridge in zip(
            self.teacher_entries, self.teacher_args, self.pairs, self.bridges, strict=True
        ):
            layout = entry.parallel_layout(config.parallel)
            own = entry.has_own_layout(config.parallel)
            if own and (layout.tp, layout.pp) not in groups:
                groups[(layout.tp, layout.pp)] = init_model_groups(layout)
            teacher = build_teacher(  # its own layout: built, loaded and run in its own groups
                t_args,
                pairs,
                options,
                params_dtype=resolve_dtype(entry.model.dtype),
                sequence_parallel=layout.sp,
                use_te=self.use_te[entry.name],
                pg_collection=groups[(layout.tp, layout.pp)] if own else None,
            )
            load_hf_weights(teacher, t_args, HFCheckpointReader(entry.model.path))
            setups.append(
                TeacherSetup(
                    entry.name,
                    teacher,
                    pairs,
                    projection=distill.projection_spec(entry.projection),
                    bridge=None if bridge is None else bridge.tensors(),
                    own_layout=own,
                    weight=entry.weight,
                )
            )
        self.step = build_step(
            student,
            setups,
            options,
            config.optimizer.options(),
            overlap_grad_reduce=config.training.overlap_grad_reduce,
            overlap_param_gather=config.training.overlap_param_gather,
        )
        self.model, self.optimizer = self.step.student, self.step.optimizer

    def _resume(self, path: Path) -> None:
        path, state = load_newest_intact(
            resume_candidates(self.config.checkpoint.dir),
            self.model,
            self.optimizer,
            lambda p, s: check_fits(p, s, self.config, self.student_args),
            say,
        )
        layout = {"tp": self.config.parallel.tp, "pp": self.config.parallel.pp}
        saved_layout = {k: state.layout[k] for k in layout}
        changes = [
            change
            for change in config_diff(saved_config(path, state), self.config)
            if change[0] not in _RESUMABLE
        ]
        if changes:
            say(
                "warning: the config differs from the checkpoint's in "
                + ", ".join(f"{key} ({old!r} -> {new!r})" for key, old, new in changes)
            )
        if saved_layout != layout:
            say(f"resharding the checkpoint from {saved_layout} to {layout}")
        if self.rank == 0:
            self.prompts.load_state_dict(state.data)
            if state.rollouts is not None:  # what was in flight, generated by older weights
                self.pipeline.load_state_dict(state.rollouts)
        self.start_step = state.step
        self.last_checkpoint = path
        say(f"resumed from {path} at step {state.step}")

    def _open_metrics(self) -> None:
        m = self.config.metrics
        self.metrics = MetricsWriter(
            m.dir,
            m.sinks,
            wandb_project=m.wandb_project,
            wandb_run_name=m.wandb_run_name,
            config=self.config.model_dump(mode="json"),
            resume_step=self.start_step if self.resume_from is not None else None,
        )

    # ------------------------------------------------------------------ the loop

    def run(self, stop_at: int | None = None) -> TrainSummary:
        """Train from the start (or resumed) step to ``schedule.steps``; save and export.

        ``stop_at``: leave after that step (saving a checkpoint there), as a job with a time
        limit does; a later run resumes where it left off.
        """
        config = self.config
        steps = config.schedule.steps
        last_step = steps if stop_at is None else min(stop_at, steps)
        start = time.perf_counter()
        skipped_in_row = skipped_total = 0
        self._sync_weights(self.weight_version)
        if self.start_step == 0:
            self._maybe_evaluate(0, force=True)
        self._open_progress()
        self.step_end = time.perf_counter()
        if self.rank == 0:
            self.idle_mark = self.rollouts.busy.idle_seconds()
        step = self.start_step
        try:
            while step < last_step:
                record = self._train_step(step)
                step += 1
                self._log(step, record)
                if record.get("skipped"):
                    skipped_in_row += 1
                    skipped_total += 1
                    say(f"step {step}: the loss is not finite; the update was skipped")
                    if skipped_in_row >= config.schedule.max_nonfinite_in_row:
                        raise TrainingError(
                            f"step {step}: {skipped_in_row} steps in a row had a non-finite "
                            f"loss (schedule.max_nonfinite_in_row); stopping. The last "
                            f"checkpoint ({self.last_checkpoint or 'none yet'}) is intact"
                        )
                else:
                    skipped_in_row = 0
                self._maybe_evaluate(step)
                if step % config.checkpoint.interval == 0 or step == last_step:
                    self.last_checkpoint = self._save(step)
        finally:
            if self.progress is not None:
                self.progress.close()
        if config.checkpoint.export_hf is not None and step == steps:
            self._export(config.checkpoint.export_hf)
        return TrainSummary(
            steps_run=step - self.start_step,
            final_step=step,
            evaluations=self.evaluations,
            checkpoint=self.last_checkpoint,
            skipped_steps=skipped_total,
            seconds=time.perf_counter() - start,
        )

    def _train_step(self, step: int) -> dict[str, Any]:
        config = self.config
        timer = StepTimer()
        with timer("rollout"):  # the time the trainer waited for this step's rollouts
            samples, rollout_stats = self._rollout_or_restart(step)
        with timer("schedule"):
            microbatches, imbalance = self._microbatches(samples)
        lr = learning_rate(
            step,
            lr=config.optimizer.lr,
            min_lr=config.optimizer.min_lr,
            steps=config.schedule.steps,
            warmup=config.schedule.warmup,
            decay=config.schedule.decay,
        )
        set_learning_rate(self.optimizer, lr)
        cuda = torch.cuda.is_available()
        if cuda:  # dPeak: the update's peak above what was allocated before it (METHOD.md)
            baseline = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        with timer("train"):
            self._colocated_memory("release")
            result = self.step.run(microbatches)
            self._colocated_memory("resume")
        dpeak = (torch.cuda.max_memory_allocated() - baseline) / 2**20 if cuda else None
        version = self._version(step + 1)
        with timer("rollout_settle"):  # what is in flight ends before the weights change
            self._settle(step, step + 1 if not result.skipped else self.version_step)
        with timer("sync"):
            sync_bytes = self._sync_weights(version) if not result.skipped else 0
        tokens = sum(len(s.token_ids) for s in samples)
        times = timer.pop()
        total = sum(times.values())
        now = time.perf_counter()
        wall, self.step_end = now - self.step_end, now
        idle = self.rollouts.busy.idle_seconds() if self.rank == 0 else 0.0
        idle_delta, self.idle_mark = idle - self.idle_mark, idle
        record: dict[str, Any] = {
            "loss": result.loss,
            "lr": lr,
            "grad_norm": result.grad_norm,
            "skipped": int(result.skipped),
            "tokens": tokens,
            "tokens_per_s": tokens / total if total > 0 else 0.0,
            "tokens_per_s_e2e": tokens / wall if wall > 0 else 0.0,
            "time/wall": wall,
            "time/server_idle": idle_delta if self.rank == 0 else None,
            "supervised_tokens": result.supervised_tokens,
            "schedule/imbalance": imbalance,
            "sync/bytes": sync_bytes,
            "memory/peak_mib": peak_memory_mib(),
            "memory/update_dpeak_mib": dpeak,
            "time/teacher": result.teacher_seconds,
            "time/student": result.seconds - result.teacher_seconds,
            "time/step": total,
            **times,
            **rollout_stats,
        }
        record |= objective_records(result, config.distillation.uses_oprd)
        if self.several:
            record |= teacher_records(result, config.distillation.uses_oprd)
            record["routing/unsupervised_samples"] = sum(s.teachers == () for s in samples)
        if not result.skipped:
            self.weight_version = version
            self.version_step = step + 1
        return record

    def _colocated_memory(self, action: str) -> None:
        """Colocated servers give their GPU memory to training and take it back after."""
        launch = self.config.rollout.launch
        if self.config.rollout.mode == "launch" and launch is not None and launch.colocate:
            shared(lambda: self.rollouts.set_memory(action), f"{action} of the servers' memory")

    def _rollout_or_restart(self, step: int) -> tuple[list[StepSample], dict[str, float]]:
        """The step's samples; launched servers that died are restarted and re-synced
        (``rollout.max_restarts`` times in the run), otherwise the run stops here."""
        while True:
            try:
                return shared(lambda: self._rollout(step), f"step {step + 1}: rollouts")
            except ServersLostError as exc:
                self._restart_servers(step, exc)
                self.weight_version = self._version(step)
                self.version_step = step
                self._sync_weights(self.weight_version)

    def _settle(self, step: int, next_version: int) -> None:
        """End the requests in flight before a weight sync (rank 0; see RolloutPipeline)."""
        try:
            shared(lambda: self.pipeline.settle(next_version), f"step {step + 1}: rollouts")
        except ServersLostError as exc:  # the sync that follows loads the restarted servers
            self._restart_servers(step, exc)

    def _restart_servers(self, step: int, exc: ServersLostError) -> None:
        rollout = self.config.rollout
        if rollout.mode != "launch" or self.restarts >= rollout.max_restarts:
            raise TrainingError(
                f"{exc}. Stopping at step {step + 1}; the last checkpoint "
                f"({self.last_checkpoint or 'none yet'}) is intact: run the same "
                "command again to resume from it"
            ) from exc
        say(f"{exc}; restarting the rollout servers")

        def restart() -> None:
            self.pipeline.cancel()  # what came back is kept; the rest is sent again
            self.rollouts.restart()

        shared(restart, f"step {step + 1}: restarting servers")
        self.restarts += 1

    def _rollout(self, step: int) -> tuple[list[StepSample], dict[str, float]]:
        """Rank 0: send what the pool lacks under the current weights, take this step's
        groups (waiting for them)."""
        steps_left = self.config.schedule.steps - step
        self.pipeline.fill(self.version_step, self.weight_version, steps_left)
        batch = self.pipeline.take(self.version_step, self.weight_version)
        drafts = [d for group in batch.groups for d in group.drafts]
        lengths = [len(d.response_ids) for d in drafts]
        samples = [
            StepSample(tuple(ids), prompt_length, group.route)
            for group in batch.groups
            for ids, prompt_length in group.samples()
        ]
        stats = {
            "response_length/mean": sum(lengths) / len(lengths),
            "response_length/max": float(max(lengths)),
            "response_length/truncated_fraction": sum(d.finish_reason == "length" for d in drafts)
            / len(drafts),
            **batch.stats,
        }
        return samples, stats

    def _cost_model(self) -> Any:
        """The scheduler's FLOP model of one sample (student update + the forward of each
        teacher it is routed to)."""
        distill = self.config.distillation
        opd = distill.opd_term is not None
        teachers = []
        for entry, t_args, pairs in zip(
            self.teacher_entries, self.teacher_args, self.pairs, strict=True
        ):
            layers = teacher_depth(pairs, t_args.num_layers, needs_logits=opd)
            teachers.append((entry.name, model_dims(t_args, layers, lm_head=opd)))
        return CostModel(
            student=model_dims(self.student_args, lm_head=opd), teachers=tuple(teachers)
        )

    def _microbatches(self, samples: list[StepSample]) -> tuple[list, float]:
        config = self.config
        supervised = [s for s in samples if s.teachers != ()]
        if len(supervised) >= self.dp_size * config.batch.microbatch_multiple:
            samples = supervised  # routed to no teacher: not trained on (counted in the log)
        schedule = plan_step(
            samples,
            self.dp_size,
            config.batch.max_tokens_per_microbatch,
            config.batch.microbatch_multiple,
            self.cost,
        )
        layout = config.parallel
        seq_multiple = sequence_multiple(tp=layout.tp, cp=layout.cp, sp=layout.sp)
        microbatches = rank_microbatches(
            samples,
            schedule,
            self.dp_rank,
            config.distillation.positions,
            pad_id=self.pad_id,
            seq_multiple=seq_multiple,
            packed=config.batch.pack_sequences,
            slot_multiple=sequence_multiple(cp=layout.cp),
        )
        return microbatches, schedule.imbalance

    def _version(self, step: int) -> str:
        """The weight version of the student after ``step`` optimizer steps in this launch."""
        restarted = f"-r{self.restarts}" if self.restarts else ""
        return f"step-{step}-{self.run_id}{restarted}"

    def _sync_weights(self, version: str) -> int:
        """Push the student's weights to the servers as ``version`` and check them."""
        sync = self.rollouts.weight_sync if self.rank == 0 else None
        try:
            report = self.loop.run_until_complete(
                sync_model_weights(sync, self.model, self.student_args, version, dst_rank=0)
            )
        except WeightSyncError as exc:
            raise TrainingError(f"weight sync of {version}: {exc}") from exc
        return 0 if report is None else report.bytes

    # ------------------------------------------------------------------ evaluation

    def _maybe_evaluate(self, step: int, force: bool = False) -> None:
        evaluation = self.config.evaluation
        if evaluation.interval <= 0 or not evaluation_sets(self.config):
            return
        last = step == self.config.schedule.steps
        if not (force or last or step % evaluation.interval == 0):
            return
        metrics = shared(lambda: self._evaluate(step), f"evaluation at step {step}")
        self.evaluations.append(EvalResult(step, metrics))
        if self.rank == 0:
            self.metrics.log(step, metrics, kind="eval")
            for eval_set in evaluation_sets(self.config):
                say(f"step {step}: {describe_eval(eval_set, metrics)}")

    def _evaluate(self, step: int) -> dict[str, float]:
        """Every evaluation set's metrics (rank 0)."""
        metrics: dict[str, float] = {}
        for eval_set, prompts in self.eval_prompts:
            desc = f"step {step} evaluation {eval_set.label}"
            with Progress(len(prompts), desc, "prompt") as progress:
                groups = self.rollouts.generate(
                    [p.prompt_ids for p in prompts],
                    eval_set.sampling,
                    1_000_000 + step,
                    self.weight_version,
                    on_prompt_done=progress.update,
                )
            metrics |= score(
                prompts,
                groups,
                self.tokenizer,
                eval_set.answer_key,
                eval_set.verifier,
                eval_set.prefix,
            )
        return metrics

    # ------------------------------------------------------------------ output

    def _open_progress(self) -> None:
        if self.rank != 0 or not self.config.metrics.progress_bar:
            return

        self.progress = tqdm(
            total=self.config.schedule.steps,
            initial=self.start_step,
            desc="oprd",
            unit="step",
            dynamic_ncols=True,
        )

    def _log(self, step: int, record: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        if step % self.config.metrics.interval == 0 or step == self.config.schedule.steps:
            self.metrics.log(step, {k: v for k, v in record.items() if v is not None})
        say(self.step_log.line(step, record))
        if self.progress is not None:
            self.progress.set_postfix(
                loss=f"{record['loss']:.4g}", tok_s=f"{record['tokens_per_s']:.0f}", refresh=False
            )
            self.progress.update(1)

    def _save(self, step: int) -> Path:
        config = self.config
        state = TrainerState(
            step=step,
            data=self.prompts.state_dict() if self.rank == 0 else {},
            weight_version=self.weight_version,
            layout={"tp": config.parallel.tp, "pp": config.parallel.pp, "dp": self.dp_size},
            config=config.model_dump(mode="json"),
            rollouts=self.pipeline.state_dict() if self.rank == 0 else None,
        )
        path = save_checkpoint(
            config.checkpoint.dir,
            state,
            self.model,
            self.optimizer,
            self.student_args,
            config.student.path,
            config.checkpoint.keep_last,
        )
        say(f"step {step}: checkpoint saved to {path}")
        return path

    def _export(self, directory: str) -> None:
        """The final student as a Hugging Face directory (written aside, then renamed)."""
        target = Path(directory)
        error = None
        if self.rank == 0 and target.exists():
            error = f"checkpoint.export_hf = {directory!r} exists; choose a new directory"
        error = shared(lambda: error, "export")
        if error is not None:
            raise TrainingError(error)
        weights = gather_hf_weights(self.model, self.student_args, dst_rank=0)
        if self.rank != 0:
            for _ in weights:
                pass
        else:
            write_hf_directory(weights, target, Path(self.config.student.path))
            say(f"exported the student to {target} (Hugging Face format)")
        dist.barrier()

    def close(self) -> None:
        """Stop servers, flush metrics (rank 0)."""
        with contextlib.suppress(Exception):
            if self.metrics is not None:
                self.metrics.close()
        if self.rollouts is not None:
            if self.pipeline is not None:  # its requests are aborted on the servers
                with contextlib.suppress(Exception):
                    self.pipeline.cancel()
            self.rollouts.shutdown()
        self.loop.close()


# Keys whose change does not make a resume suspicious.
_RESUMABLE = {
    "schedule.steps",
    "checkpoint.dir",
    "checkpoint.interval",
    "checkpoint.keep_last",
    "checkpoint.resume",
    "checkpoint.export_hf",
    "metrics.dir",
    "metrics.interval",
    "metrics.sinks",
    "metrics.progress_bar",
    "evaluation.interval",
}


def _require_apex_or_te() -> None:
    """Megatron-Core 0.16's distributed optimizer restores its checkpoints only with Apex or
    Transformer Engine (without them its state lacks or mishandles the Adam ``step``)."""
    if not getattr(distrib_optimizer, "HAVE_APEX_OR_TE", False):
        raise TrainingError(
            "optimizer.use_distributed_optimizer = true needs Transformer Engine or Apex "
            "(pip install 'oprd-mega[gpu]'): without them Megatron-Core cannot restore the "
            "distributed optimizer from a checkpoint; set it to false (CPU runs)"
        )


def _pad_id(model_path: str) -> int:
    config = json.loads((Path(model_path) / "config.json").read_text(encoding="utf-8"))
    pad = config.get("pad_token_id")
    return int(pad) if isinstance(pad, int) else 0


def train(
    config: TrainConfig, stop_at: int | None = None, *, launch_checked: bool = False
) -> TrainSummary:
    """Run ``config`` on this process (under torchrun: every rank calls it); ``stop_at``: see
    :meth:`Trainer.run`. ``launch_checked``: the caller ran
    :func:`oprd_mega.config.model_files.check_launch` on this config already (the train CLI),
    so the files and both models' tokenizers are not read a second time."""
    ensure_logging()
    if not launch_checked:
        check_paths(config)
        check_routes(config)
        check_model_files(config)  # shapes, layout, tokenizers before any process group starts
    init_distributed(config.parallel, seed=config.seed)
    torch.manual_seed(config.seed)
    trainer = Trainer(config)
    try:
        trainer.setup()
        return trainer.run(stop_at)
    finally:
        trainer.close()
