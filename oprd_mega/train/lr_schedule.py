"""The learning rate of every optimizer step: linear warm-up, then cosine, linear or no decay."""

from __future__ import annotations

import math
from typing import Any, Literal

Decay = Literal["cosine", "linear", "constant"]


def learning_rate(
    step: int, *, lr: float, min_lr: float, steps: int, warmup: int, decay: Decay
) -> float:
    """The learning rate of optimizer step ``step`` (0-based) of a ``steps``-step run.

    Warm-up rises linearly to ``lr`` over ``warmup`` steps (step ``warmup - 1`` reaches it);
    the decay then goes from ``lr`` to ``min_lr`` at the last step.
    """
    if not 0 <= step < steps:
        raise ValueError(f"step {step} is outside the run's steps 0..{steps - 1}")
    if step < warmup:
        return lr * (step + 1) / warmup
    if decay == "constant":
        return lr
    span = steps - 1 - warmup
    progress = 1.0 if span <= 0 else (step - warmup) / span
    if decay == "linear":
        return lr + (min_lr - lr) * progress
    if decay == "cosine":
        return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"schedule.decay: {decay!r} is not 'cosine', 'linear' or 'constant'")


def set_learning_rate(optimizer: Any, value: float) -> None:
    """Set every parameter group's learning rate (Megatron's ``lr_mult`` applied)."""
    for group in optimizer.param_groups:
        group["lr"] = value * group.get("lr_mult", 1.0)
