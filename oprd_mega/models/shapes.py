"""The one rule for how a model's shapes split over tensor, pipeline and context parallelism.

Megatron needs the tensor-parallel size to divide the attention heads, the KV heads (query
groups), the FFN width and the vocabulary (``VocabParallelEmbedding`` splits it evenly), and
every pipeline stage to hold at least one layer. Context parallelism splits every sequence into
``2 x cp`` equal chunks (two per rank, load-balanced for causal attention); with sequence
parallelism each rank's ``2`` chunks split again over ``tp``, so a padded sequence length must
be a multiple of :func:`sequence_multiple`. The vocabulary is padded to a multiple of
``make_vocab_size_divisible_by`` alone (not times TP as in Megatron-LM, so the padded size, and
with it every checkpoint, is the same at every TP); TP must divide that multiple. The config
checks, the model builder and the bridge builder all ask :func:`shape_problems`; each names the
knob in its own words (the dotted config key, the command-line flag), so a layout that one
accepts the others accept too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Protocol

TP_DIVIDES = ("num_attention_heads", "num_key_value_heads", "intermediate_size")
VOCAB_DIVISOR = "make_vocab_size_divisible_by"
# The unpadded vocabulary a built model carries (oprd_mega.models.builder sets it): ids at or
# above it are padding rows, never sampled and kept out of every softmax (OPD, the weight-sync
# probe, verify).
REAL_VOCAB_ATTR = "real_vocab_size"


class ModelShape(Protocol):
    """What the rule reads of a model (``oprd_mega.models.HFModelArgs`` has it)."""

    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    make_vocab_size_divisible_by: int
    num_layers: int


@dataclass(frozen=True)
class ShapeProblem:
    """One violation: which knob (``tp``/``pp``/``cp``), its value, and what it must satisfy."""

    knob: Literal["tp", "pp", "cp"]
    value: int
    detail: str


def pipeline_split(num_layers: int, pp: int) -> dict[str, int]:
    """Megatron's ``num_layers_in_{first,last}_pipeline_stage`` for ``num_layers`` over ``pp``
    stages; empty when ``pp`` divides the depth.

    Every stage but the last holds ``ceil(num_layers / pp)`` layers and the last the rest; when
    that leaves the last stage empty, every stage holds ``floor(num_layers / pp)`` and the first
    and last share the remainder (Megatron needs the middle stages equal).
    """
    if pp < 1 or num_layers < pp:
        raise ValueError(
            f"cannot split {num_layers} layer(s) over {pp} pipeline stage(s): every stage needs "
            "at least one layer"
        )
    if num_layers % pp == 0:
        return {}
    per_stage = -(-num_layers // pp)
    last = num_layers - per_stage * (pp - 1)
    if last >= 1:
        return {"num_layers_in_last_pipeline_stage": last}
    per_stage, extra = divmod(num_layers, pp)
    return {
        "num_layers_in_first_pipeline_stage": per_stage + (extra + 1) // 2,
        "num_layers_in_last_pipeline_stage": per_stage + extra // 2,
    }


def layers_per_stage(num_layers: int, pp: int) -> list[int]:
    """How many layers each of the ``pp`` stages holds under :func:`pipeline_split`."""
    split = pipeline_split(num_layers, pp)
    if not split:
        return [num_layers // pp] * pp
    first = split.get("num_layers_in_first_pipeline_stage")
    last = split["num_layers_in_last_pipeline_stage"]
    if first is None:
        return [(num_layers - last) // (pp - 1)] * (pp - 1) + [last]
    middle = [(num_layers - first - last) // (pp - 2)] * (pp - 2) if pp > 2 else []
    return [first, *middle, last]


def sequence_multiple(*, tp: int = 1, cp: int = 1, sp: bool = False) -> int:
    """What every padded sequence length must be a multiple of: ``2 * cp`` chunks under context
    parallelism, each rank's ``s / cp`` tokens split over ``tp`` under sequence parallelism."""
    multiple = 2 * cp if cp > 1 else 1
    if sp:
        multiple = math.lcm(multiple, cp * tp)
    return multiple


def shape_problems(
    model: ModelShape,
    *,
    tp: int,
    pp: int,
    num_layers: int | None = None,
    name: str = "model",
    cp: int = 1,
    sp: bool = False,
    seq_length: tuple[str, int] | None = None,
) -> list[ShapeProblem]:
    """Every way ``tp``/``pp``/``cp`` does not fit ``model`` run to depth ``num_layers``
    (default all layers); ``name`` ("student", "teacher") appears in the details.
    ``seq_length``: ``(what it is called, value)`` of a length every padded sequence takes a
    multiple of, checked against :func:`sequence_multiple`."""
    problems = []
    if cp < 1:
        problems.append(ShapeProblem("cp", cp, "must be a positive integer"))
    elif seq_length is not None:
        what, length = seq_length
        multiple = sequence_multiple(tp=tp, cp=cp, sp=sp)
        if length % multiple:
            chunks = f"2 x cp = {2 * cp} chunks" + (
                f", each rank's share split over tp = {tp} (sequence parallelism)" if sp else ""
            )
            problems.append(
                ShapeProblem(
                    "cp",
                    cp,
                    f"{what} ({length}) must be a multiple of {multiple} ({chunks})",
                )
            )
    for field in TP_DIVIDES:
        count = getattr(model, field)
        if tp < 1 or count % tp:
            problems.append(ShapeProblem("tp", tp, f"must divide the {name}'s {field} ({count})"))
    divisor = model.make_vocab_size_divisible_by
    if tp < 1 or divisor % tp:
        problems.append(
            ShapeProblem(
                "tp",
                tp,
                f"must divide {name}.{VOCAB_DIVISOR} ({divisor}): the vocabulary is padded to "
                "a multiple of it and split evenly over tensor-parallel ranks",
            )
        )
    depth = model.num_layers if num_layers is None else num_layers
    if pp < 1 or pp > depth:
        problems.append(
            ShapeProblem(
                "pp",
                pp,
                f"the {name} runs {depth} layer(s); every pipeline stage needs at least one",
            )
        )
    return problems


def real_vocab_size(model: Any) -> int:
    """The unpadded vocabulary of a model from ``oprd_mega.models.builder`` (wrappers such as
    DDP unwrapped through ``.module``)."""
    while not hasattr(model, REAL_VOCAB_ATTR) and hasattr(model, "module"):
        model = model.module
    if not hasattr(model, REAL_VOCAB_ATTR):
        raise ValueError(f"{type(model).__name__} was not built by oprd_mega.models.builder")
    return int(getattr(model, REAL_VOCAB_ATTR))
