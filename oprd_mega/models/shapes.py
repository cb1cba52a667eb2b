"""The one rule for how a model's shapes split over tensor, pipeline and context parallelism.

Megatron needs the tensor-parallel size to divide the attention heads, the KV heads (query
groups), the FFN width and the padded vocabulary (``VocabParallelEmbedding`` splits it evenly),
and every pipeline stage to hold at least one layer, the stages between the first and the last
equally many (an uneven split is chosen automatically, or set by hand as a
:class:`PipelineSplit`). Context parallelism splits every sequence into ``2 x cp`` equal chunks
(two per rank, load-balanced for causal attention); with sequence parallelism each rank's ``2``
chunks split again over ``tp``, so a padded sequence length must be a multiple of
:func:`sequence_multiple`. The vocabulary never limits TP: it is padded to a multiple of
``make_vocab_size_divisible_by``, and where TP does not divide that, to a multiple of
``make_vocab_size_divisible_by x tp`` as in Megatron-LM (``HFModelArgs.at_tp``); a checkpoint
loads at any TP, the loader adding or dropping zero rows. The config checks, the model builder
and the bridge builder all ask :func:`shape_problems`; each names the knob in its own words
(the dotted config key, the command-line flag), so a layout that one accepts the others accept
too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from oprd_mega.errors import is_positive_int

TP_DIVIDES = ("num_attention_heads", "num_key_value_heads", "intermediate_size")
# The unpadded vocabulary a built model carries (oprd_mega.models.builder sets it): ids at or
# above it are padding rows, never sampled and kept out of every softmax (OPD, the weight-sync
# probe, verify).
REAL_VOCAB_ATTR = "real_vocab_size"


@dataclass(frozen=True)
class PipelineSplit:
    """Layers on the first and the last pipeline stage, set by hand (Megatron's
    ``num_layers_in_{first,last}_pipeline_stage``); the stages between share the rest equally,
    and a field left ``None`` makes that end stage one of them. It counts the layers the model
    runs (the truncated teacher: up to its deepest tapped layer)."""

    first: int | None = None
    last: int | None = None

    def __post_init__(self) -> None:
        for field in ("first", "last"):
            value = getattr(self, field)
            if value is not None and not is_positive_int(value):
                raise ValueError(
                    f"pipeline_split.{field} must be a positive number of layers, got {value!r}"
                )
        if self.first is None and self.last is None:
            raise ValueError("pipeline_split needs first, last or both")

    def megatron_fields(self) -> dict[str, int]:
        """The fields set, under ``TransformerConfig``'s names."""
        ends = {"first": self.first, "last": self.last}
        return {f"num_layers_in_{k}_pipeline_stage": v for k, v in ends.items() if v is not None}

    def __str__(self) -> str:
        ends = {"first": self.first, "last": self.last}
        return "{" + ", ".join(f"{k}: {v}" for k, v in ends.items() if v is not None) + "}"


class ModelShape(Protocol):
    """What the rule reads of a model (``oprd_mega.models.HFModelArgs`` has it)."""

    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    num_layers: int
    pipeline_split: PipelineSplit | None


@dataclass(frozen=True)
class ShapeProblem:
    """One violation: which knob (``tp``, ``pp``, ``cp``, the model's ``pipeline_split``), its
    value, and what it must satisfy."""

    knob: Literal["tp", "pp", "cp", "pipeline_split"]
    value: int | PipelineSplit
    detail: str


def split_problem(num_layers: int, pp: int, split: PipelineSplit) -> str | None:
    """Why ``split`` cannot place ``num_layers`` layers on ``pp`` stages (``None`` if it can):
    Megatron-Core 0.16's checks, plus at least one layer on every middle stage (Megatron's
    check passes a negative middle count, e.g. 4 layers as first 3, last 2 over 3 stages)."""
    if pp < 2:
        return f"a hand-set split needs at least 2 pipeline stages, not {pp}"
    ends = [value for value in (split.first, split.last) if value is not None]
    middle_stages, rest = pp - len(ends), num_layers - sum(ends)
    if middle_stages == 0 and rest != 0:
        return f"first + last must add up to the {num_layers} layer(s) run on {pp} stages"
    if middle_stages and (rest < middle_stages or rest % middle_stages):
        # With one end set by hand the unset end stage shares the rest: not a "middle" one.
        others = "middle" if len(ends) == 2 else ("last" if split.first is not None else "first")
        if len(ends) < 2 and middle_stages > 1:
            others = f"{others} and middle"
        return (
            f"it leaves {rest} of the {num_layers} layer(s) run for the {middle_stages} "
            f"{others} stage(s), which need equal numbers and at least one layer each"
        )
    return None


