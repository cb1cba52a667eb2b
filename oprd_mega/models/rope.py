"""RoPE scaling as Hugging Face checkpoints declare it: parse, validate, apply to Megatron.

A config states its RoPE in ``rope_parameters`` (transformers 5) or in ``rope_scaling`` plus a
top-level ``rope_theta`` (older files). The kinds implemented are those whose frequencies are
fixed at load time: ``default``, ``linear``, ``llama3`` (every Llama-3.1/3.2/3.3 checkpoint) and
``yarn`` (Qwen2.5/Qwen3 long-context configs). ``dynamic`` NTK scaling recomputes the frequencies
from the length of each forward pass in transformers, which Megatron's precomputed rotary table
cannot follow, so it is refused, as is every other kind, naming the field.

Megatron's ``GPTModel`` builds an unscaled ``RotaryEmbedding``; :func:`apply_rope_scaling` then
replaces its inverse frequencies with the scaled ones (Llama-3 through Megatron's own
``RotaryEmbedding._apply_scaling``). YaRN's attention factor ``m`` multiplies cos and sin in
transformers, i.e. every query-key product by ``m**2``: :func:`softmax_scale` folds it into the
attention's softmax scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")

# Fields each kind reads (besides rope_type/type and rope_theta); any other field is refused so
# that a setting we would silently ignore never passes.
_FIELDS = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": (
        "factor",
        "original_max_position_embeddings",
        "attention_factor",
        "beta_fast",
        "beta_slow",
        "mscale",
        "mscale_all_dim",
        "truncate",
    ),
}
_IGNORED = ("rope_type", "type", "rope_theta", "partial_rotary_factor")


class RopeConfigError(ValueError):
    """An unsupported or inconsistent RoPE field of a Hugging Face config."""


@dataclass(frozen=True)
class RopeScaling:
    """One config's RoPE: base ``theta`` and, for scaled kinds, their parameters (validated)."""

    rope_type: str
    theta: float
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    attention_factor: float = 1.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True


