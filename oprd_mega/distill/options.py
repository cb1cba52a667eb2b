"""Options of the distillation step's parts that load no Megatron, so the config can adopt them."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from oprd_mega.distill.taps import KernelOptions

METHODS = ("oprd", "opd-top1", "opd-topk", "combined")
PROJECTION_MODES = ("identity", "full", "bridge")


class OptionError(ValueError):
    """A bad option value; ``key`` (dotted, as in the config) and ``value`` name it and
    ``reason`` says what is allowed, so the config reports it at the key it came from."""

    def __init__(self, key: str, value: object, reason: str) -> None:
        super().__init__(f"{key}: {value!r}: {reason}")
        self.key, self.value, self.reason = key, value, reason


@dataclass(frozen=True)
class OptimizerOptions:
    """AdamW over the student chunk (projection included): Megatron's optimizer options."""

    lr: float
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_grad: float = 0.0
    use_distributed_optimizer: bool = False

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"optimizer.lr: {self.lr} must be > 0")
        if self.weight_decay < 0:
            raise ValueError(f"optimizer.weight_decay: {self.weight_decay} must be >= 0")
        if len(self.betas) != 2:
            raise ValueError(f"optimizer.betas: {self.betas!r} must be (beta1, beta2)")
        for index, beta in enumerate(self.betas):
            if not 0 <= beta < 1:
                raise ValueError(f"optimizer.betas[{index}]: {beta} must be in [0, 1)")
        if not self.eps > 0:
            raise ValueError(f"optimizer.eps: {self.eps} must be > 0")
        if self.clip_grad < 0:
            raise ValueError(f"optimizer.clip_grad: {self.clip_grad} must be >= 0 (0: off)")


@dataclass(frozen=True)
class StepOptions:
    """The objective and how it is computed."""

    method: str = "oprd"
    opd: str = "opd-top1"  # the OPD term of ``combined``
    top_k: int = 16
    mu: float = 10.0
    loss_coef: float = 1.0
    kernel: KernelOptions = field(default_factory=KernelOptions)
    target_dtype: torch.dtype = torch.bfloat16
    opd_chunk_tokens: int = 1024
    overlap_teacher: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"distillation.method: {self.method!r} is not one of {METHODS}")
        if self.opd not in ("opd-top1", "opd-topk"):
            raise ValueError(f"distillation.opd: {self.opd!r} is not 'opd-top1' or 'opd-topk'")
        if self.top_k < 1:
            raise ValueError(f"distillation.top_k: {self.top_k} must be >= 1")
        if self.method == "combined" and self.mu <= 0:
            raise OptionError(
                "distillation.mu", self.mu, "method 'combined' needs mu > 0 (L_OPD + mu * L_OPRD)"
            )

    @property
    def uses_oprd(self) -> bool:
        """Whether the representation loss is part of the objective."""
        return self.method in ("oprd", "combined")

    @property
    def oprd_weight(self) -> float:
        """Coefficient of L_OPRD in the objective (0: not used)."""
        if self.method == "oprd":
            return self.loss_coef
        return self.mu * self.loss_coef if self.method == "combined" else 0.0

    @property
    def opd_kind(self) -> str | None:
        """``top1`` / ``topk`` when an OPD term is used."""
        term = self.opd if self.method == "combined" else self.method
        return {"opd-top1": "top1", "opd-topk": "topk"}.get(term)


@dataclass(frozen=True)
class ProjectionSpec:
    """Projection mode, per-layer or shared ``full`` maps, normalisation, bridge file."""

    mode: str = "identity"
    per_layer: bool = True
    normalize: bool = False
    bridge_path: str | None = None
    init_std: float | None = None  # full: default 1/sqrt(d_S)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in PROJECTION_MODES:
            raise ValueError(f"projection.mode: {self.mode!r} is not one of {PROJECTION_MODES}")
        if self.mode == "bridge" and self.bridge_path is None:
            raise OptionError(
                "distillation.projection.bridge_path",
                None,
                "mode 'bridge' needs the bridge file's path",
            )
        if self.mode == "bridge" and not self.normalize:
            raise OptionError(
                "distillation.normalize",
                False,
                "projection 'bridge' is trained for normalized MSE; set distillation.normalize"
                "=true",
            )
