"""Optimizer and learning-rate schedule, checkpoints, metrics and evaluation."""

from __future__ import annotations

import math
import re
from typing import Any, Literal

from pydantic import Field, model_validator

from oprd_mega.config.adopt import adopt
from oprd_mega.config.base import Section, invalid
from oprd_mega.config.rollout import Sampling
from oprd_mega.distill.options import OptimizerOptions
from oprd_mega.models.recompute import RecomputeOptions


class OptimizerSection(Section):
    """AdamW over the student (and any trainable projection); the keys other than name and
    min_lr are the fields of ``oprd_mega.distill.options.OptimizerOptions``."""

    name: Literal["adamw"] = "adamw"
    """The optimizer (paper: AdamW)."""
    lr: float = Field(1e-5, gt=0)
    """Peak learning rate (paper: 1e-5)."""
    min_lr: float = Field(0.0, ge=0)
    """Learning rate at the end of the decay; at most lr."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW (beta1, beta2), each in [0, 1)."""
    eps: float = Field(1e-8, gt=0)
    """AdamW epsilon."""
    weight_decay: float = Field(0.01, ge=0)
    """Decoupled weight decay."""
    clip_grad: float = Field(1.0, ge=0)
    """Global gradient-norm clip; 0 turns clipping off."""
    use_distributed_optimizer: bool = False
    """Megatron's distributed optimizer (optimizer state sharded over data-parallel ranks);
    needs Transformer Engine or Apex (GPU set-up) to restore its checkpoints."""

    def options(self) -> OptimizerOptions:
        """The step's optimizer options (name and min_lr belong to the schedule)."""
        return OptimizerOptions(
            lr=self.lr,
            weight_decay=self.weight_decay,
            betas=self.betas,
            eps=self.eps,
            clip_grad=self.clip_grad,
            use_distributed_optimizer=self.use_distributed_optimizer,
        )

    @model_validator(mode="after")
    def _ranges(self) -> OptimizerSection:
        for index, beta in enumerate(self.betas):
            if not 0 <= beta < 1:
                raise invalid(f"betas[{index}]", beta, "each beta must be in [0, 1)")
        if self.min_lr > self.lr:
            raise invalid("min_lr", self.min_lr, f"min_lr must be <= lr ({self.lr})")
        return self


class ScheduleSection(Section):
    """Training length, linear warm-up and decay of the learning rate."""

    steps: int = Field(500, ge=1)
    """Optimizer steps of the run (paper: 500)."""
    warmup_fraction: float | None = Field(0.03, ge=0, le=1)
    """Warm-up as a fraction of steps (paper: 3%); null when warmup_steps is given."""
    warmup_steps: int | None = Field(None, ge=0)
    """Warm-up in steps; replaces warmup_fraction (set that to null)."""
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay from lr to optimizer.min_lr after warm-up (paper: cosine)."""
    max_nonfinite_in_row: int = Field(3, ge=1)
    """A step whose loss is NaN or infinite is skipped (no update); after this many in a row
    the run stops."""

    @model_validator(mode="before")
    @classmethod
    def _steps_replace_fraction(cls, data: Any) -> Any:
        has_steps = isinstance(data, dict) and data.get("warmup_steps") is not None
        if has_steps and "warmup_fraction" not in data:
            data = {**data, "warmup_fraction": None}
        return data

    @model_validator(mode="after")
    def _one_warmup(self) -> ScheduleSection:
        if self.warmup_steps is not None and self.warmup_fraction is not None:
            raise invalid(
                "warmup_steps",
                self.warmup_steps,
                "give warmup_steps or warmup_fraction, not both (set the other to null)",
            )
        if self.warmup_steps is None and self.warmup_fraction is None:
            raise invalid("warmup_fraction", None, "give warmup_fraction or warmup_steps")
        if self.warmup_steps is not None and self.warmup_steps > self.steps:
            raise invalid("warmup_steps", self.warmup_steps, f"must be <= steps ({self.steps})")
        return self

    @property
    def warmup(self) -> int:
        """Warm-up length in steps (a fraction rounds up)."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        assert self.warmup_fraction is not None
        return math.ceil(self.warmup_fraction * self.steps)


class CheckpointSection(Section):
    """Where and how often the run is saved, and whether it resumes."""

    dir: str = "runs/oprd/checkpoints"
    """Checkpoint directory (one subdirectory per saved step and a 'latest' pointer)."""
    interval: int = Field(50, ge=1)
    """Save every this many steps (and at the end)."""
    keep_last: int = Field(3, ge=1)
    """Checkpoints kept; older ones are deleted after a successful save."""
    resume: Literal["auto", "always", "never"] = "auto"
    """'auto': resume when dir holds a checkpoint; 'always': one must exist; 'never': start
    fresh."""
    export_hf: str | None = None
    """Directory for the final student in Hugging Face format; null: no export."""


