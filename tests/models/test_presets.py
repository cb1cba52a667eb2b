"""The paper's pairs at their published shapes, and the proportional shrink used on CPU."""

import pytest

from oprd_mega.models.hf_config import parse_hf_config
from oprd_mega.models.presets import PRESETS, preset, scaled

# Published config.json values (hidden, layers, heads, KV heads, head_dim, ffn, vocab, tied).
PUBLISHED = {
    "Qwen3-1.7B": (2048, 28, 16, 8, 128, 6144, 151936, True),
    "Qwen3-1.7B-Base": (2048, 28, 16, 8, 128, 6144, 151936, True),
    "Qwen3-4B": (2560, 36, 32, 8, 128, 9728, 151936, True),
    "Qwen3-8B": (4096, 36, 32, 8, 128, 12288, 151936, False),
    "DeepSeek-R1-Distill-Qwen-1.5B": (1536, 28, 12, 2, 128, 8960, 151936, False),
    "JustRL-1.5B": (1536, 28, 12, 2, 128, 8960, 151936, False),
}


def shape(config: dict) -> tuple:
    args = parse_hf_config(config)
    return (
        args.hidden_size,
        args.num_layers,
        args.num_attention_heads,
        args.num_key_value_heads,
        args.head_dim,
        args.intermediate_size,
        args.vocab_size,
        args.tie_word_embeddings,
    )


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_have_the_published_shapes(name: str) -> None:
    pair = preset(name)
    assert shape(pair.teacher) == PUBLISHED[pair.teacher_name]
    assert shape(pair.student) == PUBLISHED[pair.student_name]
    assert parse_hf_config(pair.student).family == ("qwen2" if "r1" in name else "qwen3")


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("scale", [0.5, 0.125, 1 / 16])
def test_scaled_keeps_proportions(name: str, scale: float) -> None:
    for config in (preset(name).teacher, preset(name).student):
        small = parse_hf_config(scaled(config, scale, vocab_size=512))
        real = parse_hf_config(config)
        assert small.vocab_size == 512
        assert small.family == real.family and small.tie_word_embeddings == real.tie_word_embeddings
        # GQA group size and the ratio of model width to attention width are the real ones.
        group = real.num_attention_heads // real.num_key_value_heads
        assert small.num_attention_heads == group * small.num_key_value_heads
        ratio = real.hidden_size / (real.num_attention_heads * real.head_dim)
        attention = small.num_attention_heads * small.head_dim
        assert small.hidden_size == pytest.approx(ratio * attention, abs=8)
        assert small.hidden_size <= real.hidden_size * scale * 1.5 + 8
        assert small.num_layers == max(1, round(real.num_layers * scale))
        assert small.intermediate_size % 8 == 0


def test_scale_one_is_the_real_shape_and_errors_name_the_argument() -> None:
    config = preset("qwen3-8b-1.7b").teacher
    assert scaled(config, 1.0) == config
    with pytest.raises(ValueError, match="scale must be in"):
        scaled(config, 0)
    with pytest.raises(ValueError, match="known presets: r1-distill-1.5b"):
        preset("qwen3-32b")