def pipeline_split(num_layers: int, pp: int, split: PipelineSplit | None = None) -> dict[str, int]:
    """Megatron's ``num_layers_in_{first,last}_pipeline_stage`` for ``num_layers`` over ``pp``
    stages: ``split``'s when set by hand (refused as :func:`split_problem` says), otherwise
    chosen here, empty when ``pp`` divides the depth.

    The automatic split: every stage but the last holds ``ceil(num_layers / pp)`` layers and the
    last the rest; when that leaves the last stage empty, every stage holds
    ``floor(num_layers / pp)`` and the first and last share the remainder (Megatron needs the
    middle stages equal).
    """
    if pp < 1 or num_layers < pp:
        raise ValueError(
            f"cannot split {num_layers} layer(s) over {pp} pipeline stage(s): every stage needs "
            "at least one layer"
        )
    if split is not None:
        problem = split_problem(num_layers, pp, split)
        if problem is not None:
            raise ValueError(f"pipeline_split {split}: {problem}")
        return split.megatron_fields()
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


def layers_per_stage(num_layers: int, pp: int, split: PipelineSplit | None = None) -> list[int]:
    """How many layers each of the ``pp`` stages holds under :func:`pipeline_split`."""
    fields = pipeline_split(num_layers, pp, split)
    first = fields.get("num_layers_in_first_pipeline_stage")
    last = fields.get("num_layers_in_last_pipeline_stage")
    middle_stages = pp - (first is not None) - (last is not None)
    rest = num_layers - (first or 0) - (last or 0)
    middle = [rest // middle_stages] * middle_stages if middle_stages else []
    return ([first] if first is not None else []) + middle + ([last] if last is not None else [])


def vocab_multiple(vocab_size: int, divisor: int, tp: int = 1) -> int:
    """What a vocabulary of ``vocab_size`` tokens is padded to a multiple of at ``tp``:
    ``divisor`` (``make_vocab_size_divisible_by``) where ``tp`` divides that padding, otherwise
    ``divisor x tp`` as Megatron-LM pads, so every tensor-parallel rank holds an equal share."""
    if tp < 1 or divisor < 1:
        raise ValueError(f"tp ({tp}) and the vocabulary divisor ({divisor}) must be positive")
    return divisor if padded_vocab(vocab_size, divisor) % tp == 0 else divisor * tp


def padded_vocab(vocab_size: int, divisor: int, tp: int = 1) -> int:
    """``vocab_size`` rounded up to a multiple of :func:`vocab_multiple` (rows of the embedding
    and the output layer a model built at ``tp`` holds)."""
    multiple = divisor if tp == 1 else vocab_multiple(vocab_size, divisor, tp)
    return -(-vocab_size // multiple) * multiple


def tp_sizes(model: ModelShape, limit: int = 64) -> list[int]:
    """Every tensor-parallel size up to ``limit`` that the model's heads, KV heads and FFN width
    allow (the vocabulary is padded to fit any)."""
    counts = [getattr(model, field) for field in TP_DIVIDES]
    return [tp for tp in range(1, limit + 1) if all(count % tp == 0 for count in counts)]


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
    allowed = ", ".join(str(size) for size in tp_sizes(model))
    for field in TP_DIVIDES:
        count = getattr(model, field)
        if tp < 1 or count % tp:
            problems.append(
                ShapeProblem(
                    "tp",
                    tp,
                    f"must divide the {name}'s {field} ({count}); the tensor-parallel sizes "
                    f"the {name} allows: {allowed}",
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
    elif model.pipeline_split is not None:
        problem = split_problem(depth, pp, model.pipeline_split)
        if problem is not None:
            problems.append(
                ShapeProblem(
                    "pipeline_split",
                    model.pipeline_split,
                    f"the {name} runs {depth} layer(s): {problem}",
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
