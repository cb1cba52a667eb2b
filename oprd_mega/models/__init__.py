"""Megatron-Core GPT models built from Hugging Face configs (Llama, Qwen2, Qwen3)."""

from oprd_mega.models.builder import build_gpt_model, build_truncated_model, resolve_dtype
from oprd_mega.models.hf_config import (
    SUPPORTED_FAMILIES,
    ConfigError,
    HFModelArgs,
    load_hf_config,
    parse_hf_config,
)

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
