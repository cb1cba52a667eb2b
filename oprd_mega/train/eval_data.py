"""Evaluation prompt files from local competition-math files (AIME, MATH), with no download.

Reads JSONL or Parquet rows in the layouts these sets are published in, e.g. AIME
(``problem``, ``answer``, ``solution``, ``id``, ``year``; some copies capitalise the names or
call the problem ``question``) and MATH / MATH-500 (``problem``, ``solution`` with the answer in
its last ``\\boxed{}``, ``level``, ``type`` or ``subject``, and for MATH-500 an ``answer``), and
writes the ``{"prompt", "answer"}`` JSONL rows that ``evaluation.prompts`` and ``oprd-mega
evaluate`` read. ``tools/prepare_eval.py`` is its command line.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from oprd_mega.data.prompts import PromptDataError, read_rows
from oprd_mega.lifetime import plain_permissions
from oprd_mega.train.verifiers import extract_boxed

PROBLEM_KEYS = ("problem", "Problem", "question", "Question")
ANSWER_KEYS = ("answer", "Answer")
SOLUTION_KEYS = ("solution", "Solution")
DEFAULT_TEMPLATE = (
    "{problem}\n\nPlease reason step by step, and put your final answer within \\boxed{{}}."
)
"""The usual instruction of math evaluations (the answer in a box, which the 'boxed' and
'math-verify' verifiers read)."""


def _pick(row: dict[str, Any], given: str | None, candidates: Sequence[str]) -> str | None:
    """The column to read: ``given`` when set, else the first candidate the row has."""
    if given is not None:
        return given if given in row else None
    return next((key for key in candidates if key in row), None)


def _answer_text(value: Any) -> str | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    return text or None


def convert_rows(
    rows: Sequence[dict[str, Any]],
    source: str,
    template: str = DEFAULT_TEMPLATE,
    problem_key: str | None = None,
    answer_key: str | None = None,
    solution_key: str | None = None,
) -> list[dict[str, Any]]:
    """Prompt rows ``{"prompt", "answer", "source", "source_row", ...}`` from ``rows`` of the
    file ``source``.

    The answer is the answer column when the row has a non-empty one, else the content of the
    last ``\\boxed{}`` of the solution column. Other scalar columns (id, year, level, type,
    subject, ...) are kept. A row without a problem or without any answer is an error naming
    ``source`` and the row.
    """
    if "{problem}" not in template:
        raise ValueError(f"the template must contain {{problem}}, got {template!r}")
    out = []
    for index, row in enumerate(rows):
        where = f"{source} row {index}"
        problem_column = _pick(row, problem_key, PROBLEM_KEYS)
        if problem_column is None:
            wanted = problem_key or " / ".join(PROBLEM_KEYS)
            raise PromptDataError(
                f"{where}: no problem column ({wanted}); columns: {sorted(row)} (use --problem-key)"
            )
        problem = row[problem_column]
        if not isinstance(problem, str) or not problem.strip():
            raise PromptDataError(f"{where}: column {problem_column!r} is not a non-empty string")
        answer_column = _pick(row, answer_key, ANSWER_KEYS)
        answer = _answer_text(row[answer_column]) if answer_column is not None else None
        solution_column = _pick(row, solution_key, SOLUTION_KEYS)
        if answer is None and solution_column is not None:
            solution = row[solution_column]
            answer = extract_boxed(solution) if isinstance(solution, str) else None
            answer = answer.strip() if answer else None
        if answer is None:
            raise PromptDataError(
                f"{where}: no answer: column {answer_key or ' / '.join(ANSWER_KEYS)} is missing "
                f"or empty and column {solution_key or ' / '.join(SOLUTION_KEYS)} has no "
                f"\\boxed{{}} answer; columns: {sorted(row)}"
            )
        used = {problem_column, answer_column, solution_column}
        kept = {
            key: value
            for key, value in row.items()
            if key not in used
            and isinstance(value, str | int | float | bool)
            and key not in ("prompt", "answer", "source", "source_row")
        }
        out.append(
            {
                "prompt": template.format(problem=problem.strip()),
                "answer": answer,
                "source": source,
                "source_row": index,
                **kept,
            }
        )
    return out


def write_jsonl(rows: Sequence[dict[str, Any]], path: Path, force: bool) -> None:
    """Write ``rows`` to ``path`` atomically (a temporary sibling, then a rename); an existing
    ``path`` is an error unless ``force``."""
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists; pass --force to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        plain_permissions(Path(tmp))
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            for row in rows:
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``tools/prepare_eval.py``."""
    parser = argparse.ArgumentParser(
        prog="prepare_eval.py",
        description="Turn local AIME/MATH-style JSONL or Parquet files into one evaluation prompt "
        "file (JSONL rows with 'prompt' and 'answer') for evaluation.prompts, "
        "evaluation.sets.NAME.prompts or oprd-mega evaluate. Nothing is downloaded.",
    )
    parser.add_argument(
        "inputs", nargs="+", type=Path, help="input files (.jsonl or .parquet), concatenated"
    )
    parser.add_argument("-o", "--output", required=True, type=Path, help="output JSONL file")
    parser.add_argument(
        "--force", action="store_true", help="overwrite the output file when it exists"
    )
    parser.add_argument(
        "--template",
        default=DEFAULT_TEMPLATE,
        help="prompt text with a {problem} field (default: the problem, then 'Please reason step "
        "by step, and put your final answer within \\boxed{}.')",
    )
    parser.add_argument(
        "--problem-key", default=None, help="problem column (default: problem, Problem, question)"
    )
    parser.add_argument(
        "--answer-key", default=None, help="answer column (default: answer, Answer)"
    )
    parser.add_argument(
        "--solution-key",
        default=None,
        help="solution column whose last \\boxed{} is the answer when the row has no answer "
        "(default: solution, Solution)",
    )
    parser.add_argument(
        "--limit", type=int, default=None, help="keep the first N rows of the result"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Convert, write, print a one-line summary; errors name the file and row."""
    args = build_parser().parse_args(argv)
    rows: list[dict[str, Any]] = []
    try:
        for path in args.inputs:
            source = read_rows(path)
            if not source:
                raise PromptDataError(f"{path} has no rows")
            rows += convert_rows(
                source,
                str(path),
                args.template,
                args.problem_key,
                args.answer_key,
                args.solution_key,
            )
        rows = rows[: args.limit]
        write_jsonl(rows, args.output, args.force)
    except (PromptDataError, FileExistsError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from exc
    print(f"wrote {len(rows)} prompts to {args.output}")
    return 0
