"""The on-policy training loop: rollouts -> schedule -> teacher pass + student step -> optimizer
-> weight sync (checked) -> metrics -> evaluation -> checkpoint.

Every rank runs :class:`Trainer`; rank 0 also owns the rollout servers, the prompts, the
evaluation and the metrics files, and shares what the other ranks need (the step's samples,
errors) by broadcast, so a failure on rank 0 stops every rank with the same message.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from oprd_mega.config import (
    TrainConfig,
    check_models,
    check_paths,
    config_diff,
    data_parallel_size,
    dump_config,
)
from oprd_mega.config.model_files import check_model_files, model_args
from oprd_mega.train.batching import StepSample
from oprd_mega.train.lr_schedule import learning_rate, set_learning_rate
from oprd_mega.train.prompt_stream import PromptStream

log_prefix = "[oprd-mega]"


class TrainingError(RuntimeError):
    """The run cannot go on; the message says why and where (step, server, file)."""


class ServersLostError(TrainingError):
    """The rollout servers stopped answering."""


def say(message: str) -> None:
    """A line on rank 0's standard output."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"{log_prefix} {message}", flush=True)


def shared(producer: Callable[[], Any], what: str) -> Any:
    """Run ``producer`` on rank 0 and give its value to every rank; an exception there becomes
    the same :class:`TrainingError` on every rank (``what`` says which part failed)."""
    from oprd_mega.rollout.client import RolloutError

    box: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            box = [("ok", producer())]
        except RolloutError as exc:
            box = [("lost", f"{what}: {exc}")]
        except Exception as exc:
            box = [("error", f"{what}: {exc}")]
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
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
        self.metrics: Any = None
        self.progress: Any = None
        self.evaluations: list[EvalResult] = []
        self.restarts = 0
        self.last_checkpoint: Path | None = None

    # ------------------------------------------------------------------ set-up

    def setup(self) -> None:
        """Check inputs, start the servers, build models and optimizer, resume if asked."""
        from megatron.core import parallel_state

        config = self.config
        self.student_args = model_args(config.student)
        self.teacher_args = model_args(config.teacher)
        self.pairs = check_models(config, self.student_args, self.teacher_args)
        if config.optimizer.use_distributed_optimizer:
            _require_apex_or_te()
        self.bridge = None
        projection = config.distillation.projection
        if config.distillation.uses_oprd and projection.mode == "bridge":
            from oprd_mega.distill.projection import check_bridge_against

            try:  # a bridge built for other models fails here, before any server starts
                self.bridge = check_bridge_against(
                    projection.bridge_path, self.student_args, self.teacher_args, self.pairs
                )
            except ValueError as exc:
                raise TrainingError(str(exc)) from exc
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
        if self.rank == 0:
            self._open_metrics()
            dump_config(config, Path(config.metrics.dir) / "config.yaml")

    def _find_resume(self) -> Path | None:
        from oprd_mega.train.checkpoint import find_latest

        option = self.config.checkpoint.resume
        if option == "never":
            return None
        found = find_latest(self.config.checkpoint.dir)
        if found is None and option == "always":
            raise TrainingError(
                f"checkpoint.resume = 'always': no checkpoint in {self.config.checkpoint.dir}"
            )
        return found

    def _start_rollouts(self) -> None:
        from oprd_mega.train.rollouts import RolloutService

        self.rollouts = RolloutService(self.config, self.loop)
        say(f"rollout servers ready: {', '.join(self.rollouts.servers.urls)}")

    def _load_prompts(self) -> None:
        from transformers import AutoTokenizer

        from oprd_mega.data.prompts import load_prompts

        data = self.config.data
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.config.student.path)
        except (OSError, ValueError) as exc:
            raise TrainingError(
                f"student.path = {self.config.student.path!r}: no loadable tokenizer ({exc})"
            ) from exc
        prompts = load_prompts(data.path, self.tokenizer, **data.load_options())
        self.prompts = PromptStream(prompts, self.config.seed, data.shuffle)
        evaluation = self.config.evaluation
        if evaluation.interval > 0 and evaluation.prompts is not None:
            held_out = load_prompts(evaluation.prompts, self.tokenizer, **data.rendering_options())
            missing = [p.index for p in held_out if evaluation.answer_key not in p.extra]
            if missing:
                raise TrainingError(
                    f"evaluation.prompts = {evaluation.prompts!r}: row {missing[0]} has no "
                    f"column {evaluation.answer_key!r} (evaluation.answer_key)"
                )
            self.eval_prompts = held_out[: evaluation.max_prompts]

    def _build_models(self) -> None:
        from megatron.core import parallel_state
        from megatron.core.distributed import DistributedDataParallelConfig

        from oprd_mega.convert.hf_io import HFCheckpointReader
        from oprd_mega.convert.mcore_io import load_hf_weights
        from oprd_mega.distill.projection import attach_projection
        from oprd_mega.distill.step import DistillStep, build_optimizer, wrap_student
        from oprd_mega.distill.teacher import layer_stages
        from oprd_mega.models import build_gpt_model, build_truncated_model
        from oprd_mega.models.builder import resolve_dtype

        config = self.config
        distill = config.distillation
        sp = config.parallel.sp
        s_args, t_args = self.student_args, self.teacher_args
        student = build_gpt_model(
            s_args, params_dtype=resolve_dtype(config.student.dtype), sequence_parallel=sp
        )
        if self.resume_from is None:
            load_hf_weights(student, s_args, HFCheckpointReader(config.student.path))
        t_dtype = resolve_dtype(config.teacher.dtype)
        if distill.opd_term is not None:
            teacher = build_gpt_model(t_args, params_dtype=t_dtype, sequence_parallel=sp)
        else:
            deepest = max(t for _, t in self.pairs)
            teacher = build_truncated_model(
                t_args, deepest, params_dtype=t_dtype, sequence_parallel=sp
            )
        load_hf_weights(teacher, t_args, HFCheckpointReader(config.teacher.path))
        for param in teacher.parameters():
            param.requires_grad_(False)
        bridge = None
        if distill.uses_oprd:
            spec = distill.projection_spec()
            bridge = self.bridge
            stage = parallel_state.get_pipeline_model_parallel_rank()
            stages = layer_stages(student)
            mine = [s for s, _ in self.pairs if stages[s] == stage]
            attach_projection(
                student,
                spec,
                mine,
                s_args.hidden_size,
                t_args.hidden_size,
                sequence_parallel=sp,
                bridge=bridge,
            )
        opt = config.optimizer
        self.model = wrap_student(
            student,
            DistributedDataParallelConfig(
                grad_reduce_in_fp32=True,
                overlap_grad_reduce=False,
                use_distributed_optimizer=opt.use_distributed_optimizer,
            ),
        )
        self.optimizer = build_optimizer(
            self.model,
            lr=opt.lr,
            weight_decay=opt.weight_decay,
            betas=opt.betas,
            eps=opt.eps,
            clip_grad=opt.clip_grad,
            use_distributed_optimizer=opt.use_distributed_optimizer,
        )
        self.teacher = teacher
        self.step = DistillStep(
            self.model,
            teacher,
            self.optimizer,
            self.pairs,
            distill.step_options(),
            bridge=None if bridge is None else bridge.teacher,
        )

    def _resume(self, path: Path) -> None:
        from oprd_mega.train.checkpoint import (
            CheckpointError,
            load_checkpoint,
            read_state,
            saved_config,
        )

        state = read_state(path)
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
        try:
            load_checkpoint(path, self.model, self.optimizer)
        except Exception as exc:
            raise CheckpointError(f"loading checkpoint {path} failed: {exc!r}") from exc
        if self.rank == 0:
            self.prompts.load_state_dict(state.data)
        self.start_step = state.step
        self.last_checkpoint = path
        say(f"resumed from {path} at step {state.step}")

    def _open_metrics(self) -> None:
        from oprd_mega.train.metrics import MetricsWriter

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
        from oprd_mega.train.metrics import StepTimer, peak_memory_mib

        config = self.config
        timer = StepTimer()
        with timer("rollout"):
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
            result = self.step.run(microbatches)
        dpeak = (torch.cuda.max_memory_allocated() - baseline) / 2**20 if cuda else None
        version = self._version(step + 1)
        with timer("sync"):
            sync_bytes = self._sync_weights(version) if not result.skipped else 0
        tokens = sum(len(s.token_ids) for s in samples)
        times = timer.pop()
        total = sum(times.values())
        record: dict[str, Any] = {
            "loss": result.loss,
            "lr": lr,
            "grad_norm": result.grad_norm,
            "skipped": int(result.skipped),
            "tokens": tokens,
            "tokens_per_s": tokens / total if total > 0 else 0.0,
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
        if config.distillation.uses_oprd:
            record["rep/loss"] = result.oprd_loss
            record["rep/cosine_similarity"] = result.cosine
            for layer, value in result.layer_loss.items():
                record[f"rep/loss/layer_{layer}"] = value
            for layer, value in result.layer_cosine.items():
                record[f"rep/cosine_similarity/layer_{layer}"] = value
        for name, value in result.opd.items():
            record[f"opd/{name}"] = value
        if not result.skipped:
            self.weight_version = version
        return record

    def _rollout_or_restart(self, step: int) -> tuple[list[StepSample], dict[str, float]]:
        """The step's samples; launched servers that died are restarted and re-synced
        (``rollout.max_restarts`` times in the run), otherwise the run stops here."""
        while True:
            try:
                return shared(lambda: self._rollout(step), f"step {step + 1}: rollouts")
            except ServersLostError as exc:
                rollout = self.config.rollout
                if rollout.mode != "launch" or self.restarts >= rollout.max_restarts:
                    raise TrainingError(
                        f"{exc}. Stopping at step {step + 1}; the last checkpoint "
                        f"({self.last_checkpoint or 'none yet'}) is intact: run the same "
                        "command again to resume from it"
                    ) from exc
                say(f"{exc}; restarting the rollout servers")
                shared(lambda: self.rollouts.restart(), f"step {step + 1}: restarting servers")
                self.restarts += 1
                self.weight_version = self._version(step)
                self._sync_weights(self.weight_version)

    def _rollout(self, step: int) -> tuple[list[StepSample], dict[str, float]]:
        config = self.config
        position = self.prompts.state_dict()
        prompts = self.prompts.take(config.batch.prompts_per_step)
        try:
            groups = self.rollouts.generate(
                [p.prompt_ids for p in prompts], config.rollout.sampling, step, self.weight_version
            )
        except BaseException:
            self.prompts.load_state_dict(position)  # a retry takes the same prompts
            raise
        flat = [s for group in groups for s in group]
        lengths = [s.response_length for s in flat]
        samples = [StepSample(tuple(s.token_ids), s.prompt_length) for s in flat]
        stats = {
            "response_length/mean": sum(lengths) / len(lengths),
            "response_length/max": float(max(lengths)),
            "response_length/truncated_fraction": sum(s.finish_reason == "length" for s in flat)
            / len(flat),
        }
        return samples, stats

    def _cost_model(self) -> Any:
        """The scheduler's FLOP model of one sample (student update + teacher forward)."""
        from oprd_mega.data.scheduler import CostModel
        from oprd_mega.train.batching import model_dims

        distill = self.config.distillation
        opd = distill.opd_term is not None
        teacher_layers = None if opd else max(t for _, t in self.pairs)
        return CostModel(
            student=model_dims(self.student_args, lm_head=opd),
            teacher=model_dims(self.teacher_args, teacher_layers, lm_head=opd),
        )

    def _microbatches(self, samples: list[StepSample]) -> tuple[list, float]:
        from oprd_mega.train.batching import plan_step, rank_microbatches

        config = self.config
        schedule = plan_step(
            samples,
            self.dp_size,
            config.batch.max_tokens_per_microbatch,
            config.batch.microbatch_multiple,
            self.cost,
        )
        seq_multiple = config.parallel.tp if config.parallel.sp else 1
        microbatches = rank_microbatches(
            samples,
            schedule,
            self.dp_rank,
            config.distillation.positions,
            pad_id=self.pad_id,
            seq_multiple=seq_multiple,
            packed=config.batch.pack_sequences,
        )
        return microbatches, schedule.imbalance

    def _version(self, step: int) -> str:
        """The weight version of the student after ``step`` optimizer steps in this launch."""
        restarted = f"-r{self.restarts}" if self.restarts else ""
        return f"step-{step}-{self.run_id}{restarted}"

    def _sync_weights(self, version: str) -> int:
        """Push the student's weights to the servers as ``version`` and check them."""
        from oprd_mega.rollout.megatron_sync import sync_model_weights
        from oprd_mega.rollout.weight_sync import WeightSyncError

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
        if evaluation.interval <= 0 or evaluation.prompts is None:
            return
        last = step == self.config.schedule.steps
        if not (force or last or step % evaluation.interval == 0):
            return
        metrics = shared(lambda: self._evaluate(step), f"evaluation at step {step}")
        self.evaluations.append(EvalResult(step, metrics))
        if self.rank == 0:
            self.metrics.log(step, metrics, kind="eval")
            accuracy = metrics.get("eval/avg_at_k", float("nan"))
            say(f"step {step}: held-out Avg@{evaluation.k} {100 * accuracy:.1f}%")

    def _evaluate(self, step: int) -> dict[str, float]:
        from oprd_mega.train.evaluation import score

        evaluation = self.config.evaluation
        prompts = self.eval_prompts
        groups = self.rollouts.generate(
            [p.prompt_ids for p in prompts],
            self.config.evaluation_sampling,
            1_000_000 + step,
            self.weight_version,
        )
        return score(prompts, groups, self.tokenizer, evaluation.answer_key, evaluation.verifier)

    # ------------------------------------------------------------------ output

    def _open_progress(self) -> None:
        if self.rank != 0 or not self.config.metrics.progress_bar:
            return
        from tqdm.auto import tqdm

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
        if self.progress is not None:
            self.progress.set_postfix(
                loss=f"{record['loss']:.4g}", tok_s=f"{record['tokens_per_s']:.0f}", refresh=False
            )
            self.progress.update(1)

    def _save(self, step: int) -> Path:
        from oprd_mega.train.checkpoint import TrainerState, save_checkpoint

        config = self.config
        state = TrainerState(
            step=step,
            data=self.prompts.state_dict() if self.rank == 0 else {},
            weight_version=self.weight_version,
            layout={"tp": config.parallel.tp, "pp": config.parallel.pp, "dp": self.dp_size},
            config=config.model_dump(mode="json"),
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
        import shutil
        import tempfile

        from oprd_mega.convert.gather import gather_hf_weights
        from oprd_mega.convert.hf_io import copy_aux_files, write_safetensors_shards

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
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
            try:
                write_safetensors_shards(weights, tmp)
                copy_aux_files(Path(self.config.student.path), tmp)
                tmp.rename(target)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            say(f"exported the student to {target} (Hugging Face format)")
        dist.barrier()

    def close(self) -> None:
        """Stop servers, flush metrics (rank 0)."""
        with contextlib.suppress(Exception):
            if self.metrics is not None:
                self.metrics.close()
        if self.rollouts is not None:
            self.rollouts.close()
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
    from megatron.core.optimizer import distrib_optimizer

    if not getattr(distrib_optimizer, "HAVE_APEX_OR_TE", False):
        raise TrainingError(
            "optimizer.use_distributed_optimizer = true needs Transformer Engine or Apex "
            "(pip install 'oprd-mega[gpu]'): without them Megatron-Core cannot restore the "
            "distributed optimizer from a checkpoint; set it to false (CPU runs)"
        )


def _pad_id(model_path: str) -> int:
    import json

    config = json.loads((Path(model_path) / "config.json").read_text(encoding="utf-8"))
    pad = config.get("pad_token_id")
    return int(pad) if isinstance(pad, int) else 0


def train(config: TrainConfig, stop_at: int | None = None) -> TrainSummary:
    """Run ``config`` on this process (under torchrun: every rank calls it); ``stop_at``: see
    :meth:`Trainer.run`."""
    from oprd_mega.parallel import init_distributed

    check_paths(config)
    check_model_files(config)  # shapes, layout and tokenizers before any process group starts
    init_distributed(config.parallel, seed=config.seed)
    torch.manual_seed(config.seed)
    trainer = Trainer(config)
    try:
        trainer.setup()
        return trainer.run(stop_at)
    finally:
        trainer.close()
