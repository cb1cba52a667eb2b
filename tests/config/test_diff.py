"""config_diff: the keys a resumed run changed."""

from __future__ import annotations

from oprd_mega.config import config_diff
from tests.config.helpers import minimal


def test_equal_configs_have_no_diff() -> None:
    assert config_diff(minimal(), minimal()) == []


def test_changed_leaves_are_listed_in_schema_order() -> None:
    old = minimal()
    new = minimal("optimizer.lr=2e-5", "distillation.layers=[1, 2]", "rollout.sampling.n=4")
    assert config_diff(old, new) == [
        ("rollout.sampling.n", 2, 4),
        ("distillation.layers", "all", [1, 2]),
        ("optimizer.lr", 1e-5, 2e-5),
    ]


def test_a_section_set_on_one_side_shows_once() -> None:
    old = minimal()
    new = minimal("evaluation.sampling.temperature=0.5")
    ((key, before, after),) = config_diff(old, new)
    assert (key, before) == ("evaluation.sampling", None)
    assert after["temperature"] == 0.5 and after["n"] == 16
