"""HF config validation: supported families parse; unsupported fields raise naming the field."""

import json
from pathlib import Path

import pytest
from transformers import LlamaConfig, Qwen2Config, Qwen3Config

from oprd_mega.models.hf_config import ConfigError, load_hf_config, parse_hf_config
from tools.tiny_hf_models import TINY

CLASSES = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}


def config(family: str, **overrides) -> dict:
    data = CLASSES[family](**TINY).to_dict()
    data.update(overrides)
    return data


@pytest.mark.parametrize("family", sorted(CLASSES))
def test_transformers_configs_parse(family: str) -> None:
    args = parse_hf_config(config(family, tie_word_embeddings=True))
    assert (args.family, args.hidden_size, args.num_layers) == (family, 96, 3)
    assert (args.num_attention_heads, args.num_key_value_heads, args.head_dim) == (6, 2, 16)
    assert args.qkv_bias == (family == "qwen2") and args.qk_norm == (family == "qwen3")
    assert args.tie_word_embeddings and args.rope_theta == 10000.0


def test_legacy_rope_theta_and_head_dim_default() -> None:
    data = config("llama")
    del data["rope_parameters"], data["head_dim"]
    data["rope_theta"] = 500000.0
    args = parse_hf_config(data)
    assert args.rope_theta == 500000.0 and args.head_dim == 96 // 6


@pytest.mark.parametrize(
    ("family", "overrides", "field"),
    [
        ("llama", {"model_type": "mistral"}, "model_type"),
        ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4}}, "factor"),
        ("llama", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
        ("llama", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, "dynamic"),
        ("llama", {"attention_bias": True}, "attention_bias"),
        ("llama", {"mlp_bias": True}, "mlp_bias"),
        ("llama", {"hidden_act": "gelu"}, "hidden_act"),
        ("qwen2", {"use_sliding_window": True}, "use_sliding_window"),
        (
            "qwen3",
            {"layer_types": ["full_attention", "sliding_attention", "full_attention"]},
            "layer_types",
        ),
        ("qwen3", {"num_key_value_heads": 4}, "num_key_value_heads"),
        ("qwen3", {"vocab_size": 0}, "vocab_size"),
        ("qwen2", {"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
    ],
)
def test_unsupported_values_name_the_field(family: str, overrides: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        parse_hf_config(config(family, **overrides))


def test_load_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config("qwen2", model_type="gpt2")))
    with pytest.raises(ConfigError, match=str(tmp_path / "config.json")):
        load_hf_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_hf_config(tmp_path)
