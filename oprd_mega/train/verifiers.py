"""Answer checking for evaluation: final-answer extraction, verifiers, Avg@k, Best@k, pass@k.

A verifier is a function ``(response text, reference answer) -> bool``. The kinds match the
``evaluation.verifier`` config key: ``exact`` (the response's final answer), ``boxed`` (its last
``\\boxed{}``), ``math-verify`` (Hugging Face's symbolic checker) and ``auto``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Literal

VerifierKind = Literal["auto", "exact", "boxed", "math-verify"]
VERIFIER_KINDS: tuple[str, ...] = ("auto", "exact", "boxed", "math-verify")

Reference = str | int | float
"""A reference answer: a string, or a JSON number as it comes out of a prompt file."""

Verifier = Callable[[str, Reference], bool]
"""``verifier(response_text, reference) -> bool``."""

_BOXED_START = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_MARKER = re.compile(
    r"\banswer[*_]*\s*(?:\bis\b\s*:?|:)[*_]*\s*(?P<x>[^\n]*)", re.IGNORECASE
)
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_MATH_DELIMITERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))

_INTEGER = re.compile(r"[+-]?\d+")
_SLASH_FRACTION = re.compile(r"(?P<num>[+-]?\d+)\s*/\s*(?P<den>[+-]?\d+)")
_LATEX_FRACTION = re.compile(
    r"(?P<sign>[+-]?)\\[dt]?frac\{\s*(?P<num>\d+)\s*\}\{\s*(?P<den>\d+)\s*\}"
)
# The exponent is capped at three digits: a Fraction of 1e999999999 would take minutes.
_DECIMAL = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d{1,3})?")
_MAX_DIGITS = 4000
_REL_TOL = Fraction(1, 10**9)


# --- extraction and normalisation ------------------------------------------------------------


def _closing_brace(text: str, start: int) -> int | None:
    """Index of the brace closing the group opened just before ``start``; None if unbalanced.

    A backslash escapes the next character, so LaTeX's literal braces ``\\{ \\}`` do not count.
    """
    depth = 1
    i = start
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` or ``\\fbox{...}`` in ``text``, nested braces included.

    "Last" is by start position (for ``\\boxed{\\boxed{1}}`` that is the inner one). None when
    there is no such command or when the last one's braces never close. ``\\boxed 5`` (no
    braces) is not recognised.
    """
    starts = list(_BOXED_START.finditer(text))
    if not starts:
        return None
    opened = starts[-1].end()
    closed = _closing_brace(text, opened)
    if closed is None:
        return None
    return text[opened:closed]


def _unwrap_math(text: str) -> str:
    """``text`` without one pair of surrounding ``$$ $$``, ``$ $``, ``\\( \\)`` or ``\\[ \\]``."""
    for left, right in _MATH_DELIMITERS:
        if len(text) >= len(left) + len(right) and text.startswith(left) and text.endswith(right):
            return text[len(left) : len(text) - len(right)].strip()
    return text


def _drop_trailing_period(text: str) -> str:
    return text[:-1].rstrip() if text.endswith(".") else text


def normalize_answer(text: str) -> str:
    """A conservative canonical form of an answer string, for string comparison.

    In order: strip whitespace and one trailing period; remove one pair of surrounding math
    delimiters (``$...$``, ``$$...$$``, ``\\(...\\)``, ``\\[...\\]``); strip whitespace and one
    trailing period again (``$42$.`` and ``$42.$`` both give ``42``); collapse internal runs of
    whitespace to one space; drop the thousands separators of a plain number written entirely
    in groups of three (``1,000`` and ``-12,345.5``, but not ``1,2`` or ``1,0000``, which may
    be lists). Case, units, ``\\text{}`` and spacing inside LaTeX are left alone.
    """
    text = _drop_trailing_period(text.strip())
    text = _drop_trailing_period(_unwrap_math(text).strip())
    text = " ".join(text.split())
    if _THOUSANDS.fullmatch(text):
        text = text.replace(",", "")
    return text


