"""Stage 1's plan before any forward: the supervised positions of every rollout in both models'
tokenizations, the global row selection, the data-parallel split and the microbatches.

Pure functions (no Megatron, no process group). Rows are numbered globally in sample order, then
position order within a sample, so :func:`oprd_mega.bridge.sampling.select_rows` chooses the same
rows whatever the data-parallel size, and the gathered rows of both models pair up one to one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from oprd_mega.distill.positions import PositionSpec, padded_position_mask

from .sampling import RowSelection


@dataclass(frozen=True)
class PairedSequence:
    """One rollout as both models read it: token ids and the supervised positions, paired one
    to one (``student_positions[k]`` and ``teacher_positions[k]`` are the k-th row)."""

    student_ids: tuple[int, ...]
    student_positions: tuple[int, ...]
    teacher_ids: tuple[int, ...]
    teacher_positions: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.student_positions) != len(self.teacher_positions):
            raise ValueError(
                f"paired sequence: {len(self.student_positions)} student positions but "
                f"{len(self.teacher_positions)} teacher positions"
            )
        for name, ids, positions in (
            ("student", self.student_ids, self.student_positions),
            ("teacher", self.teacher_ids, self.teacher_positions),
        ):
            if positions and not 0 <= min(positions) <= max(positions) < len(ids):
                raise ValueError(
                    f"paired sequence: {name} positions {min(positions)}..{max(positions)} "
                    f"outside its {len(ids)} tokens"
                )

    @property
    def rows(self) -> int:
        """Supervised token rows of this sequence."""
        return len(self.student_positions)


def supervised_positions(prompt_length: int, response_length: int, spec: PositionSpec) -> list[int]:
    """Positions in ``[prompt | response]`` whose states are supervised (the step's rule)."""
    total = prompt_length + response_length
    mask = padded_position_mask([prompt_length], [response_length], total, spec)
    return mask[0].nonzero().squeeze(1).tolist()


def same_tokenizer_sequence(
    prompt_ids: Sequence[int], response_ids: Sequence[int], spec: PositionSpec
) -> PairedSequence:
    """Both models read the same tokens; the supervised positions are the same too."""
    ids = (*prompt_ids, *response_ids)
    positions = tuple(supervised_positions(len(prompt_ids), len(response_ids), spec))
    return PairedSequence(ids, positions, ids, positions)


def data_parallel_share(
    rows_per_sequence: Sequence[int], dp_size: int, dp_rank: int
) -> tuple[range, int]:
    """The contiguous block of sequences of data-parallel rank ``dp_rank`` and the global index
    of its first row (blocks differ in length by at most one sequence)."""
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"data-parallel rank {dp_rank} outside 0..{dp_size - 1}")
    count = len(rows_per_sequence)
    base, extra = divmod(count, dp_size)
    start = dp_rank * base + min(dp_rank, extra)
    stop = start + base + (1 if dp_rank < extra else 0)
    return range(start, stop), int(sum(rows_per_sequence[:start]))


@dataclass(frozen=True)
class WorkItem:
    """A sequence and the rows of it that were selected (indices into its supervised rows)."""

    sequence: PairedSequence
    rows: tuple[int, ...]

    def positions(self, side: str) -> list[int]:
        """The selected positions in the ``student`` or ``teacher`` tokenization."""
        positions = getattr(self.sequence, f"{side}_positions")
        return [positions[k] for k in self.rows]

    def needed_ids(self, side: str) -> tuple[int, ...]:
        """The prefix of ``side``'s tokens up to the last selected position (causal models:
        later tokens cannot change it)."""
        ids = getattr(self.sequence, f"{side}_ids")
        return ids[: max(self.positions(side)) + 1]


def plan_work(
    sequences: Sequence[PairedSequence], selected: torch.Tensor, share: range, first_row: int
) -> list[WorkItem]:
    """The sequences of ``share`` that hold selected rows, with those rows (in stream order)."""
    selection = RowSelection(selected, start=first_row)
    items = []
    for index in share:
        local = selection.take(sequences[index].rows)
        if local.numel():
            items.append(WorkItem(sequences[index], tuple(local.tolist())))
    return items


def microbatches(items: Sequence[WorkItem], max_tokens: int) -> list[list[WorkItem]]:
    """Consecutive items grouped so that ``batch * longest prefix`` (either model) stays within
    ``max_tokens``; an item longer than the budget gets a microbatch of its own."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens: must be positive, got {max_tokens}")
    batches: list[list[WorkItem]] = []
    current: list[WorkItem] = []
    longest = 0
    for item in items:
        length = max(len(item.needed_ids("student")), len(item.needed_ids("teacher")))
        if current and (len(current) + 1) * max(longest, length) > max_tokens:
            batches.append(current)
            current, longest = [], 0
        current.append(item)
        longest = max(longest, length)
    if current:
        batches.append(current)
    return batches


def batch_tensors(
    items: Sequence[WorkItem], side: str, pad_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded tokens [batch, seq] of ``side`` and the (position, column) index pair of
    the selected rows, in stream order (item by item, position order within an item)."""
    prefixes = [item.needed_ids(side) for item in items]
    tokens = torch.full((len(items), max(map(len, prefixes))), pad_id, dtype=torch.long)
    positions, columns = [], []
    for column, (item, ids) in enumerate(zip(items, prefixes, strict=True)):
        tokens[column, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        chosen = item.positions(side)
        positions.extend(chosen)
        columns.extend([column] * len(chosen))
    return (
        tokens,
        torch.tensor(positions, dtype=torch.long),
        torch.tensor(columns, dtype=torch.long),
    )
