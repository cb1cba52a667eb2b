"""Layer selection and the proportional layer map, against brute force and the authors' code."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from oprd_mega.distill.layers import layer_pairs, select_layers, teacher_depth, teacher_layer_for


@given(st.integers(1, 80))
def test_modes_by_brute_force(num_layers: int) -> None:
    every = range(1, num_layers + 1)
    assert select_layers("all", num_layers) == list(every)
    assert select_layers("last", num_layers) == [num_layers]
    # The authors' even/odd: parity of the zero-based block index.
    assert select_layers("even", num_layers) == [n for n in every if (n - 1) % 2 == 0]
    assert select_layers("odd", num_layers) == [n for n in every if (n - 1) % 2 == 1]


def test_explicit_lists_and_errors() -> None:
    assert select_layers([4, 1, 2], 4) == [1, 2, 4]
    with pytest.raises(ValueError, match="5 is outside 1..4"):
        select_layers([1, 5], 4)
    with pytest.raises(ValueError, match="0 is outside 1..4"):
        select_layers([0], 4)
    with pytest.raises(ValueError, match="names a layer twice"):
        select_layers([2, 2], 4)
    with pytest.raises(ValueError, match="'middle' is not one of"):
        select_layers("middle", 4)
    with pytest.raises(ValueError, match="explicit list is empty"):
        select_layers([], 4)
    with pytest.raises(ValueError, match="is not an integer"):
        select_layers([1.5], 4)  # type: ignore[list-item]


@given(st.integers(2, 64), st.integers(1, 64))
def test_layer_map_matches_authors_linspace(num_student: int, num_teacher: int) -> None:
    # The authors' get_proportional_layer_indices: linspace(0, L_T - 1, L_S).round(), 0-based.
    authors = torch.linspace(0, num_teacher - 1, steps=num_student, dtype=torch.float64).round()
    ours = [teacher_layer_for(n, num_student, num_teacher) for n in range(1, num_student + 1)]
    for index, (mine, theirs) in enumerate(zip(ours, authors.tolist(), strict=True)):
        exact = Fraction(index * (num_teacher - 1), num_student - 1)
        if exact.denominator == 2:  # an exact tie: our rule is half up
            assert mine == int(exact + Fraction(1, 2)) + 1
        else:
            assert mine == int(theirs) + 1
    assert ours[0] == 1 and ours[-1] == num_teacher
    assert ours == sorted(ours)


@given(st.integers(1, 64))
def test_same_depth_is_identity(depth: int) -> None:
    assert [teacher_layer_for(n, depth, depth) for n in range(1, depth + 1)] == list(
        range(1, depth + 1)
    )


def test_one_layer_student_pairs_with_teacher_last() -> None:
    assert teacher_layer_for(1, 1, 36) == 36


def test_paper_pairs() -> None:
    # Qwen3-1.7B (28 layers) student, Qwen3-4B (36 layers) teacher, every student layer.
    pairs = layer_pairs("all", 28, 36)
    assert pairs[0] == (1, 1) and pairs[-1] == (28, 36)
    assert pairs[13] == (14, round(13 / 27 * 35) + 1)
    with pytest.raises(ValueError, match="student layer 29 is outside 1..28"):
        teacher_layer_for(29, 28, 36)


@pytest.mark.parametrize(
    "pairs, needs_logits, depth",
    [
        ([(1, 2), (2, 5), (3, 4)], False, 5),  # the deepest pair, not the last
        ([(1, 2), (2, 5)], True, 9),  # an OPD term runs the whole teacher
        ([], False, 9),  # nothing tapped: the whole teacher
    ],
)
def test_teacher_depth(pairs: list[tuple[int, int]], needs_logits: bool, depth: int) -> None:
    assert teacher_depth(pairs, 9, needs_logits=needs_logits) == depth
