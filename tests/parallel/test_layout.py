"""ParallelLayout validation."""

import pytest

from oprd_mega.parallel import ParallelLayout


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


def test_context_parallel_takes_its_share_of_the_world() -> None:
    layout = ParallelLayout(tp=2, cp=2, sp=True)
    assert layout.data_parallel_size(8) == 2 and str(layout) == "TP2PP1CP2+SP"
    with pytest.raises(ValueError, match=r"tp\*pp\*cp = 2\*1\*2"):
        layout.data_parallel_size(6)
