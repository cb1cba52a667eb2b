"""RoPE scaling against transformers' own RoPE functions (the reference), and its refusals.

Configs follow real checkpoints: Llama-3.2-1B (llama3, head_dim 64, theta 5e5), Qwen2.5-7B
long-context (yarn, head_dim 128, theta 1e6), DeepSeek-style yarn with mscale fields.
"""

import math

import pytest
import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from transformers import LlamaConfig, Qwen2Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from oprd_mega.models.hf_config import ConfigError, parse_hf_config
from oprd_mega.models.rope import apply_rope_scaling, softmax_scale
from oprd_mega.parallel.cpu_patches import apply_cpu_patches

LLAMA32 = {
    "hidden_size": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 64,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "max_position_embeddings": 131072,
}
QWEN25 = {
    "hidden_size": 256,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 128,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "max_position_embeddings": 32768,
}
CASES = {
    "default": (LlamaConfig, LLAMA32, {"rope_type": "default", "rope_theta": 500000.0}),
    "linear": (LlamaConfig, LLAMA32, {"rope_type": "linear", "rope_theta": 1e4, "factor": 4.0}),
    "llama3-3.2-1B": (
        LlamaConfig,
        LLAMA32,
        {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ),
    "llama3-other-context": (
        LlamaConfig,
        LLAMA32,
        {
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 2.0,
            "high_freq_factor": 8.0,
            "original_max_position_embeddings": 512,
        },
    ),
    "yarn-qwen2.5": (
        Qwen2Config,
        QWEN25,
        {
            "rope_type": "yarn",
            "rope_theta": 1e6,
            "factor": 4.0,
            "original_max_position_embeddings": 32768,
        },
    ),
    "yarn-mscale-untruncated": (
        Qwen2Config,
        QWEN25,
        {
            "rope_type": "yarn",
            "rope_theta": 1e4,
            "factor": 40.0,
            "original_max_position_embeddings": 4096,
            "mscale": 1.0,
            "mscale_all_dim": 0.707,
            "beta_fast": 16,
            "beta_slow": 2,
            "truncate": False,
        },
    ),
}


@pytest.fixture(scope="module", autouse=True)
def _megatron_on_cpu() -> None:
    apply_cpu_patches(["current_device"])  # Megatron's rotary forward asks for the CUDA device


def hf_config(case: str):
    cls, shape, rope = CASES[case]
    return cls(**shape, rope_parameters=dict(rope))


def megatron_rope(config_dict: dict):
    args = parse_hf_config(config_dict)
    rotary = RotaryEmbedding(
        kv_channels=args.head_dim,
        rotary_percent=1.0,
        rotary_base=args.rope_theta,
        use_cpu_initialization=True,
    )
    holder = torch.nn.Module()
    holder.rotary_pos_emb = rotary
    apply_rope_scaling(holder, args.rope, args.head_dim)
    return args, rotary


@pytest.mark.parametrize("case", sorted(CASES))
def test_frequencies_and_attention_factor_match_transformers(case: str) -> None:
    config = hf_config(case)
    kind = config.rope_parameters["rope_type"]
    init = ROPE_INIT_FUNCTIONS.get(kind, LlamaRotaryEmbedding.compute_default_rope_parameters)
    ref_freq, ref_factor = init(config, device="cpu")
    args, rotary = megatron_rope(config.to_dict())
    unscaled = 1.0 / args.rope_theta ** (torch.arange(0, args.head_dim, 2).double() / args.head_dim)
    if kind != "default":
        assert (ref_freq.double() - unscaled).abs().max() > 1e-3 * unscaled.min()
    torch.testing.assert_close(rotary.inv_freq, ref_freq.float(), rtol=1e-6, atol=0)
    # transformers multiplies cos and sin by the attention factor: q.k grows by its square.
    scale = softmax_scale(args.rope, args.head_dim) or 1 / math.sqrt(args.head_dim)
    assert scale == pytest.approx(ref_factor**2 / math.sqrt(args.head_dim), rel=1e-12)
    # The rotary table Megatron uses against the one transformers' model uses.
    positions = 2048
    emb = rotary(positions)[:, 0, 0, :]
    freqs = torch.outer(torch.arange(positions, dtype=torch.float32), ref_freq.float())
    ref_emb = torch.cat([freqs, freqs], dim=-1)
    torch.testing.assert_close(emb.cos(), ref_emb.cos(), rtol=0, atol=1e-4)
    torch.testing.assert_close(emb.sin(), ref_emb.sin(), rtol=0, atol=1e-4)


def test_legacy_rope_scaling_with_top_level_theta_parses_like_rope_parameters() -> None:
    _, _, rope = CASES["llama3-3.2-1B"]
    modern = hf_config("llama3-3.2-1B").to_dict()
    legacy = dict(modern)
    del legacy["rope_parameters"]
    legacy["rope_theta"] = rope["rope_theta"]
    legacy["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    assert parse_hf_config(legacy).rope == parse_hf_config(modern).rope


@pytest.mark.parametrize(
    ("rope", "message"),
    [
        ({"rope_type": "dynamic", "factor": 2.0}, r"rope_parameters\.rope_type='dynamic'"),
        ({"rope_type": "longrope", "factor": 2.0}, r"rope_type='longrope'"),
        ({"rope_type": "llama3", "factor": 8.0}, r"rope_parameters\.low_freq_factor"),
        ({"rope_type": "linear"}, r"rope_parameters\.factor"),
        ({"rope_type": "linear", "factor": -1.0}, r"rope_parameters\.factor"),
        ({"rope_type": "yarn", "factor": 4.0, "truncate": "yes"}, r"rope_parameters\.truncate"),
        ({"rope_type": "linear", "factor": 2.0, "beta_fast": 3}, r"\['beta_fast'\]"),
        (
            {"rope_type": "default", "partial_rotary_factor": 0.5},
            r"rope_parameters\.partial_rotary_factor",
        ),
    ],
)
def test_unsupported_rope_is_refused_naming_the_field(rope: dict, message: str) -> None:
    data = hf_config("default").to_dict()
    data["rope_parameters"] = {"rope_theta": 1e4, **rope}
    with pytest.raises(ConfigError, match=message) as error:
        parse_hf_config(data, where="model/config.json")
    assert "model/config.json" in str(error.value)


def test_rope_scaling_disagreeing_with_rope_parameters_is_refused() -> None:
    data = hf_config("default").to_dict()
    data["rope_scaling"] = {"rope_type": "linear", "factor": 2.0}
    with pytest.raises(ConfigError, match=r"rope_scaling\.rope_type='linear'"):
        parse_hf_config(data)


def test_only_scaled_rope_enters_the_model_description() -> None:
    plain = parse_hf_config(hf_config("default").to_dict()).to_dict()
    assert "rope_scaling" not in plain  # hashes of unscaled models are unchanged
    scaled = parse_hf_config(hf_config("yarn-qwen2.5").to_dict()).to_dict()
    assert scaled["rope_scaling"]["rope_type"] == "yarn"
    assert scaled["rope_scaling"]["factor"] == 4.0
