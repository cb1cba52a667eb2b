"""The shape rule: pipeline splits against Megatron's own layer count, TP divisibility."""

import pytest
import torch
from megatron.core.transformer.transformer_block import get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig

from oprd_mega.models.hf_config import HFModelArgs
from oprd_mega.models.shapes import (
    TP_DIVIDES,
    PipelineSplit,
    layers_per_stage,
    padded_vocab,
    pipeline_split,
    sequence_multiple,
    shape_problems,
    split_problem,
    tp_sizes,
    vocab_multiple,
)


def megatron_stage_sizes(num_layers: int, pp: int, fields: dict | None = None) -> list[int]:
    """Megatron's own answer: its config validates the split and counts each rank's layers."""
    config = TransformerConfig(
        num_layers=num_layers,
        hidden_size=8,
        num_attention_heads=1,
        pipeline_model_parallel_size=pp,
        pipeline_dtype=torch.float32,
        use_cpu_initialization=True,
        **(pipeline_split(num_layers, pp) if fields is None else fields),
    )
    return [get_num_layers_to_build(config, pp_rank=rank) for rank in range(pp)]


def every_split(limit: int):
    """Every hand-set split with ends up to ``limit`` layers (None: that end is a middle one)."""
    ends = [None, *range(1, limit + 1)]
    return [PipelineSplit(f, last) for f in ends for last in ends if (f, last) != (None, None)]


@pytest.mark.parametrize("num_layers", [1, 2, 3, 4, 5, 7, 9, 16, 28, 30])
def test_every_depth_splits_over_every_pipeline_size_as_megatron_counts(num_layers: int) -> None:
    for pp in range(1, min(num_layers, 8) + 1):
        sizes = layers_per_stage(num_layers, pp)
        assert sizes == megatron_stage_sizes(num_layers, pp), (num_layers, pp)
        assert sum(sizes) == num_layers and min(sizes) >= 1


@pytest.mark.parametrize("num_layers", [2, 3, 4, 5, 6, 7, 9, 12])
def test_a_hand_set_split_is_accepted_exactly_when_megatron_builds_every_stage(
    num_layers: int,
) -> None:
    """Megatron's TransformerConfig check and per-rank layer count are the reference: a split
    passes our rule iff Megatron accepts it and gives every stage at least one layer (Megatron
    itself accepts some splits that leave a middle stage a negative count)."""
    accepted = 0
    for pp in range(2, min(num_layers, 5) + 1):
        for split in every_split(num_layers):
            try:
                sizes = megatron_stage_sizes(num_layers, pp, split.megatron_fields())
                megatron_ok = min(sizes) >= 1 and sum(sizes) == num_layers
            except (ValueError, AssertionError):
                megatron_ok = False
            problem = split_problem(num_layers, pp, split)
            assert (problem is None) == megatron_ok, (num_layers, pp, split, problem)
            if megatron_ok:
                assert layers_per_stage(num_layers, pp, split) == sizes, (num_layers, pp, split)
                accepted += 1
            else:
                with pytest.raises(ValueError, match=r"pipeline_split \{"):
                    pipeline_split(num_layers, pp, split)
    assert accepted >= 1


def test_hand_set_split_refusals_say_why() -> None:
    five = _model(num_layers=5, pipeline_split=PipelineSplit(first=2, last=2))
    (middle,) = shape_problems(five, tp=1, pp=4)
    assert "leaves 1 of the 5 layer(s) run for the 2 middle stage(s)" in middle.detail
    assert shape_problems(five, tp=1, pp=3) == []  # 2 | 1 | 2
    (alone,) = shape_problems(five, tp=1, pp=1, name="student")
    assert (alone.knob, alone.value) == ("pipeline_split", PipelineSplit(2, 2))
    assert alone.detail == (
        "the student runs 5 layer(s): a hand-set split needs at least 2 pipeline stages, not 1"
    )
    (ends,) = shape_problems(five, tp=1, pp=2, name="teacher", num_layers=3)
    assert ends.detail == (
        "the teacher runs 3 layer(s): first + last must add up to the 3 layer(s) run on 2 stages"
    )
    with pytest.raises(ValueError, match="pipeline_split.first must be a positive number"):
        PipelineSplit(first=0)
    with pytest.raises(ValueError, match="needs first, last or both"):
        PipelineSplit()


def test_odd_depths_use_first_and_last_stage_fields() -> None:
    assert pipeline_split(3, 2) == {"num_layers_in_last_pipeline_stage": 1}
    assert layers_per_stage(4, 3) == [2, 1, 1]  # ceil would leave the last stage empty
    assert pipeline_split(28, 4) == {}


@pytest.mark.parametrize(("num_layers", "pp"), [(2, 3), (1, 0)])
def test_more_stages_than_layers_is_refused(num_layers: int, pp: int) -> None:
    with pytest.raises(ValueError, match="every stage needs at least one layer"):
        pipeline_split(num_layers, pp)


def _model(**overrides) -> HFModelArgs:
    fields = dict(
        family="llama",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=256,
        num_layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=8,
        rms_norm_eps=1e-5,
        rope_theta=5e5,
        tie_word_embeddings=True,
        max_position_embeddings=4096,
    )
    return HFModelArgs(**{**fields, **overrides})


def test_a_fitting_layout_has_no_problems() -> None:
    assert shape_problems(_model(), tp=2, pp=3) == []


