"""Which response positions are supervised: masks for padded and packed microbatches.

The supervised state at response position t is the hidden state computed at response token t
(METHOD.md; the authors take the last ``response_len`` positions of ``[prompt | response]``).
Every selection is a contiguous run of a sample's response tokens, never a prompt or padding
token:

* ``all``: every response token;
* ``last``: the last response token;
* ``first_k`` / ``last_k``: the first / last ``min(k, response length)`` response tokens.

``anchor`` says which hidden state stands for response token t: ``token`` (the paper's: the
state computed at token t) or ``prediction`` (the state that predicts token t, one position
earlier: the last prompt token for the first response token). Both models use the same
positions. ``prediction`` matters for very short responses, where the state that decides the
first response token would otherwise go unsupervised.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

POSITION_MODES = ("all", "last", "first_k", "last_k")
POSITION_ANCHORS = ("token", "prediction")


@dataclass(frozen=True)
class PositionSpec:
    """A position selection; ``k`` is used by ``first_k`` and ``last_k`` (paper: last_k, 2000)."""

    mode: str = "last_k"
    k: int = 2000
    anchor: str = "token"

    def __post_init__(self) -> None:
        if self.mode not in POSITION_MODES:
            raise ValueError(f"positions.mode: {self.mode!r} is not one of {POSITION_MODES}")
        if self.anchor not in POSITION_ANCHORS:
            raise ValueError(f"positions.anchor: {self.anchor!r} is not one of {POSITION_ANCHORS}")
        if self.mode in ("first_k", "last_k") and self.k < 1:
            raise ValueError(f"positions.k: {self.k} must be >= 1 for mode {self.mode!r}")

    @property
    def shift(self) -> int:
        """Offset of the supervised state from its response token (-1 for ``prediction``)."""
        return -1 if self.anchor == "prediction" else 0

    def response_range(self, response_length: int) -> tuple[int, int]:
        """``[start, stop)`` of the supervised tokens within one response of this length."""
        if response_length < 0:
            raise ValueError(f"positions: response length {response_length} is negative")
        if response_length == 0:
            return 0, 0
        if self.mode == "all":
            return 0, response_length
        if self.mode == "last":
            return response_length - 1, response_length
        taken = min(self.k, response_length)
        if self.mode == "first_k":
            return 0, taken
        return response_length - taken, response_length


def _check_lengths(prompt_lengths: Sequence[int], response_lengths: Sequence[int]) -> None:
    if len(prompt_lengths) != len(response_lengths):
        raise ValueError(
            f"positions: {len(prompt_lengths)} prompt lengths but {len(response_lengths)} "
            "response lengths"
        )
    for index, (prompt, response) in enumerate(zip(prompt_lengths, response_lengths, strict=True)):
        if prompt < 0 or response < 0:
            raise ValueError(
                f"positions: sample {index} has a negative length ({prompt}, {response})"
            )


def padded_position_mask(
    prompt_lengths: Sequence[int],
    response_lengths: Sequence[int],
    sequence_length: int,
    spec: PositionSpec,
) -> torch.Tensor:
    """``[batch, sequence_length]`` bool mask for right-padded ``[prompt, response, pad]`` rows."""
    _check_lengths(prompt_lengths, response_lengths)
    mask = torch.zeros(len(prompt_lengths), sequence_length, dtype=torch.bool)
    for row, (prompt, response) in enumerate(zip(prompt_lengths, response_lengths, strict=True)):
        if prompt + response > sequence_length:
            raise ValueError(
                f"positions: sample {row} has {prompt} + {response} tokens, more than the "
                f"sequence length {sequence_length}"
            )
        start, stop = spec.response_range(response)
        if spec.shift and prompt == 0 and stop > start:
            raise ValueError(f"positions: sample {row} has no prompt token to anchor on")
        mask[row, prompt + start + spec.shift : prompt + stop + spec.shift] = True
    return mask


def packed_position_mask(
    prompt_lengths: Sequence[int],
    response_lengths: Sequence[int],
    spec: PositionSpec,
    padded_lengths: Sequence[int] | None = None,
) -> torch.Tensor:
    """``[total tokens]`` bool mask for sequences packed back to back (THD layout).

    Sample i occupies ``padded_lengths[i]`` slots (default ``prompt + response``; larger when
    sequences are padded, e.g. to a multiple of the tensor-parallel size), prompt first.
    """
    _check_lengths(prompt_lengths, response_lengths)
    slots = (
        [p + r for p, r in zip(prompt_lengths, response_lengths, strict=True)]
        if padded_lengths is None
        else list(padded_lengths)
    )
    if len(slots) != len(prompt_lengths):
        raise ValueError(
            f"positions: {len(slots)} padded lengths for {len(prompt_lengths)} samples"
        )
    mask = torch.zeros(sum(slots), dtype=torch.bool)
    offset = 0
    for index, (prompt, response, slot) in enumerate(
        zip(prompt_lengths, response_lengths, slots, strict=True)
    ):
        if prompt + response > slot:
            raise ValueError(
                f"positions: sample {index} has {prompt} + {response} tokens but only {slot} slots"
            )
        start, stop = spec.response_range(response)
        if spec.shift and prompt == 0 and stop > start:
            raise ValueError(f"positions: sample {index} has no prompt token to anchor on")
        begin = offset + prompt + spec.shift
        mask[begin + start : begin + stop] = True
        offset += slot
    return mask
