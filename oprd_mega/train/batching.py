"""A step's samples turned into this data-parallel rank's microbatches.

Every rank computes the same schedule from the same sample lengths
(:func:`oprd_mega.data.scheduler.schedule_microbatches`), takes its own share, and right-pads
each microbatch to one ``[batch, seq]`` shape shared by the whole step (Megatron's pipeline
exchanges fixed-shape activations). Filler rows are a single pad token with no response: they
carry no supervised position and no loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from oprd_mega.data.scheduler import CostModel, ModelDims, Schedule, schedule_microbatches
from oprd_mega.distill.batch import DistillMicrobatch, make_microbatch
from oprd_mega.distill.positions import PositionSpec
from oprd_mega.models.hf_config import HFModelArgs


@dataclass(frozen=True)
class StepSample:
    """What every rank needs of one rollout sample."""

    token_ids: tuple[int, ...]
    prompt_length: int

    @property
    def response_length(self) -> int:
        """Response tokens."""
        return len(self.token_ids) - self.prompt_length


def model_dims(args: HFModelArgs, num_layers: int | None = None, lm_head: bool = True):
    """The scheduler's FLOP model of a model (``num_layers`` run, with or without its head)."""
    return ModelDims(
        num_layers=num_layers or args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.intermediate_size,
        vocab_size=args.vocab_size if lm_head else 0,
        kv_size=args.num_key_value_heads * args.head_dim,
    )


def plan_step(
    samples: Sequence[StepSample],
    dp_size: int,
    max_tokens: int,
    multiple: int,
    cost: CostModel | None,
) -> Schedule:
    """The step's schedule (identical on every rank)."""
    lengths = [len(s.token_ids) for s in samples]
    return schedule_microbatches(lengths, dp_size, max_tokens, cost, multiple)


def rank_microbatches(
    samples: Sequence[StepSample],
    schedule: Schedule,
    dp_rank: int,
    positions: PositionSpec,
    pad_id: int,
    seq_multiple: int = 1,
) -> list[DistillMicrobatch]:
    """This rank's microbatches, all padded to the step's largest ``[batch, seq]``."""
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
