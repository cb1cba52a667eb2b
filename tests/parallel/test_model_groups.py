"""The teacher's own groups (parallel.teacher) follow Megatron's rank order: tp fastest, then
cp, dp, pp; the word embeddings on the first and last stage, the position embeddings on the
first. Written out by hand for small worlds (the step tests run the groups themselves)."""

from __future__ import annotations

import pytest

from oprd_mega.parallel.layout import ParallelLayout
from oprd_mega.parallel.model_groups import group_ranks


def test_tp2_pp2_over_eight_ranks() -> None:
    got = group_ranks(ParallelLayout(tp=2, pp=2), 8)
    assert got["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert got["dp"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert got["pp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert got["mp"] == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert got["cp"] == [[rank] for rank in range(8)]
    assert got["dp_cp"] == got["dp"]
    assert got["embd"] == got["pp"]  # both stages hold the word embeddings
    assert got["pos_embd"] == [[0], [1], [2], [3]]


def test_pure_data_parallel_and_context_parallel_over_four_ranks() -> None:
    dp4 = group_ranks(ParallelLayout(), 4)
    assert dp4["dp"] == [[0, 1, 2, 3]]
    assert dp4["tp"] == dp4["pp"] == dp4["embd"] == [[0], [1], [2], [3]]
    cp2 = group_ranks(ParallelLayout(cp=2), 4)
    assert cp2["cp"] == [[0, 1], [2, 3]]
    assert cp2["dp"] == [[0, 2], [1, 3]]
    assert cp2["dp_cp"] == [[0, 1, 2, 3]]
    assert cp2["tp_cp"] == [[0, 1], [2, 3]]


def test_a_layout_that_does_not_divide_the_world_is_refused() -> None:
    with pytest.raises(ValueError, match="world size 4 is not divisible by tp\\*pp\\*cp = 3"):
        group_ranks(ParallelLayout(tp=3), 4)
