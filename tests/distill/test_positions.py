"""Position masks: only response tokens, the right ones, padded and packed layouts agreeing."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from oprd_mega.distill.positions import PositionSpec, packed_position_mask, padded_position_mask

specs = st.builds(
    PositionSpec, st.sampled_from(["all", "last", "first_k", "last_k"]), st.integers(1, 12)
)
samples = st.lists(st.tuples(st.integers(0, 10), st.integers(0, 15)), min_size=1, max_size=6)


def selected_by_definition(spec: PositionSpec, response_length: int) -> list[int]:
    """Response offsets METHOD.md supervises, token by token."""
    chosen = []
    for t in range(response_length):
        if spec.mode == "all":
            keep = True
        elif spec.mode == "last":
            keep = t == response_length - 1
        elif spec.mode == "first_k":
            keep = t < spec.k
        else:
            keep = t >= response_length - spec.k
        if keep:
            chosen.append(t)
    return chosen


@given(specs, samples, st.integers(0, 5))
def test_padded_mask_by_definition(
    spec: PositionSpec, batch: list[tuple[int, int]], pad: int
) -> None:
    prompts = [p for p, _ in batch]
    responses = [r for _, r in batch]
    length = max(p + r for p, r in batch) + pad
    mask = padded_position_mask(prompts, responses, length, spec)
    assert mask.shape == (len(batch), length) and mask.dtype == torch.bool
    for row, (prompt, response) in enumerate(batch):
        expected = {prompt + t for t in selected_by_definition(spec, response)}
        assert set(mask[row].nonzero().view(-1).tolist()) == expected


@given(specs, samples, st.lists(st.integers(0, 4), min_size=6, max_size=6))
def test_packed_mask_agrees_with_padded(
    spec: PositionSpec, batch: list[tuple[int, int]], extra: list[int]
) -> None:
    prompts = [p for p, _ in batch]
    responses = [r for _, r in batch]
    slots = [p + r + e for (p, r), e in zip(batch, extra, strict=False)]
    packed = packed_position_mask(prompts, responses, spec, padded_lengths=slots)
    padded = padded_position_mask(prompts, responses, max(slots), spec)
    offset = 0
    for row, slot in enumerate(slots):
        segment = packed[offset : offset + slot]
        assert torch.equal(segment, padded[row, :slot])
        assert not padded[row, slot:].any()
        # never a prompt or a padding slot
        prompt, response = batch[row]
        assert not segment[:prompt].any() and not segment[prompt + response :].any()
        offset += slot
    assert offset == packed.numel()


def test_paper_default_is_last_2000() -> None:
    spec = PositionSpec()
    assert (spec.mode, spec.k) == ("last_k", 2000)
    assert spec.response_range(5000) == (3000, 5000)
    assert spec.response_range(700) == (0, 700)


def test_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="positions.mode: 'middle'"):
        PositionSpec("middle")
    with pytest.raises(ValueError, match="positions.k: 0 must be >= 1"):
        PositionSpec("last_k", 0)
    with pytest.raises(
        ValueError, match="sample 0 has 3 \\+ 4 tokens, more than the sequence length 6"
    ):
        padded_position_mask([3], [4], 6, PositionSpec("all"))
    with pytest.raises(ValueError, match="sample 1 has 2 \\+ 2 tokens but only 3 slots"):
        packed_position_mask([1, 2], [1, 2], PositionSpec("all"), padded_lengths=[2, 3])
    with pytest.raises(ValueError, match="2 prompt lengths but 1 response lengths"):
        packed_position_mask([1, 2], [1], PositionSpec("all"))


@pytest.mark.parametrize(
    ("mode", "k", "expected"),
    [("all", 1, [2, 3, 4, 5]), ("last_k", 2, [4, 5]), ("first_k", 1, [2]), ("last", 1, [5])],
)
def test_prediction_anchor_is_one_position_earlier(mode: str, k: int, expected: list[int]) -> None:
    # [p p p r r r r . .]: response tokens at 3..6; their predicting states at 2..5.
    spec = PositionSpec(mode, k, anchor="prediction")
    padded = padded_position_mask([3], [4], 9, spec)
    assert padded[0].nonzero().flatten().tolist() == expected
    packed = packed_position_mask([2, 3], [1, 4], spec, padded_lengths=[4, 9])
    assert packed[4:].nonzero().flatten().tolist() == expected
    assert packed[:4].nonzero().flatten().tolist() == [1]  # the one-token response


def test_prediction_anchor_needs_a_prompt_token() -> None:
    with pytest.raises(ValueError, match="no prompt token"):
        padded_position_mask([0], [2], 4, PositionSpec("all", anchor="prediction"))
    with pytest.raises(ValueError, match="anchor"):
        PositionSpec("all", anchor="before")
