"""Which transformer layers are supervised, and which teacher layer each one is paired with.

Layers are 1-based transformer block indices (the embedding output is not a layer), as in
METHOD.md and in Megatron's ``layer_number``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

LAYER_MODES = ("last", "all", "even", "odd")


def select_layers(spec: str | Sequence[int], num_layers: int) -> list[int]:
    """The supervised student layers, ascending, for ``spec`` on a ``num_layers``-deep model.

    ``spec``: ``last``; ``all``; ``even`` / ``odd``, which follow the authors' released code
    (parity of the zero-based block index: ``even`` = 1-based layers 1, 3, 5, ...; ``odd`` =
    2, 4, 6, ...); or an explicit list of 1-based layers.
    """
    if num_layers < 1:
        raise ValueError(f"layers: the model has {num_layers} layers; at least 1 is needed")
    if isinstance(spec, str):
        if spec == "last":
            return [num_layers]
        if spec == "all":
            return list(range(1, num_layers + 1))
        if spec == "even":
            return list(range(1, num_layers + 1, 2))
        if spec == "odd":
            return list(range(2, num_layers + 1, 2))
        raise ValueError(
            f"layers: {spec!r} is not one of {LAYER_MODES} or a list of 1-based layer numbers"
        )
    layers = list(spec)
    if not layers:
        raise ValueError("layers: the explicit list is empty")
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise ValueError(f"layers: {layer!r} is not an integer layer number")
        if not 1 <= layer <= num_layers:
            raise ValueError(
                f"layers: {layer} is outside 1..{num_layers} "
                "(1-based; the embedding is not a layer)"
            )
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers: {layers} names a layer twice")
    return sorted(layers)


def teacher_layer_for(student_layer: int, num_student_layers: int, num_teacher_layers: int) -> int:
    """phi(l) = round((l - 1) / (L_S - 1) * (L_T - 1)) + 1: first and last layers paired.

    Exact rational arithmetic with ties rounded half up. The authors' ``linspace(...).round()``
    agrees everywhere except at exact ties, where its floating-point result falls on either
    side; a fixed rule keeps the map reproducible. A one-layer student pairs with the
    teacher's last layer.
    """
    if num_student_layers < 1 or num_teacher_layers < 1:
        raise ValueError(
            f"layer map: depths must be positive, got student {num_student_layers}, "
            f"teacher {num_teacher_layers}"
        )
    if not 1 <= student_layer <= num_student_layers:
        raise ValueError(
            f"layer map: student layer {student_layer} is outside 1..{num_student_layers}"
        )
    if num_student_layers == 1:
        return num_teacher_layers
    position = Fraction(student_layer - 1, num_student_layers - 1) * (num_teacher_layers - 1)
    return math.floor(position + Fraction(1, 2)) + 1


def layer_pairs(
    spec: str | Sequence[int],
    num_student_layers: int,
    num_teacher_layers: int,
    source_layers: Sequence[int] | None = None,
) -> list[tuple[int, int]]:
    """``(student layer, teacher layer)`` for every supervised student layer, ascending.

    ``source_layers``: a student pruned from this teacher (``oprd-mega prune``) pairs student
    layer ``l`` with the teacher layer it was copied from, ``source_layers[l - 1]``; otherwise
    :func:`teacher_layer_for`'s uniform map."""
    if source_layers is not None:
        if len(source_layers) != num_student_layers or not all(
            1 <= t <= num_teacher_layers for t in source_layers
        ):
            raise ValueError(
                f"layer map: {list(source_layers)} does not give one teacher layer in "
                f"1..{num_teacher_layers} for each of the {num_student_layers} student layers"
            )
        return [
            (layer, source_layers[layer - 1]) for layer in select_layers(spec, num_student_layers)
        ]
    return [
        (layer, teacher_layer_for(layer, num_student_layers, num_teacher_layers))
        for layer in select_layers(spec, num_student_layers)
    ]


def source_layers(student: Any, teacher: Any) -> tuple[int, ...] | None:
    """The teacher layer each student layer was copied from, when the student was pruned
    (``oprd-mega prune``) from a model as deep as this teacher; None otherwise (the uniform
    map)."""
    layer_map = getattr(student, "layer_map", None)
    if layer_map is None or layer_map.source_num_layers != teacher.num_layers:
        return None
    return layer_map.source_layers


def teacher_depth(
    pairs: Sequence[tuple[int, int]], num_teacher_layers: int, *, needs_logits: bool
) -> int:
    """How many teacher layers the step runs: all of them when an OPD term needs the
    teacher's logits, otherwise up to the deepest tapped teacher layer (the truncated teacher)."""
    if needs_logits or not pairs:
        return num_teacher_layers
    return max(teacher_layer for _, teacher_layer in pairs)
