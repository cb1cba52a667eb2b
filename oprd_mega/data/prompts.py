"""Prompt datasets: JSONL or Parquet rows turned into token ids, with a chat template or raw."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


class PromptDataError(ValueError):
    """A prompt file is missing, unreadable or has a row that cannot become a prompt."""


@dataclass(frozen=True)
class Prompt:
    """One prompt: its row index in the file, token ids, and the row's other columns."""

    index: int
    prompt_ids: tuple[int, ...]
    extra: dict[str, Any] = field(default_factory=dict)


def _read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PromptDataError(f"{path}:{line_no}: invalid JSON ({exc.msg})") from exc
            if not isinstance(row, dict):
                raise PromptDataError(f"{path}:{line_no}: a row must be a JSON object")
            yield row


def _read_parquet(path: Path) -> Iterator[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise PromptDataError(
            f"{path}: reading Parquet needs pyarrow (pip install 'oprd-mega[parquet]')"
        ) from exc
    yield from pq.read_table(path).to_pylist()


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """All rows of a ``.jsonl``/``.json`` (one object a line) or ``.parquet`` file."""
    path = Path(path)
    if not path.is_file():
        raise PromptDataError(f"prompt file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return list(_read_jsonl(path))
    if suffix == ".parquet":
        return list(_read_parquet(path))
    raise PromptDataError(f"{path}: unknown prompt file type {suffix!r} (use .jsonl or .parquet)")


def _render(
    value: Any, tokenizer: Any, chat_template: bool, where: str, system: str | None
) -> list[int]:
    if chat_template:
        if isinstance(value, str):
            messages: Sequence[dict[str, Any]] = [{"role": "user", "content": value}]
        elif isinstance(value, list) and all(
            isinstance(m, dict) and "role" in m and "content" in m for m in value
        ):
            messages = value
        else:
            raise PromptDataError(
                f"{where}: a chat prompt must be a string or a list of "
                "{'role', 'content'} messages"
            )
        if system is not None and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": system}, *messages]
        if getattr(tokenizer, "chat_template", None) is None:
            raise PromptDataError(f"{where}: the tokenizer has no chat template; use raw prompts")
        text = tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=True
        )
        return list(tokenizer.encode(text, add_special_tokens=False))
    if not isinstance(value, str):
        raise PromptDataError(f"{where}: a raw prompt must be a string, got {type(value).__name__}")
    return list(tokenizer.encode(value, add_special_tokens=True))


def load_prompts(
    path: str | Path,
    tokenizer: Any,
    prompt_key: str = "prompt",
    chat_template: bool = True,
    max_prompt_length: int | None = None,
    on_too_long: Literal["error", "skip"] = "error",
    system_prompt: str | None = None,
) -> list[Prompt]:
    """Read and tokenize every prompt of a file.

    ``prompt_key`` names the column holding the prompt (a string, or chat messages when
    ``chat_template``). Prompts longer than ``max_prompt_length`` tokens raise
    :class:`PromptDataError` naming the row, or are skipped with ``on_too_long="skip"``.
    """
    if on_too_long not in ("error", "skip"):
        raise ValueError(f"on_too_long must be 'error' or 'skip', got {on_too_long!r}")
    rows = read_rows(path)
    if not rows:
        raise PromptDataError(f"prompt file {path} has no rows")
    prompts: list[Prompt] = []
    for index, row in enumerate(rows):
        where = f"{path} row {index}"
        if prompt_key not in row:
            raise PromptDataError(
                f"{where}: no column {prompt_key!r} (columns: {sorted(row)}); "
                "set prompt_key to the prompt column"
            )
        ids = _render(row[prompt_key], tokenizer, chat_template, where, system_prompt)
        if not ids:
            raise PromptDataError(f"{where}: the prompt is empty after tokenization")
        if max_prompt_length is not None and len(ids) > max_prompt_length:
            if on_too_long == "skip":
                continue
            raise PromptDataError(
                f"{where}: prompt has {len(ids)} tokens, more than max_prompt_length="
                f"{max_prompt_length}"
            )
        extra = {k: v for k, v in row.items() if k != prompt_key}
        prompts.append(Prompt(index=index, prompt_ids=tuple(ids), extra=extra))
    return prompts
