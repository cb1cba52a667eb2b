"""The distillation objective: method, supervised layers and positions, projection, kernel.

The keys are those of the distillation step's own options (``oprd_mega.distill.options``, no
Megatron): ``distillation`` builds a ``StepOptions``, ``distillation.projection`` a
``ProjectionSpec``, whose own checks (methods, modes, mu with 'combined', the bridge's file and
normalisation) are the config's, and ``distillation.kernel`` *is* a
``oprd_mega.distill.taps.KernelOptions``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import torch
from pydantic import Field, PlainSerializer, PlainValidator, model_validator

from oprd_kernels.api import IMPLS
from oprd_mega.config.adopt import adopt
from oprd_mega.config.base import Section, invalid
from oprd_mega.config.models import DType
from oprd_mega.distill.layers import LAYER_MODES, select_layers
from oprd_mega.distill.options import (
    METHODS,
    PROJECTION_MODES,
    OptionError,
    ProjectionSpec,
    StepOptions,
)
from oprd_mega.distill.positions import PositionSpec
from oprd_mega.distill.taps import KernelOptions

Method = Literal[METHODS]  # type: ignore[valid-type]


def _layer_spec(value: Any) -> str | tuple[int, ...]:
    """A layer mode or an explicit list, checked by ``select_layers`` (depth checked later)."""
    if isinstance(value, str):
        if value not in LAYER_MODES:
            raise ValueError(
                f"must be one of {', '.join(LAYER_MODES)} or a list of 1-based layer numbers"
            )
        return value
    if not isinstance(value, list | tuple):
        raise ValueError(
            f"must be one of {', '.join(LAYER_MODES)} or a list of 1-based layer numbers"
        )
    numbers = [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    if any(n < 1 for n in numbers):
        raise ValueError("layer numbers are 1-based (>= 1; the embedding is not a layer)")
    select_layers(list(value), max([1, *numbers]))  # types, emptiness, duplicates
    return tuple(value)


LayerSpec = Annotated[
    str | tuple[int, ...],
    PlainValidator(_layer_spec, json_schema_input_type=str | list[int]),
    PlainSerializer(lambda v: v if isinstance(v, str) else list(v), when_used="json"),
]

Positions = adopt(
    PositionSpec,
    {
        "mode": "Supervised response positions: all, last, first_k or last_k (paper: last_k).",
        "k": "Positions per response for first_k / last_k (paper: 2000).",
        "anchor": "Which state stands for response token t: 'token' (computed at t; paper) or "
        "'prediction' (the state predicting t, one earlier; for very short responses).",
    },
)


class ProjectionSection(Section):
    """How student states meet teacher states when widths (or architectures) differ."""

    mode: Literal[PROJECTION_MODES] = "identity"  # type: ignore[valid-type]
    """'identity' (equal widths), 'full' (trainable d_T x d_S map) or 'bridge' (frozen
    low-rank OPRD-Bridge projections from bridge_path)."""
    per_layer: bool = True
    """With 'full': one map per supervised layer; false: one map shared by all layers."""
    bridge_path: str | None = None
    """With 'bridge': the bridge file built offline (stage 1)."""
    init_std: float | None = Field(None, gt=0)
    """With 'full': standard deviation of the initial maps; null: 1/sqrt(d_S)."""
    seed: int = Field(0, ge=0)
    """With 'full': seed of the maps' initialisation."""

    @model_validator(mode="after")
    def _options_fit_mode(self) -> ProjectionSection:
        if self.mode != "bridge" and self.bridge_path is not None:
            raise invalid("bridge_path", self.bridge_path, "only mode 'bridge' reads a bridge")
        return self


def _check_kernel(options: KernelOptions) -> KernelOptions:
    """The implementations ``projected_mse`` knows and a positive workspace."""
    if options.impl not in IMPLS:
        raise ValueError(f"kernel.impl: {options.impl!r} is not one of {IMPLS}")
    if options.workspace_bytes is not None and options.workspace_bytes <= 0:
        raise ValueError(f"kernel.workspace_bytes: {options.workspace_bytes} must be positive")
    return options


Kernel = adopt(
    KernelOptions,
    {
        "impl": "'auto' (triton on CUDA, torch elsewhere), 'triton', 'torch' or 'reference'.",
        "recompute": "Save nothing in forward and recompute the projection in backward (one "
        "more GEMM).",
        "workspace_bytes": "Chunk workspace of the torch path; null: 64 MiB.",
    },
    check=_check_kernel,
    derived={"normalize": "distillation.normalize"},
)


