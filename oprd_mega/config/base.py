"""The base of every configuration section and the error a section check raises."""

from __future__ import annotations

import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

BOOLEAN_FOR_NUMBER = "a number, not true/false"


def _accepted_types(annotation: Any) -> set[Any]:
    """The scalar types a field annotation accepts (through Annotated, unions, Literal)."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _accepted_types(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return set().union(*(_accepted_types(arg) for arg in get_args(annotation)))
    if origin is Literal:
        return {type(arg) for arg in get_args(annotation)}
    return {annotation}


def takes_number_not_boolean(annotation: Any) -> bool:
    """Whether a field takes an int or a float but no boolean: pydantic's lax mode would read
    ``true`` there as 1 (``pipeline_split.first: true`` as one layer)."""
    accepted = _accepted_types(annotation)
    return bool(accepted & {int, float}) and bool not in accepted


class Section(BaseModel):
    """A frozen configuration section: unknown keys are errors, field docstrings document it."""

    # allow_inf_nan=False: a NaN or infinite number (lr=.inf) is refused where it is given.
    model_config = ConfigDict(
        frozen=True, extra="forbid", use_attribute_docstrings=True, allow_inf_nan=False
    )

    @field_validator("*", mode="before")
    @classmethod
    def _refuse_booleans_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if isinstance(value, bool) and field and takes_number_not_boolean(field.annotation):
            raise PydanticCustomError("bool_for_number", BOOLEAN_FOR_NUMBER)
        return value


def invalid(key: str, value: Any, message: str) -> PydanticCustomError:
    """A cross-field check failure on ``key`` (dotted, relative to the section) with ``value``.

    ``message`` says what is allowed; the loader prefixes the full dotted key and the value.
    """
    return PydanticCustomError(
        "config_check", "{message}", {"key": key, "value": value, "message": message}
    )
