"""Validate a Hugging Face ``config.json`` against what the supported families implement.

The result, :class:`HFModelArgs`, is the single description of the architecture that the model
builder and the checkpoint mappings use. Anything we do not implement raises a ``ValueError``
naming the field (and the file when read from disk).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from oprd_mega.errors import ConfigError, is_positive_int
from oprd_mega.models.rope import RopeConfigError, RopeScaling, parse_rope
from oprd_mega.models.shapes import PipelineSplit, padded_vocab, vocab_multiple

SUPPORTED_FAMILIES = ("llama", "qwen2", "qwen3")

# Megatron pads the vocabulary to a multiple of this (Megatron-LM's default); see
# HFModelArgs.padded_vocab_size.
DEFAULT_VOCAB_DIVISOR = 128

# Fields that must keep their "off" value: (families, field, allowed values).
_MUST_BE: tuple[tuple[tuple[str, ...], str, tuple[Any, ...]], ...] = (
    (SUPPORTED_FAMILIES, "hidden_act", ("silu",)),
    (("llama", "qwen3"), "attention_bias", (False, None)),
    (("llama",), "mlp_bias", (False, None)),
    (("llama",), "pretraining_tp", (1, None)),
    (("qwen2", "qwen3"), "use_sliding_window", (False, None)),
    (SUPPORTED_FAMILIES, "quantization_config", (None,)),
    (SUPPORTED_FAMILIES, "num_experts", (None, 0)),
)

# transformers' defaults for fields a config.json may omit.
_DEFAULTS = {"hidden_act": "silu"}


# The key of config.json under which ``oprd-mega prune`` records the layers it kept.
LAYER_MAP_KEY = "oprd_layer_map"


@dataclass(frozen=True)
class LayerMap:
    """Which layers of its source a depth-pruned model kept: student layer ``l`` (1-based) is
    the source's layer ``source_layers[l - 1]`` (1-based) of ``source_num_layers``."""

    source_layers: tuple[int, ...]
    source_num_layers: int

    @classmethod
    def parse(cls, value: Any, num_layers: int, where: str) -> LayerMap:
        """Validate config.json's record: as many kept layers as the model has, ascending,
        each within the source's depth."""
        what = f"{where}: {LAYER_MAP_KEY}"
        if not isinstance(value, dict):
            raise ConfigError(f"{what} must be an object, got {value!r}")
        layers, depth = value.get("source_layers"), value.get("source_num_layers")
        if not is_positive_int(depth):
            raise ConfigError(f"{what}.source_num_layers must be a positive integer, got {depth!r}")
        if (
            not isinstance(layers, list)
            or len(layers) != num_layers
            or not all(is_positive_int(n) and n <= depth for n in layers)
            or layers != sorted(set(layers))
        ):
            raise ConfigError(
                f"{what}.source_layers must list {num_layers} ascending layer numbers in "
                f"1..{depth} (one per layer of this model), got {layers!r}"
            )
        return cls(tuple(layers), depth)


