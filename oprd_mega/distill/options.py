"""Options of the distillation step's parts that load no Megatron, so the config can adopt them."""

from __future__ import annotations

from dataclasses import dataclass


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
