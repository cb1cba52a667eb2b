"""Megatron-Core GPT models built from Hugging Face configs (Llama, Qwen2, Qwen3).

The builder imports Megatron (seconds); it loads on first use so that config validation and
the command-line tools can fail fast without it.
"""

from typing import Any

from oprd_mega.models.hf_config import (
    SUPPORTED_FAMILIES,
    ConfigError,
    HFModelArgs,
    load_hf_config,
    parse_hf_config,
)

_BUILDER = ("build_gpt_model", "build_truncated_model", "resolve_dtype")


def __getattr__(name: str) -> Any:
    if name in _BUILDER:
        from oprd_mega.models import builder

        return getattr(builder, name)
    raise AttributeError(f"module 'oprd_mega.models' has no attribute {name!r}")


__all__ = [
    "SUPPORTED_FAMILIES",
    "ConfigError",
    "HFModelArgs",
    "build_gpt_model",
    "build_truncated_model",
    "load_hf_config",
    "parse_hf_config",
    "resolve_dtype",
]