def final_answer(text: str) -> str:
    """The answer a free-text response gives, for the 'exact' verifier.

    With an answer marker, case-insensitive ``answer is X`` or ``answer: X`` (so also
    ``The final answer is X``, ``Answer: X``; markdown ``*``/``_`` around the marker and a
    ``:`` after ``is`` are skipped), X is the rest of the line after the marker, or the next
    non-empty line when the marker ends its line; the last marker with a non-empty X wins.
    Without one, the whole response stripped of surrounding whitespace (short-answer tasks
    whose response is just ``250``). X is returned raw: ``normalize_answer`` removes the
    trailing period and math delimiters.
    """
    answers = [m.group("x").strip() for m in _ANSWER_MARKER.finditer(text)]
    answers = [answer for answer in answers if answer]
    return answers[-1] if answers else text.strip()


# --- numeric equivalence ---------------------------------------------------------------------


@dataclass(frozen=True)
class Number:
    """A parsed numeric answer: its exact value and whether it was written exactly."""

    value: Fraction
    exact: bool
    """True for integers and fractions; False for decimals (compared with a tolerance)."""


def parse_number(text: str) -> Number | None:
    """The number a normalised answer spells, or None.

    Integers, ``a/b`` and ``\\frac{a}{b}`` (also ``\\dfrac``, ``\\tfrac``; integer a, b,
    b != 0) are exact; decimals and scientific notation (``0.5``, ``1e-3``) are not. The value
    is always held as a Fraction, so huge numbers never overflow a float; answers longer than
    4,000 characters are not parsed (Python refuses such int conversions).
    """
    if len(text) > _MAX_DIGITS:
        return None
    if _INTEGER.fullmatch(text):
        return Number(Fraction(int(text)), exact=True)
    fraction = _SLASH_FRACTION.fullmatch(text) or _LATEX_FRACTION.fullmatch(text)
    if fraction is not None:
        numerator, denominator = int(fraction.group("num")), int(fraction.group("den"))
        if denominator == 0:
            return None
        sign = -1 if fraction.groupdict().get("sign") == "-" else 1
        return Number(sign * Fraction(numerator, denominator), exact=True)
    if _DECIMAL.fullmatch(text):
        return Number(Fraction(text), exact=False)
    return None


def _numbers_equal(left: Number, right: Number) -> bool:
    if left.exact and right.exact:
        return left.value == right.value
    return abs(left.value - right.value) <= _REL_TOL * max(abs(left.value), abs(right.value))


def answers_match(candidate: str, reference: Reference) -> bool:
    """Whether two answers agree after ``normalize_answer``.

    When both sides parse as numbers (``parse_number``) they are compared as numbers: exactly
    when both are integers or fractions, else within a relative tolerance of 1e-9 (so ``0.5``
    equals ``1/2`` and ``0.3333333333`` equals ``1/3``, but ``0.3333`` does not). Otherwise the
    normalised strings must be equal.
    """
    left, right = normalize_answer(candidate), normalize_answer(_reference_text(reference))
    left_number, right_number = parse_number(left), parse_number(right)
    if left_number is None or right_number is None:
        return left == right
    return _numbers_equal(left_number, right_number)


def _reference_text(reference: Reference) -> str:
    if isinstance(reference, bool) or not isinstance(reference, str | int | float):
        raise TypeError(
            f"a reference answer must be a string or a number, got {type(reference).__name__} "
            f"{reference!r}"
        )
    return reference if isinstance(reference, str) else repr(reference)


# --- verifiers -------------------------------------------------------------------------------


def verify_exact(response: str, reference: Reference) -> bool:
    """'exact': the response's ``final_answer`` matches the reference (``answers_match``)."""
    return answers_match(final_answer(response), reference)