@dataclass(frozen=True)
class HFModelArgs:
    """The architecture of a supported Hugging Face causal LM (validated)."""

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    max_position_embeddings: int
    initializer_range: float = 0.02
    dtype: str | None = None
    rope_scaling: RopeScaling | None = None
    make_vocab_size_divisible_by: int = DEFAULT_VOCAB_DIVISOR
    # Layers on the first/last pipeline stage when set by hand (the config's
    # <model>.pipeline_split); None: chosen by oprd_mega.models.shapes.pipeline_split.
    pipeline_split: PipelineSplit | None = None
    # A model made by ``oprd-mega prune``: the layers of its source it kept (config.json's
    # LAYER_MAP_KEY); None for any other model.
    layer_map: LayerMap | None = None

    def __post_init__(self) -> None:
        if self.make_vocab_size_divisible_by < 1:
            raise ConfigError(
                "make_vocab_size_divisible_by must be a positive integer, got "
                f"{self.make_vocab_size_divisible_by!r}"
            )

    @property
    def padded_vocab_size(self) -> int:
        """The Megatron vocabulary: ``vocab_size`` rounded up to a multiple of
        ``make_vocab_size_divisible_by`` (the rows a checkpoint stores; a model built at a TP
        that does not divide it has :meth:`at_tp`'s rows instead)."""
        return padded_vocab(self.vocab_size, self.make_vocab_size_divisible_by)

    def at_tp(self, tp: int) -> HFModelArgs:
        """These arguments as a model built over ``tp`` tensor-parallel ranks holds them: the
        divisor becomes :func:`~oprd_mega.models.shapes.vocab_multiple` (``x tp`` where ``tp``
        does not divide :attr:`padded_vocab_size`, as Megatron-LM pads). The padding rows are
        zeros, added or dropped when a checkpoint stored with another padding loads
        (:func:`oprd_mega.convert.mcore_io.load_mcore_checkpoint`)."""
        try:
            multiple = vocab_multiple(self.vocab_size, self.make_vocab_size_divisible_by, tp)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        return replace(self, make_vocab_size_divisible_by=multiple)

    @property
    def qkv_bias(self) -> bool:
        """Qwen2 has biases on the Q, K and V projections."""
        return self.family == "qwen2"

    @property
    def qk_norm(self) -> bool:
        """Qwen3 applies RMSNorm to each head of Q and K."""
        return self.family == "qwen3"

    @property
    def rope(self) -> RopeScaling:
        """The RoPE to build: the parsed scaling, or plain RoPE with ``rope_theta``."""
        return self.rope_scaling or RopeScaling("default", self.rope_theta)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-serialisable) of the architecture. Unscaled RoPE adds no key and the
        vocabulary padding none, so the config hashes that bridge files recorded before stay
        valid."""
        data = asdict(self)
        # layout choices, not architecture (checkpoints record the padding beside the model)
        data.pop("make_vocab_size_divisible_by")
        data.pop("pipeline_split")
        data.pop("layer_map")
        if self.rope.rope_type == "default":
            data.pop("rope_scaling")
        return data


def _rope(config: dict[str, Any], where: str) -> RopeScaling:
    try:
        return parse_rope(config, where)
    except RopeConfigError as exc:
        raise ConfigError(str(exc)) from exc


def _require_int(config: dict[str, Any], field: str, where: str) -> int:
    value = config.get(field)
    if not is_positive_int(value):
        raise ConfigError(f"{where}: {field} must be a positive integer, got {value!r}")
    return value


def parse_hf_config(config: dict[str, Any], where: str = "config.json") -> HFModelArgs:
    """Validate a config dict (as in ``config.json``) and return the model arguments."""
    family = config.get("model_type")
    if family not in SUPPORTED_FAMILIES:
        raise ConfigError(
            f"{where}: model_type={family!r} is not supported; "
            f"supported: {list(SUPPORTED_FAMILIES)}"
        )
    for families, field, allowed in _MUST_BE:
        value = config.get(field, _DEFAULTS.get(field))
        if family in families and value not in allowed:
            raise ConfigError(
                f"{where}: {field}={value!r} is not supported for {family} "
                f"(allowed: {list(allowed)})"
            )
    layer_types = config.get("layer_types")
    if layer_types is not None and any(kind != "full_attention" for kind in layer_types):
        raise ConfigError(
            f"{where}: layer_types={layer_types!r}: only 'full_attention' layers are supported "
            "(no sliding window)"
        )
    hidden = _require_int(config, "hidden_size", where)
    heads = _require_int(config, "num_attention_heads", where)
    kv_heads = config.get("num_key_value_heads") or heads
    if not isinstance(kv_heads, int) or heads % kv_heads:
        raise ConfigError(
            f"{where}: num_key_value_heads={kv_heads!r} must divide num_attention_heads={heads}"
        )
    head_dim = config.get("head_dim")
    if head_dim is None:
        if hidden % heads:
            raise ConfigError(
                f"{where}: head_dim is missing and hidden_size={hidden} is not divisible by "
                f"num_attention_heads={heads}"
            )
        head_dim = hidden // heads
    dtype = config.get("dtype", config.get("torch_dtype"))
    rope = _rope(config, where)
    num_layers = _require_int(config, "num_hidden_layers", where)
    layer_map = config.get(LAYER_MAP_KEY)
    if layer_map is not None:
        layer_map = LayerMap.parse(layer_map, num_layers, where)
    return HFModelArgs(
        family=family,
        vocab_size=_require_int(config, "vocab_size", where),
        hidden_size=hidden,
        intermediate_size=_require_int(config, "intermediate_size", where),
        num_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=_require_int({"head_dim": head_dim}, "head_dim", where),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=rope.theta,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        max_position_embeddings=_require_int(config, "max_position_embeddings", where),
        initializer_range=float(config.get("initializer_range", 0.02)),
        dtype=dtype if isinstance(dtype, str) else None,
        rope_scaling=rope,
        layer_map=layer_map,
    )


def load_hf_config(path: str | Path) -> HFModelArgs:
    """Read and validate ``config.json`` from a file or a model directory."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"Hugging Face config not found: {file}")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{file}: not valid JSON ({exc})") from exc
    return parse_hf_config(config, where=str(file))
