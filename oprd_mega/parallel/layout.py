"""The parallel layout of one model: tensor, pipeline, context and data parallel sizes."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ParallelLayout:
    """Tensor (``tp``), pipeline (``pp``), context (``cp``) parallel sizes and sequence
    parallelism (``sp``).

    The data-parallel size follows from the world size: ``world_size // (tp * pp * cp)``.
    """

    tp: int = 1
    pp: int = 1
    sp: bool = False
    cp: int = 1

    def __post_init__(self) -> None:
        for field in ("tp", "pp", "cp"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"ParallelLayout.{field} must be a positive integer, got {value!r}"
                )
        if self.sp and self.tp == 1:
            raise ValueError("ParallelLayout.sp (sequence parallelism) needs tp > 1")

    def data_parallel_size(self, world_size: int) -> int:
        """The data-parallel size for ``world_size`` processes; raises if it does not divide."""
        model_parallel = self.tp * self.pp * self.cp
        if world_size % model_parallel:
            raise ValueError(
                f"world size {world_size} is not divisible by tp*pp*cp = "
                f"{self.tp}*{self.pp}*{self.cp}"
            )
        return world_size // model_parallel

    def __str__(self) -> str:
        return (
            f"TP{self.tp}PP{self.pp}"
            + (f"CP{self.cp}" if self.cp > 1 else "")
            + ("+SP" if self.sp else "")
        )
