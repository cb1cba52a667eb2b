"""Walk the configuration schema: every dotted key with its type, default and meaning.

docs/config.md and the errors' did-you-mean suggestions both come from here, so neither can
drift from the models.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from oprd_mega.config.adopt import Adopted, plain

# Defaults that another key supplies at load time.
DERIVED_DEFAULTS = {
    "rollout.launch.model_path": "student.path",
    "evaluation.sampling.n": "evaluation.k",
}

Target = type[BaseModel] | Adopted


@dataclass(frozen=True)
class Key:
    """One leaf key of the configuration."""

    key: str
    type: str
    default: str
    description: str


@dataclass(frozen=True)
class Child:
    """A field of a section: its annotation, default (``PydanticUndefined`` if required)."""

    name: str
    annotation: Any
    metadata: tuple[Any, ...]
    default: Any
    description: str


def _flatten(annotation: Any, metadata: tuple[Any, ...] = ()) -> tuple[Any, tuple[Any, ...]]:
    """Strip ``Annotated`` layers, collecting their metadata."""
    while get_origin(annotation) is Annotated:
        inner, *extra = get_args(annotation)
        annotation, metadata = inner, (*metadata, *extra)
    return annotation, metadata


def _is_union(annotation: Any) -> bool:
    return get_origin(annotation) in (Union, types.UnionType)


def section_of(annotation: Any, metadata: tuple[Any, ...] = ()) -> Target | None:
    """The section (pydantic model or adopted dataclass) a field holds, or None for a leaf."""
    annotation, metadata = _flatten(annotation, metadata)
    for item in metadata:
        if isinstance(item, Adopted):
            return item
    if _is_union(annotation):
        for arg in get_args(annotation):
            if arg is not type(None):
                found = section_of(arg)
                if found is not None:
                    return found
        return None
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def children(target: Target) -> list[Child]:
    """The fields of a section, in declaration order."""
    if isinstance(target, Adopted):
        hints = typing.get_type_hints(target.cls)
        result = []
        for field in dataclasses.fields(target.cls):
            if field.name in target.derived:
                continue
            if field.name in target.defaults:
                default = target.defaults[field.name]
            elif field.default is not dataclasses.MISSING:
                default = field.default
            elif field.default_factory is not dataclasses.MISSING:
                default = field.default_factory()
            else:
                default = PydanticUndefined
            annotation = target.nested.get(field.name, hints[field.name])
            result.append(Child(field.name, annotation, (), default, target.docs[field.name]))
        return result
    return [
        Child(
            name,
            info.annotation,
            tuple(info.metadata),
            info.default_factory() if info.default_factory is not None else info.default,  # type: ignore[call-arg]
            info.description or "",
        )
        for name, info in target.model_fields.items()
    ]


def _mapped_section(annotation: Any) -> Target | None:
    """The value section of a ``dict[str, Section]`` field (named sections), or None."""
    annotation, _ = _flatten(annotation)
    if get_origin(annotation) is dict:
        return section_of(get_args(annotation)[1])
    return None


def listed_section(annotation: Any) -> Target | None:
    """The entry section of a list-of-sections field (``tuple[Section, ...]``), or None."""
    annotation, _ = _flatten(annotation)
    args = get_args(annotation)
    if get_origin(annotation) in (tuple, list) and args and (len(args) == 1 or args[1] is ...):
        return section_of(args[0])
    return None


def target_at(root: type[BaseModel], path: typing.Sequence[str | int]) -> Target | None:
    """The section at ``path`` (field names; list indexes and the names of a map of sections
    are skipped), or None."""
    target: Target | None = root
    name_of_entry = False
    for part in path:
        if isinstance(part, int) or name_of_entry:
            name_of_entry = False
            continue
        if target is None:
            return None
        child = next((c for c in children(target) if c.name == part), None)
        if child is None:
            return None
        target = section_of(child.annotation, child.metadata)
        if target is None:
            target = _mapped_section(child.annotation)
            name_of_entry = target is not None
        if target is None:
            target = listed_section(child.annotation)  # the index that follows is skipped
    return target


def type_name(annotation: Any) -> str:
    """A short YAML-minded name of a field type: ``int``, ``'a' | 'b'``, ``list[int] | null``."""
    annotation, _ = _flatten(annotation)
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if _is_union(annotation):
        names = [type_name(a) for a in args if a is not type(None)]
        return " | ".join(names + (["null"] if type(None) in args else []))
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list[{type_name(args[0])}]"
        return "[" + ", ".join(type_name(a) for a in args) + "]"
    if origin in (list, set, frozenset):
        return f"list[{type_name(args[0])}]"
    if origin is dict:
        return f"map[{type_name(args[0])}, {type_name(args[1])}]"
    if annotation is typing.Any:
        return "any"
    return getattr(annotation, "__name__", str(annotation))


def default_text(key: str, default: Any) -> str:
    """The default as YAML-ish JSON, ``required`` or the key it is derived from."""
    if key in DERIVED_DEFAULTS:
        return DERIVED_DEFAULTS[key]
    if default is PydanticUndefined:
        return "required"
    return json.dumps(plain(default))


@dataclass(frozen=True)
class Group:
    """A section: its dotted key ('' for the root), what it is, whether it may be null."""

    key: str
    description: str
    nullable: bool
    keys: list[Key]


def groups(root: type[BaseModel]) -> list[Group]:
    """Every section under ``root`` (itself first) with its leaf keys, depth first."""
    result = [Group("", (root.__doc__ or "").strip(), False, [])]
    _walk(root, "", result[0].keys, result)
    return result


def _walk(target: Target, prefix: str, leaves: list[Key], result: list[Group]) -> None:
    for child in children(target):
        key = f"{prefix}.{child.name}" if prefix else child.name
        sub = section_of(child.annotation, child.metadata)
        entry = listed_section(child.annotation) if sub is None else None
        if sub is None:
            default = default_text(key, child.default)
            leaves.append(Key(key, type_name(child.annotation), default, child.description))
            if entry is not None:  # a list of sections: its entries' keys as KEY[].sub
                group = Group(f"{key}[]", child.description, False, [])
                result.append(group)
                _walk(entry, f"{key}[]", group.keys, result)
            continue
        annotation, _ = _flatten(child.annotation)
        nullable = _is_union(annotation) and type(None) in get_args(annotation)
        group = Group(key, child.description, nullable, [])
        result.append(group)
        _walk(sub, key, group.keys, result)


def all_keys(root: type[BaseModel]) -> list[str]:
    """Every dotted key, sections included."""
    keys: list[str] = []
    for group in groups(root):
        keys += ([group.key] if group.key else []) + [k.key for k in group.keys]
    return keys
