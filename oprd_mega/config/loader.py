"""Read a YAML config, apply dotted ``key.sub=value`` overrides, validate; dump it back."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from oprd_mega.config.errors import ConfigError, from_validation_error
from oprd_mega.config.schema import TrainConfig

_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when available
_SafeDumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


class _Loader(_SafeLoader):  # type: ignore[misc, valid-type]
    """Safe loader that also reads ``1e-5`` as a float (YAML 1.1 wants ``1.0e-5``)."""


class _Dumper(_SafeDumper):  # type: ignore[misc, valid-type]
    """Safe dumper that quotes the strings :class:`_Loader` would read as floats (``"1e5"``)."""


_FLOAT = (
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)
_Loader.add_implicit_resolver(*_FLOAT)
_Dumper.add_implicit_resolver(*_FLOAT)


def format_value(value: Any) -> str:
    """``value`` as override text that :func:`parse_value` reads back as the same value."""
    text = yaml.dump(value, Dumper=_Dumper, default_flow_style=True)
    return text.strip().removesuffix("...").strip()


def parse_value(text: str) -> Any:
    """An override's value as a YAML scalar or flow list/map (``3``, ``true``, ``null``,
    ``[1, 2]``); text that is not valid YAML stays a string."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError:
        return text


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML file; errors name the file (and line for syntax errors)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"cannot read config file: {exc.strerror}"], str(path)) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(
            [f"not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start})"],
            str(path),
        ) from exc
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        raise ConfigError([f"not valid YAML: {exc}"], str(path)) from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            [f"the top level must be a mapping of keys, got {type(data).__name__}"], str(path)
        )
    return data


def apply_override(data: dict[str, Any], override: str) -> dict[str, Any]:
    """A copy of ``data`` with ``key.sub=value`` set, creating missing sections."""
    key, sep, text = override.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not sep or not key or not all(parts):
        raise ConfigError([f"override {override!r}: expected dotted.key=value"])
    value = parse_value(text)
    result = dict(data)
    node = result
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = {}
        elif not isinstance(child, Mapping):
            where = ".".join(parts[: depth + 1])
            raise ConfigError(
                [f"override {override!r}: {where} = {child!r} is a value, not a section"]
            )
        node[part] = dict(child)
        node = node[part]
    node[parts[-1]] = value
    return result


def validate_config(data: Mapping[str, Any], source: str | None = None) -> TrainConfig:
    """A TrainConfig from plain data, or a ConfigError listing every problem."""
    try:
        return TrainConfig.model_validate(dict(data))
    except ValidationError as exc:
        raise from_validation_error(TrainConfig, exc, source) from None


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read ``path`` (YAML; None: start empty), apply ``overrides`` in order, validate."""
    data = read_yaml(path) if path is not None else {}
    for override in overrides:
        data = apply_override(data, override)
    source = str(path) if path is not None else None
    if overrides:
        source = f"{source or ''} with overrides {' '.join(overrides)}".strip()
    return validate_config(data, source)


def to_yaml(config: TrainConfig) -> str:
    """The resolved configuration as YAML (every key, defaults included)."""
    data = config.model_dump(mode="json")
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100)


def dump_config(config: TrainConfig, path: str | Path) -> Path:
    """Write the resolved configuration to ``path`` (atomically); it loads to an equal object."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text("# oprd-mega resolved configuration\n" + to_yaml(config), encoding="utf-8")
    temporary.replace(path)
    return path
