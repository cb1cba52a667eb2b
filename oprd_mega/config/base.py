"""The base of every configuration section and the error a section check raises."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict
from pydantic_core import PydanticCustomError


class Section(BaseModel):
    """A frozen configuration section: unknown keys are errors, field docstrings document it."""

    # allow_inf_nan=False: a NaN or infinite number (lr=.inf) is refused where it is given.
    model_config = ConfigDict(
        frozen=True, extra="forbid", use_attribute_docstrings=True, allow_inf_nan=False
    )


def invalid(key: str, value: Any, message: str) -> PydanticCustomError:
    """A cross-field check failure on ``key`` (dotted, relative to the section) with ``value``.

    ``message`` says what is allowed; the loader prefixes the full dotted key and the value.
    """
    return PydanticCustomError(
        "config_check", "{message}", {"key": key, "value": value, "message": message}
    )
