"""A step's samples turned into this data-parallel rank's microbatches, and the FLOP model
(:func:`model_dims`) the schedule balances.

Every rank computes the same schedule from the same sample lengths
(:func:`oprd_mega.data.scheduler.schedule_microbatches`) and takes its own share. Every
microbatch of the step has one ``[batch, seq]`` shape (Megatron's pipeline exchanges fixed-shape
activations): packed, each microbatch is one row holding its samples back to back, as long as the
step's fullest microbatch; padded, each sample is a row right-padded to the step's longest sample,
and filler rows (a single pad token with no response) even out the row count. Padding carries no
supervised position and no loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from oprd_mega.data.scheduler import CostModel, ModelDims, Schedule, schedule_microbatches
from oprd_mega.distill.batch import DistillMicrobatch, make_microbatch, make_packed_microbatch
from oprd_mega.distill.positions import PositionSpec
from oprd_mega.models.hf_config import HFModelArgs


@dataclass(frozen=True)
class StepSample:
    """What every rank needs of one rollout sample."""

    token_ids: tuple[int, ...]
    prompt_length: int
    teachers: tuple[str, ...] | None = None  # its route (None: every teacher)

    @property
    def response_length(self) -> int:
        """Response tokens."""
        return len(self.token_ids) - self.prompt_length


def model_dims(args: HFModelArgs, num_layers: int | None = None, lm_head: bool = True) -> ModelDims:
    """The scheduler's FLOP model of a model: ``num_layers`` run (all by default; the teacher's
    deepest tapped layer), with or without its LM head."""
    layers = args.num_layers if num_layers is None else num_layers
    if not 0 < layers <= args.num_layers:
        raise ValueError(f"num_layers={num_layers} is outside 1..{args.num_layers} of the model")
    return ModelDims(
        num_layers=layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.intermediate_size,
        vocab_size=args.vocab_size if lm_head else 0,
        kv_size=args.num_key_value_heads * args.head_dim,
        q_size=args.num_attention_heads * args.head_dim,
    )


def plan_step(
    samples: Sequence[StepSample],
    dp_size: int,
    max_tokens: int,
    multiple: int,
    cost: CostModel | None,
) -> Schedule:
    """The step's schedule (identical on every rank); samples with routes are scheduled by
    route (a microbatch holds one route's samples)."""
    lengths = [len(s.token_ids) for s in samples]
    routes = [s.teachers for s in samples]
    routed = any(route is not None for route in routes)
    return schedule_microbatches(
        lengths, dp_size, max_tokens, cost, multiple, routes if routed else None
    )


def rank_microbatches(
    samples: Sequence[StepSample],
    schedule: Schedule,
    dp_rank: int,
    positions: PositionSpec,
    pad_id: int,
    seq_multiple: int = 1,
    packed: bool = False,
    slot_multiple: int = 1,
) -> list[DistillMicrobatch]:
    """This rank's microbatches, all of the step's largest ``[batch, seq]`` shape, each marked
    with its samples' route.

    ``slot_multiple`` (packed): each sequence's slot is padded to a multiple of it (``2 * cp``
    under context parallelism); ``seq_multiple`` must be a multiple of it.
    """
    return [
        replace(batch, teachers=samples[bin_[0]].teachers)
        for batch, bin_ in zip(
            _unrouted_microbatches(
                samples,
                schedule,
                dp_rank,
                positions,
                pad_id,
                seq_multiple,
                packed,
                slot_multiple,
            ),
            schedule.ranks[dp_rank],
            strict=True,
        )
    ]


def _unrouted_microbatches(
    samples: Sequence[StepSample],
    schedule: Schedule,
    dp_rank: int,
    positions: PositionSpec,
    pad_id: int,
    seq_multiple: int,
    packed: bool,
    slot_multiple: int,
) -> list[DistillMicrobatch]:
    if packed:

        def slot(length: int) -> int:
            return -(-length // slot_multiple) * slot_multiple

        fullest = max(
            sum(slot(len(samples[i].token_ids)) for i in bin_)
            for rank in schedule.ranks
            for bin_ in rank
        )
        seq = -(-fullest // seq_multiple) * seq_multiple
        return [
            make_packed_microbatch(
                index,
                [samples[i].token_ids for i in bin_],
                [samples[i].prompt_length for i in bin_],
                seq,
                positions,
                pad_id=pad_id,
                slot_multiple=slot_multiple,
            )
            for index, bin_ in enumerate(schedule.ranks[dp_rank])
        ]
    rows = max(len(bin_) for rank in schedule.ranks for bin_ in rank)
    longest = max(len(s.token_ids) for s in samples)
    seq = -(-longest // seq_multiple) * seq_multiple
    out = []
    for index, bin_ in enumerate(schedule.ranks[dp_rank]):
        chosen = [samples[i] for i in bin_]
        filler = rows - len(chosen)
        out.append(
            make_microbatch(
                index,
                [s.token_ids for s in chosen] + [(pad_id,)] * filler,
                [s.prompt_length for s in chosen] + [1] * filler,
                seq,
                positions,
                pad_id=pad_id,
            )
        )
    return out
