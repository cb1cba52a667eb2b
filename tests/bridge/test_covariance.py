"""Streaming float64 covariance against numpy on all rows; merges and the DP reduce."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

from oprd_mega.bridge import StreamingCovariance, all_reduce_covariance


def _rows(seed: int, n: int, d: int, offset: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (offset + torch.randn(n, d, generator=g, dtype=torch.float64) * 3).to(torch.float32)


def _splits(n: int, cuts: list[int]) -> list[slice]:
    points = sorted({0, n, *(c % (n + 1) for c in cuts)})
    return [slice(a, b) for a, b in itertools.pairwise(points)]


@settings(max_examples=40)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(2, 50),
    d=st.integers(1, 6),
    cuts=st.lists(st.integers(0, 60), max_size=6),
    offset=st.sampled_from([0.0, 1e3]),
)
def test_streaming_equals_numpy_on_all_rows(seed, n, d, cuts, offset) -> None:
    rows = _rows(seed, n, d, offset)
    stream = StreamingCovariance(d)
    for part in _splits(n, cuts):
        stream.update(rows[part])
    reference = rows.numpy().astype(np.float64)
    assert stream.count == n
    np.testing.assert_allclose(stream.mean.numpy(), reference.mean(0), rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(
        stream.covariance().numpy(),
        np.cov(reference, rowvar=False, bias=True).reshape(d, d),
        rtol=1e-9,
        atol=1e-9,
    )
    np.testing.assert_allclose(
        stream.covariance(unbiased=True).numpy(),
        np.cov(reference, rowvar=False).reshape(d, d),
        rtol=1e-9,
        atol=1e-9,
    )


@settings(max_examples=30)
@given(seed=st.integers(0, 10_000), cuts=st.lists(st.integers(0, 40), max_size=5))
def test_merge_of_split_streams_equals_one_stream(seed, cuts) -> None:
    rows = _rows(seed, 40, 5, 50.0)
    whole = StreamingCovariance(5).update(rows)
    parts = [StreamingCovariance(5).update(rows[s]) for s in _splits(40, cuts)]
    parts.append(StreamingCovariance(5))  # an empty stream changes nothing
    # Merge as a tree (pairs), not left to right, as a reduction would.
    while len(parts) > 1:
        parts = [
            parts[i].merged(parts[i + 1]) if i + 1 < len(parts) else parts[i]
            for i in range(0, len(parts), 2)
        ]
    merged = parts[0]
    assert merged.count == whole.count
    torch.testing.assert_close(merged.mean, whole.mean, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(merged.scatter, whole.scatter, rtol=1e-11, atol=1e-8)


def test_shifted_sums_add_across_ranks() -> None:
    """What the all-reduce computes, simulated for three ranks (one empty)."""
    rows = _rows(3, 90, 4, 1e4)
    ranks = [rows[:50], rows[50:50], rows[50:]]
    streams = [StreamingCovariance(4).update(part) for part in ranks]
    shift = streams[0].mean
    total = sum(stream.shifted_sums(shift) for stream in streams)
    reduced = StreamingCovariance.from_shifted_sums(total, shift)
    whole = StreamingCovariance(4).update(rows)
    assert reduced.count == 90
    torch.testing.assert_close(reduced.mean, whole.mean, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(reduced.covariance(), whole.covariance(), rtol=1e-9, atol=1e-9)


def test_all_reduce_in_a_gloo_group_of_one() -> None:
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        rows = _rows(4, 30, 3, 10.0)
        stream = StreamingCovariance(3).update(rows)
        reduced = all_reduce_covariance(stream)
        torch.testing.assert_close(reduced.covariance(), stream.covariance())
        torch.testing.assert_close(reduced.mean, stream.mean)
    finally:
        dist.destroy_process_group()


def test_errors_name_the_problem() -> None:
    stream = StreamingCovariance(3)
    with pytest.raises(ValueError, match=r"rows must be \[tokens, 3\]"):
        stream.update(torch.zeros(4, 2))
    with pytest.raises(ValueError, match="0 row"):
        stream.covariance()
    with pytest.raises(ValueError, match="dim 2 != 3"):
        stream.merge_(StreamingCovariance(2))
