"""Answer extraction, normalisation, the verifier kinds, Avg@k, Best@k and pass@k, against
hand-written cases and brute-force enumeration."""

from __future__ import annotations

import itertools
import sys
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from oprd_mega.train.verifiers import (
    EvalSummary,
    answers_match,
    avg_at_k,
    best_at_k,
    extract_boxed,
    final_answer,
    make_verifier,
    mean_pass_at_k,
    normalize_answer,
    parse_number,
    pass_at_k,
    pass_k_values,
    summarize,
)


@pytest.fixture
def no_math_verify(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``import math_verify`` fail, installed or not."""
    monkeypatch.setitem(sys.modules, "math_verify", None)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"first \boxed{1}, then \boxed{2}, finally $\boxed{3}$.", "3"),
        (r"\fbox{7}", "7"),
        (r"\boxed{1} and \fbox{x^{2}}", "x^{2}"),
        (r"\boxed {5}", "5"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
        (r"\boxed{a{b{c}}d} tail", "a{b{c}}d"),
        (r"\boxed{\boxed{4}}", "4"),
    ],
)
def test_extract_boxed(text: str, expected: str) -> None:
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    "text",
    ["no box here", r"\boxed{\frac{1}{2}", r"\boxed{1} then \boxed{2", r"\boxed 5", r"\boxed{\}"],
)
def test_extract_boxed_absent_or_unbalanced(text: str) -> None:
    assert extract_boxed(text) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("  42 ", "42"),
        ("$42$", "42"),
        ("$42$.", "42"),
        ("$42.$", "42"),
        ("$$ x + 1 $$", "x + 1"),
        (r"\( y \)", "y"),
        ("a   b\n c", "a b c"),
        ("1,000", "1000"),
        ("-12,345.5", "-12345.5"),
        ("1,2", "1,2"),
        ("1,0000", "1,0000"),
        ("Paris", "Paris"),
        ("3.14", "3.14"),
    ],
)
def test_normalize_answer(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("250", "250"),
        ("  250\n", "250"),
        ("Adding them up. The answer is 42.", "42."),
        ("So the answer is 3, not 4.\nWait: the final answer is 5", "5"),
        ("Answer: 12", "12"),
        ("**Answer:** 7\nThat's it.", "7"),
        ("The answer is:\n\n  9\n", "9"),
        ("The answer is $\\frac{1}{2}$", "$\\frac{1}{2}$"),
        ("My answers: unknown", "My answers: unknown"),
    ],
)
def test_final_answer(text: str, expected: str) -> None:
    assert final_answer(text) == expected


def test_parse_number() -> None:
    half = parse_number("1/2")
    assert half is not None and half.exact and half.value == 0.5
    assert parse_number(r"-\frac{3}{4}").value == -0.75  # type: ignore[union-attr]
    decimal = parse_number("0.25")
    assert decimal is not None and not decimal.exact and decimal.value == 0.25
    assert parse_number("1/0") is None
    assert parse_number("x") is None
    assert parse_number("nan") is None


@pytest.mark.parametrize(
    ("candidate", "reference", "expected"),
    [
        ("0.5", "1/2", True),
        ("1/2", "0.5", True),
        (r"\frac{1}{2}", "0.5", True),
        ("2/4", "1/2", True),
        ("1,000", 1000, True),
        ("1000", "1,000", True),
        ("42", 42, True),
        ("42.0", 42, True),
        ("41", 42, False),
        ("0.3333", "1/3", False),
        ("0.3333333333", "1/3", True),
        ("-7", -7, True),
        ("0.1", 0.1, True),
        ("1e3", 1000, True),
        ("1" + "0" * 400, "1e400", True),
        ("Paris", "Paris", True),
        ("paris", "Paris", False),
    ],
)
def test_answers_match(candidate: str, reference: str | int | float, expected: bool) -> None:
    assert answers_match(candidate, reference) is expected


def test_reference_of_wrong_type_is_rejected() -> None:
    with pytest.raises(TypeError, match="reference answer"):
        answers_match("1", [1])  # type: ignore[arg-type]


def test_exact_verifier() -> None:
    exact = make_verifier("exact")
    assert exact("The answer is 42.", "42")
    assert exact("The answer is 42.", 42)
    assert exact("250", 250)
    assert exact(" 1/2 ", "0.5")
    assert not exact("The answer is 41.", 42)
    assert not exact(r"\boxed{42}", 42)


def test_boxed_verifier() -> None:
    boxed = make_verifier("boxed")
    assert boxed(r"so $\boxed{\frac{1}{2}}$.", r"\frac{1}{2}")
    assert boxed(r"so $\boxed{\frac{1}{2}}$.", "0.5")
    assert boxed(r"\boxed{3} no, \boxed{1,000}", 1000)
    assert not boxed(r"\boxed{1000} no, \boxed{3}", 1000)
    assert not boxed("The answer is 42", 42)


def test_auto_falls_back_without_math_verify(no_math_verify: None) -> None:
    auto = make_verifier("auto")
    assert auto(r"reasoning... \boxed{7}", 7)
    assert not auto(r"The answer is 7, \boxed{8}", 7)  # a box takes precedence
    assert auto("The answer is 7.", 7)
    assert not auto("The answer is 8.", 7)


def test_math_verify_missing_names_the_package(no_math_verify: None) -> None:
    with pytest.raises(ImportError, match="pip install math-verify"):
        make_verifier("math-verify")


def test_math_verify() -> None:
    pytest.importorskip("math_verify")
    verifier = make_verifier("math-verify")
    assert verifier(r"so $\boxed{\frac{1}{2}}$", "0.5")
    assert verifier(r"so $\boxed{42}$", 42)
    assert not verifier(r"so $\boxed{41}$", 42)


def test_unknown_verifier() -> None:
    with pytest.raises(ValueError, match="unknown verifier 'regex'"):
        make_verifier("regex")


def test_avg_at_k() -> None:
    # prompt 0: 3/4, prompt 1: 0/4, prompt 2: 4/4 -> (0.75 + 0 + 1) / 3
    correct = [[True, True, False, True], [False] * 4, [True] * 4]
    assert avg_at_k(correct) == pytest.approx(1.75 / 3)
    assert avg_at_k([[True], [False, True]]) == pytest.approx(0.75)


@pytest.mark.parametrize("correct", [[], [[True], []]])
def test_avg_at_k_rejects_empty(correct: list[list[bool]]) -> None:
    with pytest.raises(ValueError):
        avg_at_k(correct)


def test_summarize() -> None:
    summary = summarize(
        [[True, False], [True, True]],
        [[10, 20], [30, 40]],
        finish_reasons=[["stop", "length"], ["stop", "stop"]],
    )
    # prompt 0: 1 of 2 right, prompt 1: 2 of 2; pass@2 of prompt 0 is 1 (both drawn).
    assert summary == EvalSummary(
        accuracy=0.75,
        num_prompts=2,
        k=2,
        mean_response_length=25.0,
        truncated_fraction=0.25,
        best=1.0,
        pass_at={1: 0.75, 2: 1.0},
    )
    assert summary.as_metrics() == {
        "eval/avg_at_k": 0.75,
        "eval/response_length": 25.0,
        "eval/k": 2.0,
        "eval/num_prompts": 2.0,
        "eval/truncated_fraction": 0.25,
        "eval/best_at_k": 1.0,
        "eval/pass_at_1": 0.75,
        "eval/pass_at_2": 1.0,
    }
    plain = summarize([[False]], [[3]])
    assert plain.truncated_fraction is None
    assert plain.as_metrics(prefix="") == {
        "avg_at_k": 0.0,
        "response_length": 3.0,
        "k": 1.0,
        "num_prompts": 1.0,
        "best_at_k": 0.0,
        "pass_at_1": 0.0,
    }


def test_summarize_rejects_ragged_input() -> None:
    with pytest.raises(ValueError, match="same number of samples"):
        summarize([[True, False], [True]], [[1, 2], [3]])
    with pytest.raises(ValueError, match="response_lengths"):
        summarize([[True, False]], [[1]])
    with pytest.raises(ValueError, match="finish_reasons"):
        summarize([[True]], [[1]], finish_reasons=[["stop"], ["stop"]])


def _pass_at_k_by_enumeration(n: int, c: int, k: int) -> Fraction:
    """The share of all k-subsets of n samples (the first c right) holding a right one."""
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(i < c for i in subset) for subset in subsets), len(subsets))


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_equals_enumeration(n: int) -> None:
    for c in range(n + 1):
        for k in range(1, n + 1):
            expected = _pass_at_k_by_enumeration(n, c, k)
            assert pass_at_k(n, c, k) == pytest.approx(float(expected), rel=1e-12, abs=1e-15)


@given(st.integers(1, 200), st.data())
def test_pass_at_k_bounds_and_ends(n: int, data: st.DataObject) -> None:
    c = data.draw(st.integers(0, n))
    k = data.draw(st.integers(1, n))
    value = pass_at_k(n, c, k)
    assert 0.0 <= value <= 1.0
    assert pass_at_k(n, c, 1) == pytest.approx(c / n)  # pass@1 is the fraction right
    assert pass_at_k(n, c, n) == float(c > 0)  # all n drawn: Best@n
    if k < n:  # more draws never lower the chance
        assert pass_at_k(n, c, k + 1) >= value - 1e-12


def test_pass_at_k_of_a_known_case() -> None:
    # 16 samples, 2 right, k = 4: 1 - C(14, 4) / C(16, 4) = 1 - 1001 / 1820 = 819 / 1820.
    assert pass_at_k(16, 2, 4) == pytest.approx(819 / 1820, rel=1e-15)


@pytest.mark.parametrize(
    ("n", "c", "k", "message"),
    [(4, 5, 1, "correct <= samples"), (4, 1, 0, "pass@0"), (4, 1, 5, "pass@5")],
)
def test_pass_at_k_rejects_bad_counts(n: int, c: int, k: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        pass_at_k(n, c, k)


def test_best_and_mean_pass_at_k() -> None:
    correct = [[True, False, False, False], [False] * 4, [True, True, False, True]]
    assert best_at_k(correct) == pytest.approx(2 / 3)
    assert mean_pass_at_k(correct, 4) == pytest.approx(best_at_k(correct))
    assert mean_pass_at_k(correct, 1) == pytest.approx(avg_at_k(correct))
    expected = (_pass_at_k_by_enumeration(4, 1, 2) + 0 + _pass_at_k_by_enumeration(4, 3, 2)) / 3
    assert mean_pass_at_k(correct, 2) == pytest.approx(float(expected))


def test_pass_k_values() -> None:
    assert pass_k_values(1) == (1,)
    assert pass_k_values(16) == (1, 2, 4, 8, 16)
    assert pass_k_values(12) == (1, 2, 4, 8, 12)


def test_math_verify_on_competition_answers() -> None:
    pytest.importorskip("math_verify")
    verifier = make_verifier("math-verify")
    # AIME: integer answers, here as a JSON number and as a string.
    assert verifier(r"The total is $\boxed{204}$.", 204)
    assert verifier(r"so the answer is \boxed{033}", "33")
    # MATH: LaTeX answers equal symbolically, not as strings.
    assert verifier(r"$\boxed{\frac{\sqrt{3}}{2}}$", r"\frac{\sqrt3}{2}")
    assert verifier(r"\boxed{2\sqrt{2}}", r"\sqrt{8}")
    assert verifier(r"\boxed{(1, 2)}", "(1,2)")
    assert not verifier(r"\boxed{\frac{1}{3}}", "0.33")
    assert not verifier("no answer here", 7)
    assert make_verifier("auto")(r"\boxed{\frac{2}{4}}", r"\frac12")  # auto picks it
