"""Tiny model configs shaped like real checkpoints (shared by the conversion and step tests).

Each keeps its source config's attention ratios (heads : KV heads, hidden = heads x head_dim),
tied embeddings and RoPE fields, scaled down in width and to an odd depth (3 layers, so PP2
splits them 2 + 1). Sources (config.json of each Hugging Face repository):
- meta-llama/Llama-3.2-1B: 32 heads, 8 KV, head_dim 64, tied, rope llama3 (factor 32, low 1,
  high 4, original 8192), theta 5e5;
- Qwen/Qwen2.5-1.5B: 12 heads, 2 KV, head_dim 128, tied, theta 1e6, with the YaRN block that
  Qwen's model card adds for long context (factor 4, original 32768);
- Qwen/Qwen3-1.7B: 16 heads, 8 KV, head_dim 128, QK-norm, tied, theta 1e6;
- deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B: Qwen2 layout, untied, theta 1e4.
"""

LAYOUTS = {
    "TP1PP1": [1, 1, False],
    "TP2PP1": [2, 1, False],
    "TP1PP2": [1, 2, False],
    "TP2PP2": [2, 2, False],
}
COMMON = {"num_hidden_layers": 3, "vocab_size": 512}
REAL_SHAPED = {
    "llama-3.2-1b": {
        "family": "llama",
        "tied": True,
        "config": {
            **COMMON,
            "hidden_size": 64,
            "num_attention_heads": 8,
            "num_key_value_heads": 2,
            "head_dim": 8,
            "intermediate_size": 256,
            "max_position_embeddings": 131072,
            "rms_norm_eps": 1e-5,
            "rope": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 32.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
        },
    },
    "qwen2.5-1.5b-yarn": {
        "family": "qwen2",
        "tied": True,
        "config": {
            **COMMON,
            "hidden_size": 96,
            "num_attention_heads": 12,
            "num_key_value_heads": 2,
            "head_dim": 8,
            "intermediate_size": 560,
            "max_position_embeddings": 131072,
            "rope": {
                "rope_type": "yarn",
                "rope_theta": 1000000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 32768,
            },
        },
    },
    "qwen3-1.7b": {
        "family": "qwen3",
        "tied": True,
        "config": {
            **COMMON,
            "hidden_size": 64,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "intermediate_size": 192,
            "max_position_embeddings": 40960,
            "rope": {"rope_type": "default", "rope_theta": 1000000.0},
        },
    },
    "deepseek-r1-distill-qwen-1.5b": {
        "family": "qwen2",
        "tied": False,
        "config": {
            **COMMON,
            "hidden_size": 96,
            "num_attention_heads": 12,
            "num_key_value_heads": 2,
            "head_dim": 8,
            "intermediate_size": 560,
            "max_position_embeddings": 131072,
            "rope": {"rope_type": "default", "rope_theta": 10000.0},
        },
    },
}
# Models with scaled RoPE run in CI (inside tests/convert/test_parity.py's launch); the others
# with the slow tests (tests/convert/test_real_shapes.py).
CI_REAL_SHAPED = ("llama-3.2-1b", "qwen2.5-1.5b-yarn")
SLOW_REAL_SHAPED = ("qwen3-1.7b", "deepseek-r1-distill-qwen-1.5b")


def parity_plan(names: tuple[str, ...]) -> list[dict]:
    """Items for tests/convert/workers/parity_worker.py: every layout, no extra checks."""
    return [
        {"name": name, **REAL_SHAPED[name], "layouts": list(LAYOUTS.values()), "extra": False}
        for name in names
    ]


# Four pipeline stages (4 processes, DP1) for a 5-layer model: Megatron's uneven split chosen
# automatically (2|1|1|1) and one set by hand (1|1|1|2); the names the workers report them by.
PP4_LAYOUTS = [
    ([1, 4, False], "TP1PP4"),
    ([1, 4, False, {"first": 1, "last": 2}], "TP1PP4 {first: 1, last: 2}"),
]
PP4_MODEL = "llama-3.2-1b"  # Llama-3 RoPE, tied embeddings


def pp4_plan() -> list[dict]:
    """The parity worker's PP4 item: the Llama-3.2-shaped model 5 layers deep."""
    source = REAL_SHAPED[PP4_MODEL]
    return [
        {
            "name": f"{PP4_MODEL}-5-layers-pp4",
            **source,
            "config": {**source["config"], "num_hidden_layers": 5},
            "layouts": [layout for layout, _ in PP4_LAYOUTS],
            "extra": False,
            "split_checks": True,
        }
    ]