class DistillationSection(Section):
    """The loss: OPRD, OPD baselines, or OPD + mu * OPRD (``StepOptions``)."""

    method: Method = "oprd"
    """'oprd' (representation alignment), 'opd-top1' (sampled-token reverse KL), 'opd-topk'
    (KL on the student's top-k) or 'combined' (L_OPD + mu * loss_coef * L_OPRD)."""
    opd: Literal["opd-top1", "opd-topk"] = "opd-top1"
    """The OPD term of 'combined'."""
    top_k: int = Field(16, ge=1)
    """k of opd-topk (paper: 16)."""
    mu: float = Field(10.0, ge=0)
    """Weight of L_OPRD in 'combined' (paper: 0, 1, 10; 10 best); must be > 0 there."""
    loss_coef: float = Field(1.0, gt=0)
    """Coefficient of the OPRD loss (normalized MSE needs ~100-1000x plain MSE's)."""
    opd_chunk_tokens: int = Field(1024, ge=1)
    """Tokens whose logits are formed at a time in OPD (no [tokens, vocab] tensor exists)."""
    target_dtype: DType = "bfloat16"
    """Dtype of the teacher targets sent to the student."""
    overlap_teacher: bool = False
    """Run the teacher's forward of microbatch i+1 while the student runs microbatch i (on a
    side CUDA stream; in order on CPU) instead of all teacher targets before the student.
    Without pipeline parallelism only; with several teachers each teacher on the student's
    layout runs ahead on the microbatches routed to it, and a teacher on its own `parallel`
    layout runs its pass first, as with false."""
    layers: LayerSpec = "all"
    """Supervised student layers: last, all, even, odd (authors' parity) or a list of 1-based
    layers (paper: all). Each is paired with teacher layer phi(l) (first and last aligned),
    or, for a student made by `oprd-mega prune` from a teacher this deep, with the teacher
    layer it was copied from (recorded in its config.json)."""
    positions: Positions = PositionSpec()
    """Supervised response positions."""
    normalize: bool = False
    """L2-normalise both sides before the MSE (normalized MSE); false: plain MSE (paper's
    same-architecture runs). The bridge needs true."""
    projection: ProjectionSection = ProjectionSection()
    """Student-to-teacher projection."""
    kernel: Kernel = KernelOptions()
    """Loss kernel options."""

    @property
    def uses_oprd(self) -> bool:
        """Whether the representation loss is part of the objective."""
        return self.method in ("oprd", "combined")

    @property
    def opd_term(self) -> str | None:
        """The output-space term in use ('opd-top1', 'opd-topk') or None."""
        if self.method == "combined":
            return self.opd
        return self.method if self.method.startswith("opd-") else None

    def step_options(self) -> StepOptions:
        """The step's options."""
        return StepOptions(
            method=self.method,
            opd=self.opd,
            top_k=self.top_k,
            mu=self.mu,
            loss_coef=self.loss_coef,
            kernel=self.kernel,
            target_dtype=getattr(torch, self.target_dtype),
            opd_chunk_tokens=self.opd_chunk_tokens,
            overlap_teacher=self.overlap_teacher,
        )

    def projection_spec(self, projection: ProjectionSection | None = None) -> ProjectionSpec:
        """The ``ProjectionSpec`` of ``attach_projection`` for ``projection`` (a teacher's
        effective ``teachers[i].projection``; default ``distillation.projection``)."""
        section = self.projection if projection is None else projection
        return ProjectionSpec(normalize=self.normalize, **section.model_dump())

    @model_validator(mode="before")
    @classmethod
    def _one_normalize_switch(cls, data: Any) -> Any:
        """distillation.normalize is the kernel's (and the projection's) normalize."""
        if not isinstance(data, dict):
            return data
        kernel = data.get("kernel", {})
        if isinstance(kernel, dict):
            if "normalize" in kernel:
                raise invalid(
                    "kernel.normalize",
                    kernel["normalize"],
                    "set distillation.normalize instead (one switch for kernel and projection)",
                )
            normalize = data.get("normalize", False)
            if isinstance(normalize, bool):
                data = {**data, "kernel": {**kernel, "normalize": normalize}}
        return data

    @model_validator(mode="after")
    def _method_options(self) -> DistillationSection:
        if self.kernel.normalize != self.normalize:
            raise invalid(
                "kernel", self.kernel, "kernel.normalize must equal distillation.normalize"
            )
        try:  # the rules of the step's own option types
            self.step_options()
            self.projection_spec()
        except OptionError as exc:
            raise invalid(exc.key.removeprefix("distillation."), exc.value, exc.reason) from exc
        return self
