"""Answer extraction, normalisation, the verifier kinds and Avg@k, against hand-written cases."""

from __future__ import annotations

import sys

import pytest

from oprd_mega.train.verifiers import (
    EvalSummary,
    answers_match,
    avg_at_k,
    extract_boxed,
    final_answer,
    make_verifier,
    normalize_answer,
    parse_number,
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
    assert summary == EvalSummary(
        accuracy=0.75, num_prompts=2, k=2, mean_response_length=25.0, truncated_fraction=0.25
    )
    assert summary.as_metrics() == {
        "eval/avg_at_k": 0.75,
        "eval/response_length": 25.0,
        "eval/k": 2.0,
        "eval/num_prompts": 2.0,
        "eval/truncated_fraction": 0.25,
    }
    plain = summarize([[False]], [[3]])
    assert plain.truncated_fraction is None
    assert plain.as_metrics(prefix="") == {
        "avg_at_k": 0.0,
        "response_length": 3.0,
        "k": 1.0,
        "num_prompts": 1.0,
    }


def test_summarize_rejects_ragged_input() -> None:
    with pytest.raises(ValueError, match="same number of samples"):
        summarize([[True, False], [True]], [[1, 2], [3]])
    with pytest.raises(ValueError, match="response_lengths"):
        summarize([[True, False]], [[1]])
    with pytest.raises(ValueError, match="finish_reasons"):
        summarize([[True]], [[1]], finish_reasons=[["stop"], ["stop"]])
