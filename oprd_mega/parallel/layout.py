"""The parallel layout of the models: tensor, pipeline, context and data parallel sizes; the
teacher may run on its own tensor/pipeline sizes over the same ranks."""

from __future__ import annotations

from dataclasses import dataclass

from oprd_mega.errors import is_positive_int


@dataclass(frozen=True)
class TeacherLayout:
    """The teacher's own tensor (``tp``) and pipeline (``pp``) sizes; ``None``: the student's.

    The teacher then runs in its own Megatron groups over the same ranks, with its own
    data-parallel size ``world_size // (tp * pp)``.
    """

    tp: int | None = None
    pp: int | None = None

    def __post_init__(self) -> None:
        for field in ("tp", "pp"):
            value = getattr(self, field)
            if value is not None and not is_positive_int(value):
                raise ValueError(
                    f"TeacherLayout.{field} must be a positive integer or None (the student's), "
                    f"got {value!r}"
                )


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
    teacher: TeacherLayout = TeacherLayout()

    def __post_init__(self) -> None:
        for field in ("tp", "pp", "cp"):
            value = getattr(self, field)
            if not is_positive_int(value):
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

    def teacher_layout(self) -> ParallelLayout:
        """The teacher's layout: its own tp/pp where set, the student's otherwise. On a layout
        of its own the teacher runs without sequence or context parallelism: it ships whole
        rows and each student rank keeps the rows of its context chunks and sequence shard."""
        tp = self.tp if self.teacher.tp is None else self.teacher.tp
        pp = self.pp if self.teacher.pp is None else self.teacher.pp
        if (tp, pp) == (self.tp, self.pp):
            return ParallelLayout(tp=self.tp, pp=self.pp, sp=self.sp, cp=self.cp)
        return ParallelLayout(tp=tp, pp=pp)

    @property
    def teacher_has_own_layout(self) -> bool:
        """Whether the teacher's tp/pp differ from the student's (own Megatron groups)."""
        layout = self.teacher_layout()
        return (layout.tp, layout.pp) != (self.tp, self.pp)

    def __str__(self) -> str:
        text = (
            f"TP{self.tp}PP{self.pp}"
            + (f"CP{self.cp}" if self.cp > 1 else "")
            + ("+SP" if self.sp else "")
        )
        if self.teacher_has_own_layout:
            teacher = self.teacher_layout()
            text += f" (teacher TP{teacher.tp}PP{teacher.pp})"
        return text