def verify_boxed(response: str, reference: Reference) -> bool:
    """'boxed': the response's last ``\\boxed{}`` matches the reference; no box is wrong."""
    boxed = extract_boxed(response)
    return boxed is not None and answers_match(boxed, reference)


def _import_math_verify() -> tuple[Callable[..., Any], Callable[..., Any]]:
    try:
        from math_verify import parse, verify
    except ImportError as exc:
        raise ImportError(
            "the 'math-verify' verifier needs the math_verify package: pip install math-verify"
        ) from exc
    return parse, verify


def _math_verify_verifier() -> Verifier:
    """'math-verify': Hugging Face's parser and symbolic equivalence check.

    The reference is parsed as ``\\boxed{reference}`` (math_verify's first extraction target,
    which takes both plain numbers and LaTeX), falling back to the bare string. math_verify
    parses the response itself (last boxed or final expression). Its own exceptions (parse
    failures, its timeouts) count as a wrong answer. Its timeouts use signals, so call the
    verifier from the main thread.
    """
    parse, verify = _import_math_verify()

    def check(response: str, reference: Reference) -> bool:
        text = _reference_text(reference)
        try:
            gold = parse("\\boxed{" + text + "}") or parse(text)
            answer = parse(response)
            return bool(gold) and bool(answer) and bool(verify(gold, answer))
        except Exception:  # math_verify raises many exception types on odd input
            return False

    return check


def _auto_verifier() -> Verifier:
    """'auto': math-verify when installed, else boxed when the response has a box, else exact."""
    try:
        return _math_verify_verifier()
    except ImportError:
        pass

    def check(response: str, reference: Reference) -> bool:
        if extract_boxed(response) is not None:
            return verify_boxed(response, reference)
        return verify_exact(response, reference)

    return check


def make_verifier(kind: str) -> Verifier:
    """The verifier of config ``evaluation.verifier``; 'math-verify' imports math_verify now."""
    if kind == "exact":
        return verify_exact
    if kind == "boxed":
        return verify_boxed
    if kind == "math-verify":
        return _math_verify_verifier()
    if kind == "auto":
        return _auto_verifier()
    raise ValueError(f"unknown verifier {kind!r}; use one of {VERIFIER_KINDS}")


# --- Avg@k, Best@k, pass@k ------------------------------------------------------------------


def _check_groups(correct: Sequence[Sequence[bool]]) -> None:
    if not correct:
        raise ValueError("Avg@k of no prompts is undefined")
    for index, samples in enumerate(correct):
        if not samples:
            raise ValueError(f"prompt {index} has no samples; Avg@k needs at least one")


def avg_at_k(correct: Sequence[Sequence[bool]]) -> float:
    """Avg@k as a fraction in [0, 1]: the mean over prompts of each prompt's fraction correct.

    ``correct[i][j]`` says whether sample j of prompt i is right.
    """
    _check_groups(correct)
    return sum(sum(samples) / len(samples) for samples in correct) / len(correct)


def best_at_k(correct: Sequence[Sequence[bool]]) -> float:
    """Best@k as a fraction: the share of prompts with at least one right sample of their k."""
    _check_groups(correct)
    return sum(any(samples) for samples in correct) / len(correct)


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """The unbiased pass@k of one prompt from n samples of which c are right (Chen et al. 2021,
    "Evaluating Large Language Models Trained on Code"): ``1 - C(n - c, k) / C(n, k)``, the
    probability that k samples drawn without replacement from the n include a right one.

    Exact integer binomials, one rounding at the division; needs ``1 <= k <= n``.
    """
    if not 0 <= num_correct <= num_samples:
        raise ValueError(
            f"pass@k needs 0 <= correct <= samples, got {num_correct} of {num_samples}"
        )
    if not 1 <= k <= num_samples:
        raise ValueError(f"pass@{k} needs 1 <= k <= samples per prompt ({num_samples})")
    if num_samples - num_correct < k:
        return 1.0
    return 1.0 - math.comb(num_samples - num_correct, k) / math.comb(num_samples, k)