def _number(params: dict[str, Any], key: str, where: str, default: float | None) -> float:
    value = params.get(key, default)
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        raise RopeConfigError(f"{where}.{key} must be a number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise RopeConfigError(f"{where}.{key} must be a positive finite number, got {value!r}")
    return float(value)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def parse_rope(config: dict[str, Any], where: str) -> RopeScaling:
    """The RoPE of a config dict (as in ``config.json``); ``where`` names the file in errors."""
    params = config.get("rope_parameters")
    scaling = config.get("rope_scaling")
    key = "rope_parameters" if params is not None else "rope_scaling"
    chosen = params if params is not None else scaling
    if chosen is None:
        chosen = {}
    if not isinstance(chosen, dict):
        raise RopeConfigError(f"{where}: {key} must be an object, got {chosen!r}")
    if params is not None and isinstance(scaling, dict):
        other = scaling.get("rope_type", scaling.get("type", "default"))
        mine = params.get("rope_type", params.get("type", "default"))
        if other != mine:
            raise RopeConfigError(
                f"{where}: rope_parameters.rope_type={mine!r} and rope_scaling.rope_type="
                f"{other!r} disagree; keep one of them"
            )
    field = f"{where}: {key}"
    rope_type = chosen.get("rope_type", chosen.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        reason = (
            " (dynamic NTK changes the frequencies with each sequence's length; Megatron's "
            "rotary table is fixed)"
            if rope_type == "dynamic"
            else ""
        )
        raise RopeConfigError(
            f"{field}.rope_type={rope_type!r} is not supported{reason}; "
            f"supported: {list(SUPPORTED_ROPE_TYPES)}"
        )
    unknown = sorted(set(chosen) - set(_FIELDS[rope_type]) - set(_IGNORED))
    if unknown:
        raise RopeConfigError(
            f"{field} has fields {unknown} that rope_type={rope_type!r} does not use here; "
            f"supported fields: {list(_FIELDS[rope_type])}"
        )
    partial = chosen.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if partial not in (1, 1.0, None):
        raise RopeConfigError(
            f"{field}.partial_rotary_factor={partial!r} is not supported (only full rotary)"
        )
    theta_source = chosen if "rope_theta" in chosen else config
    theta = theta_source.get("rope_theta", 10000.0 if not chosen else None)
    if theta is None:
        raise RopeConfigError(f"{where}: rope_theta is missing")
    theta = _number({"rope_theta": theta}, "rope_theta", where, None)
    if rope_type == "default":
        return RopeScaling("default", theta)
    if rope_type == "linear":
        return RopeScaling("linear", theta, factor=_number(chosen, "factor", field, None))
    max_positions = config.get("max_position_embeddings")
    original = chosen.get("original_max_position_embeddings", max_positions)
    if not isinstance(original, int) or isinstance(original, bool) or original < 1:
        raise RopeConfigError(
            f"{field}.original_max_position_embeddings must be a positive integer, got {original!r}"
        )
    if rope_type == "llama3":
        low = _number(chosen, "low_freq_factor", field, None)
        high = _number(chosen, "high_freq_factor", field, None)
        if high <= low:
            raise RopeConfigError(
                f"{field}.high_freq_factor={high} must exceed low_freq_factor={low}"
            )
        return RopeScaling(
            "llama3",
            theta,
            factor=_number(chosen, "factor", field, None),
            low_freq_factor=low,
            high_freq_factor=high,
            original_max_position_embeddings=original,
        )
    factor = chosen.get("factor")
    if factor is None:  # transformers: the ratio of the context lengths (DeepSeek-V3 style)
        if not isinstance(max_positions, int):
            raise RopeConfigError(f"{field}.factor is missing")
        factor = max_positions / original
    factor = _number({"factor": factor}, "factor", field, None)
    attention = chosen.get("attention_factor")
    if attention is None:
        mscale, mscale_all_dim = chosen.get("mscale"), chosen.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention = _yarn_mscale(factor)
    truncate = chosen.get("truncate", True)
    if not isinstance(truncate, bool):
        raise RopeConfigError(f"{field}.truncate must be true or false, got {truncate!r}")
    return RopeScaling(
        "yarn",
        theta,
        factor=factor,
        original_max_position_embeddings=original,
        attention_factor=_number({"attention_factor": attention}, "attention_factor", field, None),
        beta_fast=_number(chosen, "beta_fast", field, 32.0) if chosen.get("beta_fast") else 32.0,
        beta_slow=_number(chosen, "beta_slow", field, 1.0) if chosen.get("beta_slow") else 1.0,
        truncate=truncate,
    )


def _yarn_inv_freq(rope: RopeScaling, base: torch.Tensor, dim: int) -> torch.Tensor:
    """YaRN (arXiv:2309.00071): interpolate slow dimensions, keep fast ones, ramp between."""
    assert rope.original_max_position_embeddings is not None

    def correction_dim(rotations: float) -> float:
        length = rope.original_max_position_embeddings
        return dim * math.log(length / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp.to(base.device)
    return base / rope.factor * (1 - keep) + base * keep


def scaled_inv_freq(rotary: torch.nn.Module, rope: RopeScaling, head_dim: int) -> torch.Tensor:
    """The inverse frequencies ``[head_dim / 2]`` (float32) for ``rope``, computed from
    ``rotary``'s unscaled ones (Megatron's ``RotaryEmbedding``, built with ``rotary_base``)."""
    base = rotary.inv_freq
    if rope.rope_type == "default":
        return base
    if rope.rope_type == "linear":
        return base / rope.factor
    if rope.rope_type == "llama3":
        return rotary._apply_scaling(
            base,
            factor=rope.factor,
            low_freq_factor=rope.low_freq_factor,
            high_freq_factor=rope.high_freq_factor,
            original_max_position_embeddings=rope.original_max_position_embeddings,
        )
    return _yarn_inv_freq(rope, base, head_dim)


def apply_rope_scaling(model: torch.nn.Module, rope: RopeScaling, head_dim: int) -> None:
    """Give a freshly built ``GPTModel``'s rotary embedding the scaled frequencies of ``rope``."""
    rotary = getattr(model, "rotary_pos_emb", None)
    if rotary is None:
        raise ValueError("apply_rope_scaling: the model has no rotary_pos_emb")
    rotary.inv_freq = scaled_inv_freq(rotary, rope, head_dim)
    rotary.forward.cache_clear()  # tables computed before would keep the unscaled frequencies


def softmax_scale(rope: RopeScaling, head_dim: int) -> float | None:
    """Attention softmax scale for ``rope``; ``None`` keeps Megatron's ``1/sqrt(head_dim)``."""
    if rope.attention_factor == 1.0:
        return None
    return rope.attention_factor**2 / math.sqrt(head_dim)
