"""Configuration errors: every message names the dotted key, the value and what is allowed."""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ValidationError

from oprd_mega.config.adopt import Adopted, plain
from oprd_mega.config.fields import (
    DERIVED_DEFAULTS,
    all_keys,
    children,
    section_of,
    target_at,
    type_name,
)
from oprd_mega.errors import ConfigError


def dotted(path: Sequence[str | int]) -> str:
    """``('optimizer', 'betas', 1)`` -> ``optimizer.betas[1]``."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text or "(top level)"


def show(value: Any, limit: int = 80) -> str:
    """A value as YAML-ish JSON (``true``, ``null``, ``"x"``), shortened."""
    try:
        text = json.dumps(plain(value))
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def suggest(root: type[BaseModel], path: Sequence[str | int], name: str) -> str:
    """'did you mean ...' for an unknown key: a sibling, else a key of that name elsewhere."""
    target = target_at(root, path)
    siblings = [c.name for c in children(target)] if target is not None else []
    close = difflib.get_close_matches(name, siblings, n=1, cutoff=0.6)
    if close:
        return f"did you mean {dotted([*path, close[0]])!r}? "
    elsewhere = [k for k in all_keys(root) if k.rsplit(".", 1)[-1] == name]
    if not elsewhere:
        leaves = {k.rsplit(".", 1)[-1]: k for k in all_keys(root)}
        near = difflib.get_close_matches(name, list(leaves), n=1, cutoff=0.8)
        elsewhere = [leaves[n] for n in near]
    if elsewhere:
        return f"did you mean {elsewhere[0]!r}? "
    return ""


def _allowed_keys(root: type[BaseModel], path: Sequence[str | int]) -> str:
    target = target_at(root, path)
    if target is None:
        return ""
    return "allowed keys: " + ", ".join(c.name for c in children(target))


def _expected(root: type[BaseModel], path: Sequence[str | int]) -> str:
    """What a missing key should hold."""
    key = dotted(path)
    if key in DERIVED_DEFAULTS:
        return f"it defaults to {DERIVED_DEFAULTS[key]}, which is missing too"
    target = target_at(root, path[:-1])
    child = next((c for c in children(target) if c.name == path[-1]), None) if target else None
    if child is None:
        return "see docs/config.md"
    section = section_of(child.annotation, child.metadata)
    if section is not None:
        return "expected a section with keys: " + ", ".join(c.name for c in children(section))
    return f"expected {type_name(child.annotation)}: {child.description}"


def _dataclass_field(target: Adopted, message: str) -> str | None:
    """The field a dataclass's own check names (``LaunchConfig.num_servers must ...``)."""
    names = {c.name for c in children(target)} | set(target.derived)
    for match in re.finditer(r"\w+\.(\w+)", message):
        if match.group(1) in names:
            return match.group(1)
    return None


# Pydantic's Python words for the YAML ones a user writes.
_YAML_WORDS = {
    "a valid tuple": "a list",
    "a valid frozenset": "a list",
    "a valid set": "a list",
    "a valid dictionary": "a mapping",
}


def describe(root: type[BaseModel], error: Any) -> str:
    """One line for one pydantic error dict."""
    path = list(error["loc"])
    kind = error["type"]
    value = error.get("input")
    message = str(error["msg"]).removeprefix("Value error, ")
    for python, yaml_word in _YAML_WORDS.items():
        message = message.replace(python, yaml_word)
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        parent, name = path[:-1], str(path[-1])
        hint = suggest(root, parent, name)
        return f"{dotted(path)} = {show(value)}: unknown key; {hint}{_allowed_keys(root, parent)}"
    if kind == "missing" and path and isinstance(path[-1], int):  # a fixed-length list
        target = target_at(root, path[:-2])
        child = next((c for c in children(target) if c.name == path[-2]), None) if target else None
        expected = type_name(child.annotation) if child else "more items"
        return f"{dotted(path[:-1])} = {show(value)}: too few items; expected {expected}"
    if kind in ("missing", "missing_argument"):
        return f"{dotted(path)}: required key is missing; {_expected(root, path)}"
    if kind == "config_check":
        context = error["ctx"]
        path = [*path, *context["key"].split(".")]
        return f"{dotted(path)} = {show(context['value'])}: {context['message']}"
    target = target_at(root, path)
    if kind == "value_error" and isinstance(target, Adopted):
        field = _dataclass_field(target, message)
        if field is not None:
            if isinstance(value, dict) and field in value:
                value = value[field]
            key = target.derived.get(field) or dotted([*path, field])
            return f"{key} = {show(value)}: {message}"
    return f"{dotted(path)} = {show(value)}: {message}"


def from_validation_error(
    root: type[BaseModel], error: ValidationError, source: str | None = None
) -> ConfigError:
    """A ConfigError with one line per problem pydantic found."""
    return ConfigError([describe(root, e) for e in error.errors()], source)
