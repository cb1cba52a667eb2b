"""The paper's teacher -> student pairs as Hugging Face configs of the real shapes.

Each preset keeps the published ``config.json`` values that decide cost and layout: width, depth,
query and key-value heads, head width, feed-forward width, vocabulary, tied embeddings and RoPE
base (Qwen3-1.7B, Qwen3-4B and Qwen3-8B from Qwen's model cards; JustRL-1.5B is a fine-tune of
DeepSeek-R1-Distill-Qwen-1.5B, a Qwen2 model, so both sides share that shape). The weights are
random: the presets are for timing and memory, never for quality.

:func:`scaled` shrinks a config by one factor (width, feed-forward width and depth; the head
width and the query/key-value head ratio stay), so the same preset runs on a CPU in the tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

_QWEN3_COMMON: dict[str, Any] = {
    "model_type": "qwen3",
    "vocab_size": 151936,
    "head_dim": 128,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "max_position_embeddings": 40960,
    "attention_bias": False,
}

QWEN3_1_7B: dict[str, Any] = {
    **_QWEN3_COMMON,
    "hidden_size": 2048,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "intermediate_size": 6144,
    "tie_word_embeddings": True,
}
QWEN3_4B: dict[str, Any] = {
    **_QWEN3_COMMON,
    "hidden_size": 2560,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "intermediate_size": 9728,
    "tie_word_embeddings": True,
}
QWEN3_8B: dict[str, Any] = {
    **_QWEN3_COMMON,
    "hidden_size": 4096,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "intermediate_size": 12288,
    "tie_word_embeddings": False,
}
R1_DISTILL_QWEN_1_5B: dict[str, Any] = {
    "model_type": "qwen2",
    "vocab_size": 151936,
    "hidden_size": 1536,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "intermediate_size": 8960,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "max_position_embeddings": 131072,
    "tie_word_embeddings": False,
    "use_sliding_window": False,
}


@dataclass(frozen=True)
class Preset:
    """A teacher -> student pair of configs, named as the paper's runs."""

    name: str
    teacher_name: str
    teacher: dict[str, Any]
    student_name: str
    student: dict[str, Any]


PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset(
            "r1-distill-1.5b",
            "JustRL-1.5B",
            R1_DISTILL_QWEN_1_5B,
            "DeepSeek-R1-Distill-Qwen-1.5B",
            R1_DISTILL_QWEN_1_5B,
        ),
        Preset("qwen3-4b-1.7b", "Qwen3-4B", QWEN3_4B, "Qwen3-1.7B-Base", QWEN3_1_7B),
        Preset("qwen3-8b-1.7b", "Qwen3-8B", QWEN3_8B, "Qwen3-1.7B", QWEN3_1_7B),
    )
}


def preset(name: str) -> Preset:
    """The preset called ``name``; the error lists the known ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def _shrink(value: int, scale: float, multiple: int = 1) -> int:
    return max(multiple, round(value * scale / multiple) * multiple)


def scaled(
    config: dict[str, Any], scale: float, *, vocab_size: int | None = None
) -> dict[str, Any]:
    """``config`` with width, feed-forward width and depth multiplied by ``scale`` (<= 1).

    The head width stays; the query-head count follows the width and keeps its ratio to the
    key-value heads (so GQA groups keep their size). ``vocab_size`` replaces the vocabulary when
    given (the real 151,936 rows dominate a tiny model's time).
    """
    if not 0 < scale <= 1:
        raise ValueError(f"scale must be in (0, 1], got {scale}")
    out = dict(config)
    if vocab_size is not None:
        out["vocab_size"] = vocab_size
    if scale == 1:
        return out
    heads = config["num_attention_heads"]
    kv_heads = config["num_key_value_heads"]
    group = heads // kv_heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    new_kv = max(1, math.floor(kv_heads * scale))
    # What the head count cannot absorb (it is an integer) comes out of the head width.
    new_head_dim = _shrink(head_dim, scale * kv_heads / new_kv, multiple=8)
    out["num_key_value_heads"] = new_kv
    out["num_attention_heads"] = new_kv * group
    out["head_dim"] = new_head_dim
    # hidden / (heads * head_dim) stays as in the real model (1.25 for Qwen3-4B, 1 elsewhere).
    attention_width = new_kv * group * new_head_dim
    out["hidden_size"] = _shrink(
        config["hidden_size"] * attention_width / (heads * head_dim), 1.0, multiple=8
    )
    out["intermediate_size"] = _shrink(config["intermediate_size"], scale, multiple=8)
    out["num_hidden_layers"] = _shrink(config["num_hidden_layers"], scale)
    return out
