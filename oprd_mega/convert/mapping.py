"""HF <-> Megatron name/layout mapping, per layer and tensor-parallel aware.

The families (``llama.py``, ``qwen2.py``, ``qwen3.py``) declare :class:`TensorRule` lists; the
functions here apply them. Conversion, weight sync and export all call
:func:`hf_to_mcore_state` / :func:`mcore_to_hf_state`: one mapping, one code path.

Megatron names use the local-spec parameter names with the *global* layer index, e.g.
``decoder.layers.3.self_attention.linear_qkv.weight``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from oprd_mega.convert import layout
from oprd_mega.models.hf_config import HFModelArgs

COPY = "copy"
QKV = "qkv"
SWIGLU = "swiglu"


@dataclass(frozen=True)
class TensorRule:
    """One Megatron tensor and the HF tensor(s) it is made of.

    ``mcore`` and ``hf`` are name templates with ``{i}`` for the layer index; ``combine`` says how
    HF tensors fuse (copy, qkv, swiglu); ``tp`` how Megatron shards it; ``hf_shapes`` gives
    the expected HF shapes. ``vocab_rows`` marks a tensor with one row per token (embedding,
    output layer): Megatron holds ``padded_vocab_size`` rows, the extra ones zero on import and
    dropped on export and weight sync, so HF tensors keep their shape.
    """

    mcore: str
    hf: tuple[str, ...]
    combine: str
    tp: str
    hf_shapes: Callable[[HFModelArgs], tuple[tuple[int, ...], ...]]
    vocab_rows: bool = False


@dataclass(frozen=True)
class FamilyMapping:
    """The rules of one model family: per-layer rules and model-level (non-layer) rules."""

    family: str
    layer_rules: tuple[TensorRule, ...]
    global_rules: tuple[TensorRule, ...]

    def rules(self, args: HFModelArgs, layer: int | None) -> list[TensorRule]:
        """The rules of one layer, or of the model-level tensors when ``layer`` is None."""
        if layer is not None:
            if not 0 <= layer < args.num_layers:
                raise IndexError(f"layer {layer} out of range [0, {args.num_layers})")
            return list(self.layer_rules)
        return [
            rule
            for rule in self.global_rules
            if not (args.tie_word_embeddings and rule.mcore == "output_layer.weight")
        ]


def get_mapping(family: str) -> FamilyMapping:
    """The mapping module's rules for ``family`` (``llama``, ``qwen2``, ``qwen3``)."""
    from oprd_mega.convert import llama, qwen2, qwen3

    mappings = {m.MAPPING.family: m.MAPPING for m in (llama, qwen2, qwen3)}
    if family not in mappings:
        raise ValueError(f"no mapping for model family {family!r}; known: {sorted(mappings)}")
    return mappings[family]


def _fill(template: str, layer: int | None) -> str:
    return template.format(i=layer) if layer is not None else template


def mcore_names(args: HFModelArgs, layer: int | None) -> list[str]:
    """Megatron tensor names (global layer index) of one layer or of the model-level tensors."""
    return [_fill(rule.mcore, layer) for rule in get_mapping(args.family).rules(args, layer)]


def hf_names(args: HFModelArgs, layer: int | None) -> dict[str, tuple[int, ...]]:
    """Expected HF tensor names and shapes of one layer (or of the model-level tensors)."""
    out: dict[str, tuple[int, ...]] = {}
    for rule in get_mapping(args.family).rules(args, layer):
        for name, shape in zip(rule.hf, rule.hf_shapes(args), strict=True):
            out[_fill(name, layer)] = tuple(shape)
    return out


def all_hf_names(args: HFModelArgs) -> dict[str, tuple[int, ...]]:
    """Every HF tensor the model needs, with its shape."""
    names = hf_names(args, None)
    for layer in range(args.num_layers):
        names.update(hf_names(args, layer))
    return names


def tp_kind(args: HFModelArgs, mcore_name: str) -> str:
    """How the Megatron tensor ``mcore_name`` (global layer index) is split across TP ranks."""
    parts = mcore_name.split(".")
    if mcore_name.startswith("decoder.layers.") and len(parts) > 3:
        template = ".".join(["decoder", "layers", "{i}", *parts[3:]])
        rules = get_mapping(args.family).layer_rules
    else:
        template, rules = mcore_name, get_mapping(args.family).global_rules
    for rule in rules:
        if rule.mcore == template:
            return rule.tp
    raise KeyError(f"{mcore_name!r} is not a tensor of the {args.family} mapping")


