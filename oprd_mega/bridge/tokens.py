"""Cross-tokenizer rollouts: the teacher reads the student's response as text, re-tokenized with
its own tokenizer, and each supervised student token is paired with the teacher token covering
its last character (:func:`oprd_mega.bridge.alignment.align_last_character`).

The student's character spans come from incremental decoding: token i ends where the decoded
prefix ``ids[: i + 1]`` ends. A prefix that is not a prefix of the whole text (a token ending
inside a multi-byte character, a special token dropped by decoding) gives the token an empty
span, so it has no partner and is skipped; the token that completes the character covers it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from oprd_mega.distill.positions import PositionSpec

from .alignment import Span, align_last_character
from .plan import PairedSequence


def _decode(tokenizer: Any, ids: Sequence[int]) -> str:
    return str(
        tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)
    )


def token_spans(tokenizer: Any, ids: Sequence[int]) -> tuple[str, list[Span]]:
    """The decoded text of ``ids`` and each token's half-open character span in it."""
    text = _decode(tokenizer, ids)
    spans: list[Span] = []
    end = 0
    for index in range(len(ids)):
        prefix = _decode(tokenizer, ids[: index + 1])
        start = end
        if len(prefix) >= end and text.startswith(prefix):
            end = len(prefix)
        spans.append((start, end))
    return text, spans


def cross_tokenizer_sequence(
    student_prompt_ids: Sequence[int],
    response_ids: Sequence[int],
    teacher_prompt_ids: Sequence[int],
    student_tokenizer: Any,
    teacher_tokenizer: Any,
    spec: PositionSpec,
) -> tuple[PairedSequence, int]:
    """The paired sequence (teacher: its own prompt tokens, then the response text in its own
    tokens) and the number of supervised student tokens skipped for want of a partner."""
    if spec.anchor != "token":
        raise ValueError(
            f"positions.anchor: {spec.anchor!r} is not supported across tokenizers (use 'token')"
        )
    text, spans = token_spans(student_tokenizer, response_ids)
    encoded = teacher_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    partners = align_last_character(spans, encoded["offset_mapping"], skip=True)
    start, stop = spec.response_range(len(response_ids))
    student_positions, teacher_positions = [], []
    for k in range(start, stop):
        if partners[k] >= 0:
            student_positions.append(len(student_prompt_ids) + k)
            teacher_positions.append(len(teacher_prompt_ids) + partners[k])
    sequence = PairedSequence(
        (*student_prompt_ids, *response_ids),
        tuple(student_positions),
        (*teacher_prompt_ids, *encoded["input_ids"]),
        tuple(teacher_positions),
    )
    return sequence, (stop - start) - len(student_positions)
