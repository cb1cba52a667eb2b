"""ParallelLayout validation."""

import pytest

from oprd_mega.parallel import ParallelLayout
from oprd_mega.parallel.layout import TeacherLayout


def test_valid_layout() -> None:
    layout = ParallelLayout(tp=2, pp=2, sp=True)
    assert layout.data_parallel_size(8) == 2 and str(layout) == "TP2PP2+SP"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"tp": 0}, "tp"), ({"pp": -1}, "pp"), ({"cp": 0}, "cp"), ({"sp": True}, "sp")],
)
def test_invalid_layout(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ParallelLayout(**kwargs)


def test_world_size_must_divide() -> None:
    with pytest.raises(ValueError, match="not divisible"):
        ParallelLayout(tp=2, pp=2).data_parallel_size(6)


def test_teacher_layout_defaults_to_the_students() -> None:
    layout = ParallelLayout(tp=2, pp=2, sp=True)
    assert layout.teacher_layout() == ParallelLayout(tp=2, pp=2, sp=True)
    assert not layout.teacher_has_own_layout


def test_teacher_layout_of_its_own_runs_without_sequence_parallelism() -> None:
    layout = ParallelLayout(tp=2, pp=2, sp=True, teacher=TeacherLayout(tp=4))
    assert layout.teacher_layout() == ParallelLayout(tp=4, pp=2)
    assert layout.teacher_has_own_layout
    assert str(layout) == "TP2PP2+SP (teacher TP4PP2)"
    assert (
        ParallelLayout(tp=2, teacher=TeacherLayout(tp=1)).teacher_layout().data_parallel_size(2)
        == 2
    )


@pytest.mark.parametrize("kwargs", [{"tp": 0}, {"pp": -2}, {"tp": 1.5}])
def test_invalid_teacher_layout(kwargs: dict) -> None:
    field = next(iter(kwargs))
    with pytest.raises(ValueError, match=f"TeacherLayout.{field}"):
        TeacherLayout(**kwargs)


def test_context_parallel_takes_its_share_of_the_world() -> None:
    layout = ParallelLayout(tp=2, cp=2, sp=True)
    assert layout.data_parallel_size(8) == 2 and str(layout) == "TP2PP1CP2+SP"
    with pytest.raises(ValueError, match=r"tp\*pp\*cp = 2\*1\*2"):
        layout.data_parallel_size(6)
