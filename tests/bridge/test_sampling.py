"""Row subsampling: exact count, uniform, seeded, independent of how the stream is split."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from oprd_mega.bridge import RowSelection, StreamingCovariance, select_rows


def test_select_rows_count_order_and_seed() -> None:
    chosen = select_rows(1000, 64, seed=3)
    assert chosen.numel() == 64 and chosen.unique().numel() == 64
    assert bool((chosen[1:] > chosen[:-1]).all()) and int(chosen.min()) >= 0 and chosen.max() < 1000
    assert torch.equal(chosen, select_rows(1000, 64, seed=3))
    assert not torch.equal(chosen, select_rows(1000, 64, seed=4))
    assert torch.equal(select_rows(10, 64), torch.arange(10))


def test_selection_is_uniform() -> None:
    counts = torch.zeros(20)
    for seed in range(2000):
        counts[select_rows(20, 5, seed)] += 1
    # Each row is chosen with probability 1/4: 500 expected, std ~19.
    assert float((counts - 500).abs().max()) < 100


@settings(max_examples=40)
@given(
    total=st.integers(0, 200),
    cap=st.integers(1, 50),
    batches=st.lists(st.integers(0, 40), max_size=12),
    ranks=st.integers(1, 3),
)
def test_batches_and_ranks_reproduce_the_global_choice(total, cap, batches, ranks) -> None:
    chosen = select_rows(total, cap, seed=1)
    bounds = [total * i // ranks for i in range(ranks + 1)]
    found = []
    for rank in range(ranks):
        selection = RowSelection(chosen, start=bounds[rank])
        position, sizes = bounds[rank], [*batches, total]
        for size in sizes:
            size = min(size, bounds[rank + 1] - position)
            found.extend((selection.take(size) + position).tolist())
            position += size
    assert found == chosen.tolist()


def test_streaming_the_selected_rows_equals_the_subsample() -> None:
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(500, 6, generator=g, dtype=torch.float64)
    chosen = select_rows(500, 100, seed=2)
    selection, stream = RowSelection(chosen), StreamingCovariance(6)
    for batch in rows.split(37):
        stream.update(batch[selection.take(batch.shape[0])])
    reference = torch.cov(rows[chosen].t(), correction=0)
    assert stream.count == 100
    torch.testing.assert_close(stream.covariance(), reference, rtol=1e-10, atol=1e-12)
