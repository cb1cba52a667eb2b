"""Cross-tokenizer positions: pair each student token with the teacher token covering its last
character, given both tokenizations' character spans of the same text.

Spans are half-open ``(start, end)`` character offsets. Rules:

* A student token's last character is ``end - 1``; the teacher token whose span contains it is
  its partner (the teacher state there has read that whole character).
* Empty spans (special tokens such as BOS/EOS, offsets ``(0, 0)``) cover no character: an empty
  student token has no partner, an empty teacher token is never chosen.
* When several teacher tokens carry the same span (byte pieces of one character), the last of
  them is taken, the first position whose state has read the complete character.
* A student token with no partner (empty span, or its last character falls between teacher
  tokens, e.g. whitespace a word-level tokenizer dropped) is an error naming the token, or
  with ``skip=True`` gets partner ``-1`` and is left out of the supervised positions.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

Span = tuple[int, int]


class AlignmentError(ValueError):
    """A student token has no covering teacher token, or spans are malformed."""


def _check_teacher(spans: Sequence[Span]) -> list[tuple[int, int, int]]:
    """Non-empty teacher spans as (start, end, index), validated sorted and non-overlapping."""
    kept: list[tuple[int, int, int]] = []
    for index, (start, end) in enumerate(spans):
        if start < 0 or end < start:
            raise AlignmentError(f"teacher span {index}: ({start}, {end}) is not a valid span")
        if start == end:
            continue
        if kept:
            prev_start, prev_end, prev_index = kept[-1]
            if (start, end) != (prev_start, prev_end) and start < prev_end:
                raise AlignmentError(
                    f"teacher spans {prev_index} ({prev_start}, {prev_end}) and {index} "
                    f"({start}, {end}) overlap or are out of order"
                )
        kept.append((start, end, index))
    return kept


def align_last_character(
    student_spans: Sequence[Span], teacher_spans: Sequence[Span], *, skip: bool = False
) -> list[int]:
    """Teacher token index for each student token (``-1`` for skipped tokens when ``skip``)."""
    teacher = _check_teacher(teacher_spans)
    starts = [start for start, _, _ in teacher]
    partners = []
    for index, (start, end) in enumerate(student_spans):
        if start < 0 or end < start:
            raise AlignmentError(f"student span {index}: ({start}, {end}) is not a valid span")
        partner = -1
        if end > start:
            last = end - 1
            slot = bisect.bisect_right(starts, last) - 1
            if slot >= 0 and teacher[slot][1] > last:
                partner = teacher[slot][2]
        if partner < 0 and not skip:
            reason = (
                "an empty span" if end == start else f"character {end - 1} is in no teacher token"
            )
            raise AlignmentError(
                f"student token {index} at ({start}, {end}) has {reason}; pass skip=True to "
                "leave such tokens out of the supervised positions"
            )
        partners.append(partner)
    return partners