def _combine(rule: TensorRule, tensors: list[torch.Tensor], args: HFModelArgs) -> torch.Tensor:
    if rule.combine == COPY:
        return tensors[0]
    if rule.combine == QKV:
        return layout.qkv_to_mcore(*tensors, args.num_attention_heads, args.num_key_value_heads)
    if rule.combine == SWIGLU:
        return layout.swiglu_to_mcore(*tensors)
    raise ValueError(f"unknown combine {rule.combine!r}")


def _split(rule: TensorRule, tensor: torch.Tensor, args: HFModelArgs) -> list[torch.Tensor]:
    if rule.combine == COPY:
        return [tensor]
    if rule.combine == QKV:
        heads, kv_heads = args.num_attention_heads, args.num_key_value_heads
        return list(layout.qkv_from_mcore(tensor, heads, kv_heads))
    if rule.combine == SWIGLU:
        return list(layout.swiglu_from_mcore(tensor))
    raise ValueError(f"unknown combine {rule.combine!r}")


def _pad_vocab_rows(tensor: torch.Tensor, args: HFModelArgs) -> torch.Tensor:
    """``[vocab, ...]`` -> ``[padded_vocab, ...]`` with zero rows appended."""
    extra = args.padded_vocab_size - tensor.shape[0]
    if extra == 0:
        return tensor
    return torch.cat([tensor, tensor.new_zeros((extra, *tensor.shape[1:]))])


def _strip_vocab_rows(tensor: torch.Tensor, args: HFModelArgs, name: str) -> torch.Tensor:
    """``[padded_vocab, ...]`` -> ``[vocab, ...]`` (the real rows only). A model built at a TP
    that does not divide ``args.padded_vocab_size`` holds more rows (``HFModelArgs.at_tp``):
    every row past the vocabulary is padding."""
    if tensor.shape[0] < args.vocab_size:
        raise ValueError(
            f"Megatron tensor {name}: {tensor.shape[0]} rows, fewer than the vocabulary's "
            f"{args.vocab_size} tokens"
        )
    return tensor[: args.vocab_size]


def hf_to_mcore_state(
    args: HFModelArgs,
    hf: Mapping[str, torch.Tensor] | Callable[[str], torch.Tensor],
    layer: int | None,
    *,
    tp_rank: int = 0,
    tp_size: int = 1,
) -> dict[str, torch.Tensor]:
    """Megatron tensors of one layer (or the model-level ones) from HF tensors.

    ``hf`` maps HF names to tensors (or is a getter). With ``tp_size > 1`` each value is the
    shard of tensor-parallel rank ``tp_rank``. Shapes are checked against ``args``.
    """
    get = hf if callable(hf) else hf.__getitem__
    out: dict[str, torch.Tensor] = {}
    for rule in get_mapping(args.family).rules(args, layer):
        tensors = []
        for template, shape in zip(rule.hf, rule.hf_shapes(args), strict=True):
            name = _fill(template, layer)
            tensor = get(name)
            if tuple(tensor.shape) != tuple(shape):
                raise ValueError(
                    f"tensor {name}: shape {tuple(tensor.shape)} does not match the config "
                    f"(expected {tuple(shape)})"
                )
            tensors.append(tensor)
        full = _combine(rule, tensors, args)
        if rule.vocab_rows:  # padded as a model built at this TP holds it
            full = _pad_vocab_rows(full, args.at_tp(tp_size))
        out[_fill(rule.mcore, layer)] = layout.shard(rule.tp, full, tp_rank, tp_size)
    return out


def mcore_to_hf_state(
    args: HFModelArgs,
    mcore: Mapping[str, torch.Tensor | Sequence[torch.Tensor]],
    layer: int | None,
) -> dict[str, torch.Tensor]:
    """HF tensors of one layer (or the model-level ones) from Megatron tensors.

    A value may be the full tensor or the list of its tensor-parallel shards in rank order.
    """
    out: dict[str, torch.Tensor] = {}
    for rule in get_mapping(args.family).rules(args, layer):
        name = _fill(rule.mcore, layer)
        if name not in mcore:
            raise KeyError(f"Megatron tensor {name} is missing")
        value = mcore[name]
        full = value if isinstance(value, torch.Tensor) else layout.unshard(rule.tp, value)
        if rule.vocab_rows:
            full = _strip_vocab_rows(full, args, name)
        for template, tensor in zip(rule.hf, _split(rule, full, args), strict=True):
            out[_fill(template, layer)] = tensor
    return out
