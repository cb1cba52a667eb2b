"""Existing option dataclasses (PositionSpec, SamplingConfig, ...) used as config sections.

Pydantic validates a stdlib dataclass field by field and runs its ``__post_init__``, so the
dataclass stays the one definition. :func:`adopt` adds what a config needs around it:
defaults that differ from the dataclass's (the paper's n=2, say), an extra check, a YAML-safe
dump, and one sentence per field for docs/config.md.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Mapping
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, PlainSerializer

from oprd_mega.config.base import BOOLEAN_FOR_NUMBER, invalid, takes_number_not_boolean


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity inside Annotated
class Adopted:
    """Marker in an adopted field's ``Annotated`` metadata: the dataclass and its field docs.

    A field without a description (one added to the dataclass later) documents as empty until
    the adopting module describes it; tests/config fails until then.
    """

    cls: type
    docs: Mapping[str, str]
    defaults: Mapping[str, Any]
    derived: Mapping[str, str] = dataclasses.field(default_factory=dict)
    nested: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def default(self) -> Any:
        """The dataclass built from this section's defaults (fails if a field is required)."""
        return self.cls(**self.defaults)


def plain(value: Any) -> Any:
    """``value`` as YAML-safe builtins: dataclasses as dicts, tuples as lists, sets sorted."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, frozenset | set):
        return sorted(plain(v) for v in value)
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def _refuse_booleans_for_numbers(cls: type, value: Mapping[str, Any], prefix: str = "") -> None:
    """Raise on a boolean given for a numeric field of dataclass ``cls`` (or of a dataclass
    field inside it): pydantic would read ``true`` as 1 before ``__post_init__`` sees it."""
    hints = typing.get_type_hints(cls)
    for name, given in value.items():
        hint = hints.get(str(name))
        if isinstance(given, bool) and takes_number_not_boolean(hint):
            raise invalid(f"{prefix}{name}", given, BOOLEAN_FOR_NUMBER)
        inner = [t for t in typing.get_args(hint) or (hint,) if dataclasses.is_dataclass(t)]
        if isinstance(given, Mapping) and inner:
            _refuse_booleans_for_numbers(inner[0], given, f"{prefix}{name}.")


def adopt(
    cls: type,
    docs: Mapping[str, str],
    *,
    defaults: Mapping[str, Any] | None = None,
    check: Callable[[Any], Any] | None = None,
    derived: Mapping[str, str] | None = None,
    nested: Mapping[str, Any] | None = None,
) -> Any:
    """An ``Annotated`` type validating ``cls`` from a mapping.

    ``defaults`` fill keys the input leaves out; ``check`` receives the built instance and
    returns it (or a normalised copy) or raises ``ValueError``. ``derived`` maps fields that
    the enclosing section fills in from another key (field -> that dotted key): they are not
    keys of this section, so neither dumped nor documented here. ``nested`` maps fields that
    hold a dataclass of their own to its adopted type, so their keys document as a subsection.
    """
    derived = dict(derived or {})
    docs = {f.name: docs.get(f.name, "") for f in dataclasses.fields(cls) if f.name not in derived}
    defaults = dict(defaults or {})

    def dump(value: Any) -> Any:
        data = plain(value)
        return {k: v for k, v in data.items() if k not in derived}

    def fill(value: Any) -> Any:
        if isinstance(value, Mapping):
            _refuse_booleans_for_numbers(cls, value)
            return {**defaults, **value}
        return value

    metadata: list[Any] = [
        Adopted(cls, docs, defaults, derived, dict(nested or {})),
        BeforeValidator(fill),
    ]
    if check is not None:
        metadata.append(AfterValidator(check))
    metadata.append(PlainSerializer(dump, when_used="json"))
    return Annotated[cls, *metadata]
