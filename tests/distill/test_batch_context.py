"""Microbatches split for context parallelism: every rank's rows are the full microbatch's rows
at its load-balanced positions, and packed slots are padded so that every sequence splits."""

from __future__ import annotations

import itertools

import pytest
import torch

from oprd_mega.distill.batch import context_shard, make_microbatch, make_packed_microbatch
from oprd_mega.distill.positions import PositionSpec

SEQUENCES = [list(range(1, 12)), list(range(20, 25)), list(range(30, 39))]
PROMPTS = [4, 2, 3]
LAST3 = PositionSpec("last_k", 3)


def _rows(batch, name: str) -> torch.Tensor:
    return getattr(batch, name)


@pytest.mark.parametrize("packed", [False, True])
def test_every_rank_holds_the_full_rows_at_its_positions(packed: bool) -> None:
    cp = 2
    if packed:
        full = make_packed_microbatch(0, SEQUENCES, PROMPTS, 32, LAST3, slot_multiple=2 * cp)
        starts = full.cu_seqlens.tolist()
    else:
        full = make_microbatch(0, SEQUENCES, PROMPTS, 12, LAST3)
        starts = [0, 12]
    seen = []
    for rank in range(cp):
        local = context_shard(full, cp, rank)
        assert local.shape == full.shape and local.context_parallel == cp
        assert local.tokens.shape[1] == full.tokens.shape[1] // cp
        # the independent picture: each sequence in 2cp chunks, this rank's two in order
        want = []
        for start, stop in itertools.pairwise(starts):
            chunk = (stop - start) // (2 * cp)
            for index in (rank, 2 * cp - 1 - rank):
                want += range(start + index * chunk, start + (index + 1) * chunk)
        seen += want
        for name in ("tokens", "supervised", "predicts", "labels"):
            assert torch.equal(_rows(local, name), _rows(full, name)[:, want]), name
    assert sorted(seen) == list(range(full.tokens.shape[1]))


def test_packed_slots_pad_each_sequence_and_keep_every_mask() -> None:
    plain = make_packed_microbatch(0, SEQUENCES, PROMPTS, 32, LAST3)
    padded = make_packed_microbatch(0, SEQUENCES, PROMPTS, 32, LAST3, slot_multiple=4)
    assert padded.cu_seqlens.tolist() == [0, 12, 20, 32]
    for name in ("supervised", "predicts"):
        assert int(_rows(padded, name).sum()) == int(_rows(plain, name).sum()), name
    assert padded.tokens[0, :11].tolist() == SEQUENCES[0] and padded.tokens[0, 11] == 0
    assert padded.labels[padded.predicts].tolist() == plain.labels[plain.predicts].tolist()
    with pytest.raises(ValueError, match="not a multiple of the slot multiple 4"):
        make_packed_microbatch(0, SEQUENCES, PROMPTS, 30, LAST3, slot_multiple=4)
    with pytest.raises(ValueError, match=r"hold 40 tokens \(slots padded to multiples of 8\)"):
        make_packed_microbatch(0, SEQUENCES, PROMPTS, 24, LAST3, slot_multiple=8)


def test_a_sequence_that_cannot_split_is_named() -> None:
    packed = make_packed_microbatch(3, SEQUENCES, PROMPTS, 28, LAST3)  # slots 11, 5, 9, 3
    with pytest.raises(ValueError, match="microbatch 3 .*sequence 0 spans 11 tokens"):
        context_shard(packed, 2, 0)
    assert context_shard(packed, 1, 0) is packed
