"""The load-balanced context-parallel split against Megatron's formulation and its purpose."""

from __future__ import annotations

import itertools

import pytest
import torch

from oprd_mega.parallel.context import check_slots, context_positions, gathered_positions


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
@pytest.mark.parametrize("seq", [24, 48])
def test_a_row_splits_as_megatron_views_it(cp: int, seq: int) -> None:
    """Megatron's get_batch_on_this_cp_rank: view [2cp, seq/2cp], take rows r and 2cp-1-r."""
    for rank in range(cp):
        chunks = torch.arange(seq).view(2 * cp, -1)
        want = chunks[[rank, 2 * cp - 1 - rank]].reshape(-1) if cp > 1 else torch.arange(seq)
        assert torch.equal(context_positions([0, seq], cp, rank), want)


@pytest.mark.parametrize("cp", [2, 3])
def test_packed_sequences_split_one_by_one_and_balance_causal_work(cp: int) -> None:
    bounds = [0, 4 * cp, 6 * cp, 12 * cp]
    gathered = gathered_positions(bounds, cp)
    assert sorted(gathered.tolist()) == list(range(bounds[-1]))  # every token exactly once
    work = []
    for rank in range(cp):
        mine = context_positions(bounds, cp, rank)
        for start, stop in itertools.pairwise(bounds):  # each sequence's share, in order
            inside = mine[(mine >= start) & (mine < stop)]
            assert len(inside) == (stop - start) // cp
        # causal work of a query = its position within its sequence + 1 keys
        starts = torch.tensor(bounds[:-1])
        offsets = mine - starts[torch.searchsorted(starts, mine, right=True) - 1]
        work.append(int((offsets + 1).sum()))
    assert len(set(work)) == 1, work


def test_a_sequence_that_does_not_split_is_named() -> None:
    with pytest.raises(ValueError, match="sequence 1 spans 6 tokens, not a multiple of 2 x cp = 4"):
        check_slots([0, 8, 14], 2)
    with pytest.raises(ValueError, match="rank 2 is outside 0..1"):
        context_positions([0, 8], 2, 2)
