"""Context parallelism's load-balanced sequence split, as pure functions of sequence bounds.

Under causal attention the last tokens of a sequence attend to the most keys. Megatron
(``get_batch_on_this_cp_rank``) and Transformer Engine's THD partition therefore cut every
sequence into ``2 * cp`` equal chunks and give rank ``r`` chunks ``r`` and ``2 * cp - 1 - r``:
every rank gets one cheap and one expensive chunk. A padded microbatch row is one sequence; a
packed row (THD) splits each of its sequences (``cu_seqlens`` slots) the same way, so every slot
must be a multiple of ``2 * cp`` tokens. A rank's tokens are its two chunks of the first slot,
then of the second, and so on.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch


def check_slots(bounds: Sequence[int], cp: int) -> None:
    """Raise unless every slot ``[bounds[i], bounds[i + 1])`` splits into ``2 * cp`` chunks."""
    if cp < 1:
        raise ValueError(f"context parallel size must be positive, got {cp}")
    if cp == 1:
        return
    for index, (start, stop) in enumerate(itertools.pairwise(bounds)):
        if (stop - start) % (2 * cp):
            raise ValueError(
                f"context parallelism (cp = {cp}): sequence {index} spans {stop - start} tokens, "
                f"not a multiple of 2 x cp = {2 * cp} (pad it to "
                "oprd_mega.models.shapes.sequence_multiple)"
            )


def context_positions(bounds: Sequence[int], cp: int, rank: int) -> torch.Tensor:
    """Positions (into the full row) of the tokens context-parallel ``rank`` holds, in its
    local order: for each slot, chunk ``rank`` then chunk ``2 * cp - 1 - rank``. ``[seq / cp]``
    int64."""
    check_slots(bounds, cp)
    if not 0 <= rank < cp:
        raise ValueError(f"context parallel rank {rank} is outside 0..{cp - 1}")
    pieces = []
    for start, stop in itertools.pairwise(bounds):
        chunk = (stop - start) // (2 * cp)
        for index in (rank, 2 * cp - 1 - rank) if cp > 1 else (0,):
            first = start + index * chunk
            pieces.append(torch.arange(first, first + (chunk if cp > 1 else stop - start)))
    if not pieces:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat(pieces)


def gathered_positions(bounds: Sequence[int], cp: int) -> torch.Tensor:
    """Positions of the rows of an all-gather over the context-parallel group (rank 0's tokens
    first): a permutation of ``range(bounds[0], bounds[-1])``."""
    return torch.cat([context_positions(bounds, cp, rank) for rank in range(cp)])