def mean_pass_at_k(correct: Sequence[Sequence[bool]], k: int) -> float:
    """pass@k as a fraction: :func:`pass_at_k` of every prompt's samples, averaged."""
    _check_groups(correct)
    return sum(pass_at_k(len(s), sum(s), k) for s in correct) / len(correct)


def pass_k_values(n: int) -> tuple[int, ...]:
    """The k of the pass@k an evaluation with n samples per prompt reports: 1, 2, 4, ... up to
    n, and n itself."""
    values = [2**power for power in range(n.bit_length()) if 2**power <= n]
    return tuple(sorted({*values, n}))


@dataclass(frozen=True)
class EvalSummary:
    """One evaluation: Avg@k, Best@k and pass@k (fractions) and response lengths in tokens."""

    accuracy: float
    num_prompts: int
    k: int
    mean_response_length: float
    truncated_fraction: float | None = None
    """Fraction of samples that stopped at the token limit (finish reason 'length'); None when
    finish reasons were not given."""
    best: float | None = None
    """Best@k: the share of prompts with at least one right sample."""
    pass_at: dict[int, float] = field(default_factory=dict)
    """Unbiased pass@j for each j of :func:`pass_k_values` (pass@1 equals Avg@k, pass@k
    equals Best@k)."""

    def as_metrics(self, prefix: str = "eval/") -> dict[str, float]:
        """Metric names and values: ``avg_at_k`` (fraction), ``response_length``, ``k``,
        ``num_prompts`` and, when known, ``truncated_fraction``, ``best_at_k`` and
        ``pass_at_{j}``, each after ``prefix``."""
        metrics = {
            "avg_at_k": self.accuracy,
            "response_length": self.mean_response_length,
            "k": float(self.k),
            "num_prompts": float(self.num_prompts),
        }
        if self.truncated_fraction is not None:
            metrics["truncated_fraction"] = self.truncated_fraction
        if self.best is not None:
            metrics["best_at_k"] = self.best
        for j, value in sorted(self.pass_at.items()):
            metrics[f"pass_at_{j}"] = value
        return {prefix + name: value for name, value in metrics.items()}


def _check_same_shape(name: str, values: Sequence[Sequence[Any]], k: int, prompts: int) -> None:
    if len(values) != prompts or any(len(row) != k for row in values):
        raise ValueError(f"{name} must have the shape of correct: {prompts} prompts x {k} samples")


def summarize(
    correct: Sequence[Sequence[bool]],
    response_lengths: Sequence[Sequence[int]],
    finish_reasons: Sequence[Sequence[str]] | None = None,
) -> EvalSummary:
    """Summarise an evaluation of ``len(correct)`` prompts with k samples each.

    ``response_lengths`` (tokens) and ``finish_reasons`` (SGLang's 'stop', 'length', 'abort')
    have the shape of ``correct``; every prompt must have the same number of samples k.
    """
    _check_groups(correct)
    k, prompts = len(correct[0]), len(correct)
    if any(len(samples) != k for samples in correct):
        raise ValueError(f"every prompt needs the same number of samples (prompt 0 has {k})")
    _check_same_shape("response_lengths", response_lengths, k, prompts)
    truncated = None
    if finish_reasons is not None:
        _check_same_shape("finish_reasons", finish_reasons, k, prompts)
        truncated = sum(r == "length" for row in finish_reasons for r in row) / (k * prompts)
    return EvalSummary(
        accuracy=avg_at_k(correct),
        num_prompts=prompts,
        k=k,
        mean_response_length=sum(map(sum, response_lengths)) / (k * prompts),
        truncated_fraction=truncated,
        best=best_at_k(correct),
        pass_at={j: mean_pass_at_k(correct, j) for j in pass_k_values(k)},
    )