class MetricsSection(Section):
    """Per-step metrics: sinks, directory and interval."""

    dir: str = "runs/oprd/logs"
    """Directory of metrics.jsonl, TensorBoard events and logs."""
    interval: int = Field(1, ge=1)
    """Log every this many steps."""
    sinks: tuple[Literal["jsonl", "tensorboard", "wandb"], ...] = ("jsonl", "tensorboard")
    """Where metrics go; wandb needs the wandb package."""
    wandb_project: str = "oprd-mega"
    """wandb project (with sink 'wandb')."""
    wandb_run_name: str | None = None
    """wandb run name; null: wandb's own."""
    progress_bar: bool = True
    """Show a progress bar (step, loss, tokens/s, ETA) on rank 0."""

    @model_validator(mode="after")
    def _distinct_sinks(self) -> MetricsSection:
        if len(set(self.sinks)) != len(self.sinks):
            raise invalid("sinks", list(self.sinks), "each sink may appear once")
        return self


class EvalSetSection(Section):
    """One held-out evaluation set: prompt file, answer column, verifier, k and sampling."""

    prompts: str | None = None
    """Held-out prompt file (same format and prompt column as data); null: no evaluation (a
    named set in evaluation.sets needs one)."""
    answer_key: str = "answer"
    """Column with the reference answer."""
    verifier: Literal["auto", "exact", "boxed", "math-verify"] = "auto"
    """Answer check: exact final answer, last \\boxed{}, math-verify, or 'auto' (math-verify
    when installed, else boxed then exact)."""
    k: int = Field(16, ge=1)
    """Samples per prompt (paper: 16): Avg@k, Best@k and the unbiased pass@j for j = 1, 2, 4,
    ... up to k."""
    max_prompts: int | None = Field(None, ge=1)
    """Evaluate on the first this many prompts; null: all."""
    sampling: Sampling | None = None
    """Sampling for evaluation; keys left out take rollout.sampling's defaults, n defaults to
    (and must equal) k. Null: the run's rollout.sampling with n = k."""

    @model_validator(mode="before")
    @classmethod
    def _n_is_k(cls, data: Any) -> Any:
        sampling = data.get("sampling") if isinstance(data, dict) else None
        if isinstance(sampling, dict) and "n" not in sampling:
            k = data.get("k", cls.model_fields["k"].default)
            data = {**data, "sampling": {**sampling, "n": k}}
        return data

    @model_validator(mode="after")
    def _sampling_n_is_k(self) -> EvalSetSection:
        if self.sampling is not None and self.sampling.n != self.k:
            raise invalid("sampling.n", self.sampling.n, f"must equal evaluation.k ({self.k})")
        return self


_SET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


class EvaluationSection(EvalSetSection):
    """Periodic accuracy on held-out prompts: Avg@k, Best@k, pass@k and response length. The
    keys above describe one set, logged as eval/...; evaluation.sets adds named ones."""

    interval: int = Field(0, ge=0)
    """Evaluate every this many steps (and before the first); 0 turns evaluation off."""
    sets: dict[str, EvalSetSection] = Field(default_factory=dict)
    """Further named evaluation sets, each with the keys of this section but interval (prompts
    required), e.g. {aime: {prompts: aime.jsonl, verifier: math-verify, k: 16}}; set NAME is
    logged as eval/NAME/avg_at_k, eval/NAME/best_at_k, ...; names are letters, digits, '_'
    and '-'."""

    @model_validator(mode="after")
    def _consistent(self) -> EvaluationSection:
        if self.interval > 0 and self.prompts is None and not self.sets:
            raise invalid(
                "prompts", None, "evaluation.interval > 0 needs a prompt file (or evaluation.sets)"
            )
        for name, one in self.sets.items():
            if not _SET_NAME.fullmatch(name):
                raise invalid(
                    f"sets.{name}", name, "a set name is letters, digits, '_' and '-' only"
                )
            if one.prompts is None:
                raise invalid(f"sets.{name}.prompts", None, "a named evaluation set needs one")
        return self


Recompute = adopt(
    RecomputeOptions,
    {
        "granularity": "'none' (keep every activation), 'selective' (recompute the modules "
        "below inside each layer) or 'full' (keep only the inputs of checkpointed layers); as "
        "Megatron's recompute_granularity. The student only: the teacher keeps no activations.",
        "method": "'full' only: 'uniform' (every pipeline stage's layers in checkpointed chunks "
        "of num_layers) or 'block' (the first num_layers layers of each stage); null otherwise.",
        "num_layers": "'full' only: layers per chunk ('uniform', must divide every stage's "
        "layer count) or per stage ('block', at most a stage's layers); null otherwise.",
        "modules": "'selective' only: among 'core_attn' (attention scores; the default), "
        "'layernorm' and 'mlp'.",
    },
)


class TrainingSection(Section):
    """Memory and communication of the student's training step (Megatron-Core options)."""

    recompute: Recompute = RecomputeOptions()
    """Activation recompute of the student (Megatron's recompute_* options)."""
    overlap_grad_reduce: bool = False
    """Reduce each gradient bucket over data-parallel ranks while backward still runs (after
    the last microbatch's gradients of the bucket are in) instead of after backward."""
    overlap_param_gather: bool = False
    """Distributed optimizer only: gather the updated parameters asynchronously. Each step
    completes the gather before returning, since the weight sync reads the new weights at
    once; it saves nothing in on-policy training today."""
