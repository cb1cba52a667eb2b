"""One distillation microbatch (right-padded rows, or sequences packed into one row) and its
row selections on this rank.

Megatron's hidden states are ``[seq, batch, hidden]``; flattened they are sequence-major, row
``s * batch + b``. Supervised rows are selected in that order; under sequence parallelism a
tensor-parallel rank holds the contiguous sequence shard ``[r * s / tp, (r + 1) * s / tp)``, so
its rows are the same selection restricted to its shard (teacher and student alike).

A packed microbatch is one row ``[1, seq]`` holding the sequences back to back (THD layout),
with ``cu_seqlens`` marking where each starts; the tail padding is one more sequence. The models
attend within each sequence only and restart rotary positions at each start
(:meth:`DistillMicrobatch.packed_seq_params`), so the masks and row selections stay the same
functions of a ``[batch, seq]`` layout.

Under context parallelism each rank keeps its load-balanced share of every sequence
(:func:`context_shard`, :mod:`oprd_mega.parallel.context`); tokens, masks and labels are split
alike, so every row selection above applies unchanged to the rank's ``[batch, seq / cp]``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams

from oprd_mega.distill.positions import (
    PositionSpec,
    packed_position_mask,
    padded_position_mask,
)
from oprd_mega.models.attention import thd_params
from oprd_mega.parallel.context import check_slots, context_positions


@dataclass(frozen=True)
class DistillMicrobatch:
    """Token ids and masks of one microbatch, all ``[batch, seq]``.

    ``supervised``: OPRD positions (response tokens chosen by the position spec).
    ``predicts``: OPD positions, those whose next token is a response token; ``labels`` holds
    that next token (0 elsewhere). ``cu_seqlens`` (int32, packed microbatches only): sequence
    boundaries within the single row. ``context_parallel``: the context-parallel size the
    tensors were split for (:func:`context_shard`; ``cu_seqlens`` stays the full row's).
    ``teachers``: the names of the teachers its samples are routed to (None: every teacher;
    empty: none, its samples are not supervised).
    """

    index: int
    tokens: torch.Tensor
    supervised: torch.Tensor
    predicts: torch.Tensor
    labels: torch.Tensor
    cu_seqlens: torch.Tensor | None = None
    context_parallel: int = 1
    teachers: tuple[str, ...] | None = None

    def routed_to(self, teacher: str) -> bool:
        """Whether teacher ``teacher`` supervises this microbatch."""
        return self.teachers is None or teacher in self.teachers

    @property
    def shape(self) -> tuple[int, int]:
        """``(batch, seq)`` of the full microbatch (``seq / cp`` tokens of it on this rank)."""
        return int(self.tokens.shape[0]), int(self.tokens.shape[1]) * self.context_parallel

    def packed_seq_params(self, device: torch.device | str) -> PackedSeqParams | None:
        """Megatron's THD description of a packed microbatch (``None`` when padded)."""
        if self.cu_seqlens is None:
            return None
        return thd_params(self.cu_seqlens.to(device=device, dtype=torch.int32))


def make_microbatch(
    index: int,
    sequences: Sequence[Sequence[int]],
    prompt_lengths: Sequence[int],
    seq_length: int,
    positions: PositionSpec,
    pad_id: int = 0,
) -> DistillMicrobatch:
    """Right-pad ``sequences`` (prompt + response ids) to ``seq_length`` and build the masks."""
    responses = _response_lengths(sequences, prompt_lengths)
    tokens = torch.full((len(sequences), seq_length), pad_id, dtype=torch.long)
    for row, ids in enumerate(sequences):
        if len(ids) > seq_length:
            raise ValueError(
                f"microbatch: sequence {row} has {len(ids)} tokens, more than seq_length "
                f"{seq_length}"
            )
        tokens[row, : len(ids)] = torch.tensor(list(ids), dtype=torch.long)
    supervised = padded_position_mask(prompt_lengths, responses, seq_length, positions)
    response = padded_position_mask(prompt_lengths, responses, seq_length, PositionSpec("all"))
    return _with_opd_masks(index, tokens, supervised, response)


def make_packed_microbatch(
    index: int,
    sequences: Sequence[Sequence[int]],
    prompt_lengths: Sequence[int],
    seq_length: int,
    positions: PositionSpec,
    pad_id: int = 0,
    slot_multiple: int = 1,
) -> DistillMicrobatch:
    """Pack ``sequences`` back to back into one row of ``seq_length`` tokens (THD layout).

    ``slot_multiple``: each sequence's slot is right-padded to a multiple of it (``2 * cp``
    under context parallelism, which splits every slot); ``seq_length`` must be one too.
    """
    _response_lengths(sequences, prompt_lengths)
    lengths = [len(ids) for ids in sequences]
    if 0 in lengths:
        raise ValueError(f"microbatch: sequence {lengths.index(0)} is empty")
    if seq_length % slot_multiple:
        raise ValueError(
            f"microbatch: seq_length {seq_length} is not a multiple of the slot multiple "
            f"{slot_multiple}"
        )
    padded = [-(-length // slot_multiple) * slot_multiple for length in lengths]
    if sum(padded) > seq_length:
        raise ValueError(
            f"microbatch: {len(sequences)} sequences hold {sum(padded)} tokens"
            + (f" (slots padded to multiples of {slot_multiple})" if slot_multiple > 1 else "")
            + f", more than seq_length {seq_length}"
        )
    flat = [
        token
        for ids, slot in zip(sequences, padded, strict=True)
        for token in [*ids, *[pad_id] * (slot - len(ids))]
    ]
    tail = seq_length - len(flat)
    tokens = torch.tensor(flat + [pad_id] * tail, dtype=torch.long).unsqueeze(0)
    # the tail padding is one more (empty-response) sequence, so cu_seqlens covers the row
    slots = padded + ([tail] if tail else [])
    prompts = list(prompt_lengths) + ([tail] if tail else [])
    responses = [length - prompt for length, prompt in zip(lengths, prompt_lengths, strict=True)]
    responses += [0] if tail else []
    supervised = packed_position_mask(prompts, responses, positions, slots).unsqueeze(0)
    response = packed_position_mask(prompts, responses, PositionSpec("all"), slots).unsqueeze(0)
    cu_seqlens = torch.tensor([0, *itertools.accumulate(slots)], dtype=torch.int32)
    return _with_opd_masks(index, tokens, supervised, response, cu_seqlens)


def _response_lengths(
    sequences: Sequence[Sequence[int]], prompt_lengths: Sequence[int]
) -> list[int]:
    """Each sequence's response length; raises on no sequences or a prompt length out of range."""
    if not sequences:
        raise ValueError("microbatch: no sequences")
    responses = []
    for row, (ids, prompt) in enumerate(zip(sequences, prompt_lengths, strict=True)):
        if not 0 <= prompt <= len(ids):
            raise ValueError(f"microbatch: sequence {row} prompt length {prompt} out of range")
        responses.append(len(ids) - prompt)
    return responses


def _with_opd_masks(
    index: int,
    tokens: torch.Tensor,
    supervised: torch.Tensor,
    response: torch.Tensor,
    cu_seqlens: torch.Tensor | None = None,
) -> DistillMicrobatch:
    """Add the OPD masks: a position predicts the next token when that one is a response token."""
    predicts = torch.zeros_like(response)
    predicts[:, :-1] = response[:, 1:]
    if cu_seqlens is not None:  # the last token of a packed sequence predicts nothing
        predicts[0, cu_seqlens[1:].long() - 1] = False
    labels = torch.zeros_like(tokens)
    labels[:, :-1] = torch.where(predicts[:, :-1], tokens[:, 1:], torch.zeros_like(tokens[:, 1:]))
    return DistillMicrobatch(index, tokens, supervised, predicts, labels, cu_seqlens)


def context_shard(
    batch: DistillMicrobatch, cp: int | None = None, rank: int | None = None
) -> DistillMicrobatch:
    """This context-parallel rank's share of ``batch`` (default: Megatron's CP group): tokens,
    masks and labels ``[batch, seq / cp]``, each sequence's chunks ``rank`` and
    ``2 * cp - 1 - rank``. Labels and OPD masks were formed on the full row, so a chunk's last
    token still predicts the first token of the next chunk."""
    if batch.context_parallel != 1:
        raise ValueError(f"microbatch {batch.index} is already split for context parallelism")
    cp = parallel_state.get_context_parallel_world_size() if cp is None else cp
    rank = parallel_state.get_context_parallel_rank() if rank is None else rank
    if cp == 1:
        return batch
    seq = int(batch.tokens.shape[1])
    bounds = [0, seq] if batch.cu_seqlens is None else batch.cu_seqlens.tolist()
    try:
        check_slots(bounds, cp)
    except ValueError as exc:
        raise ValueError(f"microbatch {batch.index} (seq_length {seq}): {exc}") from None
    keep = context_positions(bounds, cp, rank)
    return DistillMicrobatch(
        batch.index,
        *(t.index_select(1, keep) for t in (batch.tokens, batch.supervised, batch.predicts)),
        batch.labels.index_select(1, keep),
        batch.cu_seqlens,
        cp,
        batch.teachers,
    )


def sequence_major(mask: torch.Tensor) -> torch.Tensor:
    """``[batch, seq]`` -> flat ``[seq * batch]`` in Megatron's sequence-major row order."""
    return mask.t().reshape(-1)


def local_rows(
    mask: torch.Tensor, sequence_parallel: bool, tp_group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Row indices into this rank's flattened ``[s_local * b, h]`` hidden state for ``mask``.

    Without sequence parallelism every tensor-parallel rank holds the whole sequence; with it,
    this rank holds its shard in ``tp_group`` (default: ``parallel_state``'s, the student's).
    """
    if sequence_parallel:
        if tp_group is None:
            tp_group = parallel_state.get_tensor_model_parallel_group()
        tp, rank = tp_group.size(), tp_group.rank()
        seq = mask.shape[1]
        if seq % tp:
            raise ValueError(
                f"microbatch: seq_length {seq} is not divisible by tensor parallel size {tp} "
                "(needed by sequence parallelism)"
            )
        shard = seq // tp
        mask = mask[:, rank * shard : (rank + 1) * shard]
    return sequence_major(mask).nonzero().squeeze(1)
