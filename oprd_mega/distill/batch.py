"""One distillation microbatch (right-padded rows) and its row selections on this rank.

Megatron's hidden states are ``[seq, batch, hidden]``; flattened they are sequence-major, row
``s * batch + b``. Supervised rows are selected in that order; under sequence parallelism a
tensor-parallel rank holds the contiguous sequence shard ``[r * s / tp, (r + 1) * s / tp)``, so
its rows are the same selection restricted to its shard (teacher and student alike).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from megatron.core import parallel_state

from oprd_mega.distill.positions import PositionSpec, padded_position_mask


@dataclass(frozen=True)
class DistillMicrobatch:
    """Token ids and masks of one microbatch, all ``[batch, seq]``.

    ``supervised``: OPRD positions (response tokens chosen by the position spec).
    ``predicts``: OPD positions, those whose next token is a response token; ``labels`` holds
    that next token (0 elsewhere).
    """

    index: int
    tokens: torch.Tensor
    supervised: torch.Tensor
    predicts: torch.Tensor
    labels: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        """``(batch, seq)``."""
        return int(self.tokens.shape[0]), int(self.tokens.shape[1])


def make_microbatch(
    index: int,
    sequences: Sequence[Sequence[int]],
    prompt_lengths: Sequence[int],
    seq_length: int,
    positions: PositionSpec,
    pad_id: int = 0,
) -> DistillMicrobatch:
    """Right-pad ``sequences`` (prompt + response ids) to ``seq_length`` and build the masks."""
    if not sequences:
        raise ValueError("microbatch: no sequences")
    tokens = torch.full((len(sequences), seq_length), pad_id, dtype=torch.long)
    responses = []
    for row, (ids, prompt) in enumerate(zip(sequences, prompt_lengths, strict=True)):
        if len(ids) > seq_length:
            raise ValueError(
                f"microbatch: sequence {row} has {len(ids)} tokens, more than seq_length "
                f"{seq_length}"
            )
        if not 0 <= prompt <= len(ids):
            raise ValueError(f"microbatch: sequence {row} prompt length {prompt} out of range")
        tokens[row, : len(ids)] = torch.tensor(list(ids), dtype=torch.long)
        responses.append(len(ids) - prompt)
    supervised = padded_position_mask(prompt_lengths, responses, seq_length, positions)
    response = padded_position_mask(prompt_lengths, responses, seq_length, PositionSpec("all"))
    predicts = torch.zeros_like(response)
    predicts[:, :-1] = response[:, 1:]
    labels = torch.zeros_like(tokens)
    labels[:, :-1] = torch.where(response[:, 1:], tokens[:, 1:], torch.zeros_like(tokens[:, 1:]))
    return DistillMicrobatch(index, tokens, supervised, predicts, labels)


def sequence_major(mask: torch.Tensor) -> torch.Tensor:
    """``[batch, seq]`` -> flat ``[seq * batch]`` in Megatron's sequence-major row order."""
    return mask.t().reshape(-1)


def local_rows(mask: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
    """Row indices into this rank's flattened ``[s_local * b, h]`` hidden state for ``mask``.

    Without sequence parallelism every tensor-parallel rank holds the whole sequence.
    """
    if sequence_parallel:
        tp = parallel_state.get_tensor_model_parallel_world_size()
        rank = parallel_state.get_tensor_model_parallel_rank()
        seq = mask.shape[1]
        if seq % tp:
            raise ValueError(
                f"microbatch: seq_length {seq} is not divisible by tensor parallel size {tp} "
                "(needed by sequence parallelism)"
            )
        shard = seq // tp
        mask = mask[:, rank * shard : (rank + 1) * shard]
    return sequence_major(mask).nonzero().squeeze(1)
