"""Layer spec choice (local on CPU) and the RMSNorm that replaces Megatron's torch norm."""

import pytest
import torch
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.transformer_config import TransformerConfig
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from oprd_mega.models.hf_config import parse_hf_config
from oprd_mega.models.specs import RMSNorm, layer_spec, module_param_name, te_available
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
