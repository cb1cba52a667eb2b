"""Layer spec choice (local on CPU) and the RMSNorm that replaces Megatron's torch norm."""

import pytest
import torch
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.transformer_config import TransformerConfig
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from oprd_mega.models import builder, specs
from oprd_mega.models.builder import fusions
from oprd_mega.models.hf_config import parse_hf_config
from oprd_mega.models.specs import (
    RMSNorm,
    layer_spec,
    module_param_name,
    resolve_use_te,
    te_available,
)
from tests.models.test_hf_config import config


def mcore_config(**kw) -> TransformerConfig:
    return TransformerConfig(
        num_layers=1, hidden_size=96, num_attention_heads=6, normalization="RMSNorm", **kw
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_transformers_bit_exactly(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    ours = RMSNorm(mcore_config(params_dtype=dtype), 96, eps=1e-5)
    ref = LlamaRMSNorm(96, eps=1e-5).to(dtype)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(96))
        ref.weight.copy_(ours.weight)
    x = (3 * torch.randn(4, 5, 96)).to(dtype)
    assert torch.equal(ours(x), ref(x))


def test_rmsnorm_marks_sequence_parallel_weight() -> None:
    cfg = mcore_config(tensor_model_parallel_size=2, sequence_parallel=True)
    assert RMSNorm(cfg, 96).weight.sequence_parallel is True
    assert RMSNorm(mcore_config(), 96).weight.sequence_parallel is False


def test_cpu_uses_local_spec_with_oprd_norms() -> None:
    assert not te_available()
    qwen3 = layer_spec(parse_hf_config(config("qwen3")))
    sub = qwen3.submodules
    assert sub.input_layernorm is RMSNorm and sub.pre_mlp_layernorm is RMSNorm
    assert sub.self_attention.submodules.q_layernorm is RMSNorm
    assert sub.self_attention.submodules.k_layernorm is RMSNorm
    llama = layer_spec(parse_hf_config(config("llama"))).submodules.self_attention.submodules
    assert llama.q_layernorm is IdentityOp and llama.k_layernorm is IdentityOp


def test_te_parameter_names() -> None:
    assert module_param_name("input_layernorm.weight", use_te=False) == "input_layernorm.weight"
    assert (
        module_param_name("input_layernorm.weight", use_te=True)
        == "self_attention.linear_qkv.layer_norm_weight"
    )
    assert module_param_name("mlp.linear_fc2.weight", use_te=True) == "mlp.linear_fc2.weight"


def test_transformer_impl_literal_matches_specs() -> None:
    from typing import get_args

    from oprd_mega.config.models import TransformerImpl
    from oprd_mega.models.specs import TRANSFORMER_IMPLS

    assert set(get_args(TransformerImpl)) == set(TRANSFORMER_IMPLS)


def test_transformer_impl_selection_without_te() -> None:
    assert resolve_use_te("local") is False
    assert resolve_use_te("auto") is False  # no CUDA here
    with pytest.raises(ValueError, match=r"student\.transformer_impl='transformer_engine'.*CUDA"):
        resolve_use_te("transformer_engine", "student.transformer_impl")
    with pytest.raises(ValueError, match=r"teacher\.transformer_impl='te' is not one of"):
        resolve_use_te("te", "teacher.transformer_impl")


def test_transformer_impl_selection_with_te(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(specs, "te_unavailable_reason", lambda: None)
    assert resolve_use_te("auto") is True
    assert resolve_use_te("transformer_engine") is True
    assert resolve_use_te("local") is False


def test_te_reason_names_the_missing_piece(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(specs.importlib.util, "find_spec", lambda name: None)
    assert "transformer_engine is not installed" in specs.te_unavailable_reason()


def test_fusions_follow_their_requirements(monkeypatch: pytest.MonkeyPatch) -> None:
    # CPU: nothing fused.
    assert not any(fusions(use_te=True, trainable=True).values())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(builder, "_rope_fusion_available", lambda: True)
    have_apex = {"fused_weight_gradient_mlp_cuda": True}
    monkeypatch.setattr(
        builder.importlib.util, "find_spec", lambda name: object() if have_apex.get(name) else None
    )
    local = fusions(use_te=False, trainable=True)
    assert local["masked_softmax_fusion"] and local["bias_activation_fusion"]
    assert not local["apply_rope_fusion"] and not local["gradient_accumulation_fusion"]
    te = fusions(use_te=True, trainable=True)
    assert te["apply_rope_fusion"] and te["gradient_accumulation_fusion"]
    # A frozen model accumulates no gradients; without apex Megatron's output layer cannot fuse.
    assert not fusions(use_te=True, trainable=False)["gradient_accumulation_fusion"]
    have_apex.clear()
    assert not fusions(use_te=True, trainable=True)["gradient_accumulation_fusion"]
    monkeypatch.setattr(builder, "_rope_fusion_available", lambda: False)
    assert not fusions(use_te=True, trainable=True)["apply_rope_fusion"]
