"""Whether two model directories share a tokenizer (the same token-to-id map).

OPRD (identity, full and bridge projections) and OPD run the teacher on the student's token ids;
with another tokenizer those ids mean other strings and the targets are silently wrong.
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

# Files from which transformers builds a tokenizer; a directory with none has no tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def has_tokenizer(model_dir: str | Path) -> bool:
    """Whether ``model_dir`` holds any tokenizer file."""
    return any((Path(model_dir) / name).is_file() for name in TOKENIZER_FILES)


def token_map(model_dir: str | Path) -> dict[int, str]:
    """Token id -> token string of the tokenizer in ``model_dir`` (added tokens included)."""
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    return {index: token for token, index in tokenizer.get_vocab().items()}


def first_difference(first: dict[int, str], second: dict[int, str]) -> tuple[int, str, str] | None:
    """The lowest token id whose token differs (``"<none>"`` where one map lacks the id)."""
    for index in sorted(set(first) | set(second)):
        a, b = first.get(index, "<none>"), second.get(index, "<none>")
        if a != b:
            return index, a, b
    return None
