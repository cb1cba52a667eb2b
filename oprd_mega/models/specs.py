"""Layer specs: Transformer Engine when it imports, Megatron's local modules otherwise.

This is the one place that decides between the two (and the only place that knows how their
parameter names differ). The local variant swaps Megatron's torch norm for :class:`RMSNorm`,
which supports sequence parallelism and matches Hugging Face's RMSNorm arithmetic, and its core
attention for :class:`~oprd_mega.models.attention.SDPAttention` (fused SDPA kernels, packed
sequences).
"""

from __future__ import annotations

import importlib.util
from dataclasses import replace

import torch
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from oprd_mega.models.attention import SDPAttention
from oprd_mega.models.hf_config import HFModelArgs

# Canonical (local-spec) parameter names -> Transformer Engine names, within a layer.
_TE_NAMES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}


class RMSNorm(torch.nn.Module):
    """RMSNorm computed like Hugging Face's (float32 statistics, weight applied after the cast).

    Its weight carries ``sequence_parallel`` so that Megatron all-reduces its gradient across
    tensor-parallel ranks under sequence parallelism.
    """

    def __init__(
        self,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-6,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str = "RMSNorm",
    ) -> None:
        super().__init__()
        if config.normalization != "RMSNorm" or zero_centered_gamma:
            raise ValueError("oprd_mega RMSNorm supports normalization='RMSNorm' only")
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


# Megatron-LM's --transformer-impl choices, plus "auto" (TE when it can run).
TRANSFORMER_IMPLS = ("local", "transformer_engine", "auto")


def te_unavailable_reason() -> str | None:
    """Why Transformer Engine cannot be used here, or ``None`` when it can."""
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if importlib.util.find_spec("transformer_engine") is None:
        return "transformer_engine is not installed (pip install -e '.[gpu]')"
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as error:  # TE raises OSError, ImportError, RuntimeError for a bad install
        return f"transformer_engine.pytorch does not import: {type(error).__name__}: {error}"
    return None


def te_available() -> bool:
    """Whether Transformer Engine can be used (importable and CUDA present)."""
    return te_unavailable_reason() is None


def resolve_use_te(impl: str, field: str = "transformer_impl") -> bool:
    """Whether ``impl`` (``local``, ``transformer_engine`` or ``auto``) builds TE layers.

    ``auto`` takes TE when it can run; asking for ``transformer_engine`` where it cannot is an
    error naming ``field`` and the reason.
    """
    if impl not in TRANSFORMER_IMPLS:
        raise ValueError(f"{field}={impl!r} is not one of {', '.join(TRANSFORMER_IMPLS)}")
    if impl == "local":
        return False
    reason = te_unavailable_reason()
    if impl == "transformer_engine" and reason is not None:
        raise ValueError(
            f"{field}='transformer_engine' cannot be used: {reason}; use {field}=local or auto"
        )
    return reason is None


def layer_spec(args: HFModelArgs, use_te: bool | None = None) -> ModuleSpec:
    """The transformer-layer spec for ``args`` (TE when ``use_te``, default: when available)."""
    from megatron.core.models.gpt import gpt_layer_specs

    if use_te is None:
        use_te = te_available()
    if use_te:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=args.qk_norm)
    spec = gpt_layer_specs.get_gpt_layer_local_spec(
        qk_layernorm=args.qk_norm, normalization="RMSNorm"
    )
    sub = spec.submodules
    attention = sub.self_attention
    attn_sub = replace(
        attention.submodules,
        q_layernorm=RMSNorm if args.qk_norm else attention.submodules.q_layernorm,
        k_layernorm=RMSNorm if args.qk_norm else attention.submodules.k_layernorm,
        core_attention=SDPAttention,
    )
    return replace(
        spec,
        submodules=replace(
            sub,
            input_layernorm=RMSNorm,
            pre_mlp_layernorm=RMSNorm,
            self_attention=replace(attention, submodules=attn_sub),
        ),
    )


def block_spec(
    args: HFModelArgs, num_layers_to_build: int, use_te: bool | None = None
) -> TransformerBlockSubmodules | ModuleSpec:
    """The decoder-block spec: local layers plus a local final norm, or the TE layer spec."""
    spec = layer_spec(args, use_te)
    if use_te if use_te is not None else te_available():
        return spec  # Megatron picks TENorm for the final norm itself
    return TransformerBlockSubmodules(layer_specs=[spec] * num_layers_to_build, layer_norm=RMSNorm)


def module_param_name(canonical: str, use_te: bool) -> str:
    """The parameter name inside a layer for the chosen spec, from its local-spec name."""
    return _TE_NAMES.get(canonical, canonical) if use_te else canonical