@pytest.mark.parametrize("field", TP_DIVIDES)
def test_each_tensor_parallel_field_is_named(field: str) -> None:
    odd = {"num_attention_heads": 6, "num_key_value_heads": 3, "intermediate_size": 255}
    model = _model(**{field: odd[field]})
    if field == "num_attention_heads":
        model = _model(num_attention_heads=9, num_key_value_heads=3)
    problems = shape_problems(model, tp=2, pp=1, name="student")
    assert [p.knob for p in problems] == ["tp"] * len(problems)
    assert any(f"the student's {field} (" in p.detail for p in problems), problems


def test_pipeline_depth_counts_only_the_layers_that_run() -> None:
    (problem,) = shape_problems(_model(num_layers=8), tp=1, pp=4, num_layers=3, name="teacher")
    assert (problem.knob, problem.value) == ("pp", 4)
    assert "the teacher runs 3 layer(s)" in problem.detail


def test_the_vocabulary_is_padded_to_the_multiple_and_never_limits_tp() -> None:
    """Padded sizes at TP1 as the issue states them; at a TP that does not divide that padding,
    Megatron-LM's multiple of ``divisible_by x tp``; TP is never refused for the vocabulary."""
    for vocab, padded in [(151_936, 151_936), (50_257, 50_304), (32_001, 32_128), (517, 640)]:
        assert _model(vocab_size=vocab).padded_vocab_size == padded
        assert padded_vocab(vocab, 128) == padded
        for tp in (1, 2, 3, 4, 6, 8):
            wide = _model(
                vocab_size=vocab,
                num_attention_heads=24,
                num_key_value_heads=24,
                intermediate_size=240,
            )
            assert shape_problems(wide, tp=tp, pp=1) == []
    # the issue's figures: SmolLM2's 49,152 tokens split over 3 as they are; Qwen's 151,936
    # need 152,064 rows at TP3 (a multiple of 128 x 3, Megatron-LM's _vocab_size_with_padding)
    assert _model(vocab_size=49_152).at_tp(3).padded_vocab_size == 49_152
    assert _model(vocab_size=151_936).at_tp(3).padded_vocab_size == 152_064
    assert _model(vocab_size=517).at_tp(3).padded_vocab_size == 768
    assert _model(vocab_size=517).at_tp(3).make_vocab_size_divisible_by == 384
    assert _model(vocab_size=517).at_tp(4) == _model(vocab_size=517)  # 640 splits over 4
    assert _model(vocab_size=517, make_vocab_size_divisible_by=1).padded_vocab_size == 517
    odd = _model(vocab_size=517, make_vocab_size_divisible_by=3)
    assert odd.padded_vocab_size == 519
    assert shape_problems(odd, tp=2, pp=1, name="student") == []
    assert odd.at_tp(2).padded_vocab_size == 522
    with pytest.raises(ValueError, match="make_vocab_size_divisible_by must be a positive"):
        _model(make_vocab_size_divisible_by=0)


@pytest.mark.parametrize("vocab", [1, 2, 517, 1000, 32_001, 49_152, 151_936])
@pytest.mark.parametrize("divisor", [1, 3, 64, 128])
@pytest.mark.parametrize("tp", [1, 2, 3, 4, 5, 6, 7, 8])
def test_padded_vocabulary_splits_evenly_and_adds_less_than_one_multiple(
    vocab: int, divisor: int, tp: int
) -> None:
    """Brute force against the definition: the least multiple of the chosen multiple that holds
    the vocabulary, divisible by tp, equal to the TP-free padding where tp divides that."""
    multiple = vocab_multiple(vocab, divisor, tp)
    padded = padded_vocab(vocab, divisor, tp)
    least = next(n for n in range(vocab, vocab + multiple + 1) if n % multiple == 0)
    assert padded == least and padded % tp == 0
    free = padded_vocab(vocab, divisor)
    assert (padded, multiple) == ((free, divisor) if free % tp == 0 else (padded, divisor * tp))


def test_a_head_count_tp_cannot_split_names_the_numbers_and_the_sizes_allowed() -> None:
    """SmolLM2-135M: 9 heads, 3 KV heads, FFN 1536: TP 1 and 3 only."""
    smol = _model(
        num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536, vocab_size=49_152
    )
    assert tp_sizes(smol) == [1, 3]
    assert shape_problems(smol, tp=3, pp=1) == []
    problems = shape_problems(smol, tp=2, pp=1, name="student")
    assert [p.detail for p in problems] == [
        f"must divide the student's {field} ({count}); the tensor-parallel sizes the student "
        "allows: 1, 3"
        for field, count in (("num_attention_heads", 9), ("num_key_value_heads", 3))
    ]


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("sp", [False, True])
def test_sequence_multiple_is_the_least_length_every_split_divides(
    cp: int, tp: int, sp: bool
) -> None:
    """Brute force: the least positive length that splits into 2 x cp equal chunks (cp > 1)
    and whose per-rank share (2 chunks) splits over tp under sequence parallelism."""

    def splits(length: int) -> bool:
        if cp > 1 and length % (2 * cp):
            return False
        return not (sp and (length % cp or (length // cp) % tp))

    least = next(length for length in range(1, 1000) if splits(length))
    assert sequence_multiple(tp=tp, cp=cp, sp=sp) == least


def test_context_parallel_problem_names_the_length() -> None:
    model = _model()
    assert shape_problems(model, tp=2, pp=1, cp=2, sp=True, seq_length=("seq", 16)) == []
    (problem,) = shape_problems(model, tp=2, pp=1, cp=2, seq_length=("seq", 18))
    assert (problem.knob, problem.value) == ("cp", 2)
    assert problem.detail == "seq (18) must be a multiple of 4 (2 x cp = 4 chunks)"
    (problem,) = shape_problems(model, tp=1, pp=1, cp=0)
    assert problem.knob == "cp"
