"""The project's error kinds, one class each, and the one value check every package shares;
importable from every package (no heavy imports)."""

from __future__ import annotations

from collections.abc import Sequence


def is_positive_int(value: object) -> bool:
    """Whether ``value`` is an int >= 1; ``True`` is not one (Python counts it as 1)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def cannot_write(setting: str, path: object, exc: OSError) -> str:
    """One line for an output path that cannot be written: the flag or key that named it, the
    path and the system's reason (e.g. "No space left on device")."""
    reason = exc.strerror or str(exc)
    where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(path) else ""
    return f"{setting} {path}: cannot write it: {reason}{where}"


class ConfigError(ValueError):
    """One or more configuration problems, one line each.

    A run config's problems come as a list (with the file or override they come from in
    ``source``) and read as ``invalid configuration (source):`` plus one line per problem; a
    single string (an unsupported Hugging Face config.json field) is the whole message.
    """

    def __init__(self, problems: str | Sequence[str], source: str | None = None) -> None:
        self.source = source
        if isinstance(problems, str):
            self.problems = [problems]
            super().__init__(problems)
            return
        self.problems = list(problems)
        where = f" ({source})" if source else ""
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid configuration{where}:\n{lines}")


class CheckpointError(ValueError, RuntimeError):
    """A checkpoint (Hugging Face or the trainer's) is missing, malformed, incomplete or does
    not fit this run; the message names the file or tensor.

    A ValueError for conversion's callers and a RuntimeError for the trainer's. ``shared``:
    every rank raises the same error, so rank 0 alone reports it.
    """

    shared: bool = False
