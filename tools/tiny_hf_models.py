"""Tiny random Hugging Face models (Llama, Qwen2, Qwen3) written locally, no hub access.

Odd sizes on purpose: hidden 96, 6 heads, 2 KV heads, head_dim 16, vocab 1000, 3 layers.
"""

from __future__ import annotations

from pathlib import Path

import torch

TINY = {
    "hidden_size": 96,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 1000,
    "num_hidden_layers": 3,
    "intermediate_size": 160,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
}
THETA = {"llama": 10000.0, "qwen2": 1000000.0, "qwen3": 500000.0}


def make_tiny_model(
    family: str,
    directory: str | Path,
    *,
    tied: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    rope: dict | None = None,
    **overrides,
) -> Path:
    """Write a randomly initialised tiny ``family`` model (weights + config.json) to ``directory``.

    Norm weights and biases are randomised too, so a mapping that drops them fails the tests.
    ``rope`` replaces the default ``rope_parameters`` (e.g. Llama-3 or YaRN scaling).
    """
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    classes = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    }
    config_cls, model_cls = classes[family]
    fields = {**TINY, **overrides}
    config = config_cls(
        **fields,
        tie_word_embeddings=tied,
        rope_parameters=rope or {"rope_type": "default", "rope_theta": THETA[family]},
    )
    torch.manual_seed(seed)
    model = model_cls(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            elif name.endswith(".bias"):
                param.copy_(0.1 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.08)
    model = model.to(dtype)
    directory = Path(directory)
    model.save_pretrained(directory)
    return directory
