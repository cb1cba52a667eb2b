"""MFU accounting: the card table and the student's training FLOPs."""

import pytest
from transformers import Qwen3Config, Qwen3ForCausalLM

from oprd_mega.data.microbatches import model_dims
from oprd_mega.models import parse_hf_config
from oprd_mega.train.throughput import model_flops_utilization, peak_tflops, training_flops


@pytest.mark.parametrize(
    ("device", "expected"),
    [
        ("NVIDIA H200", 989.4),
        ("NVIDIA H100 80GB HBM3", 989.4),
        ("NVIDIA H100 PCIe", 756.5),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_peak_by_device_name(device: str, expected: float | None) -> None:
    assert peak_tflops(device, "bfloat16") == expected


def test_training_flops_from_parameter_count() -> None:
    # One token, no attention pairs to speak of: 3 x (2 FLOPs per matmul weight), head included.
    config = Qwen3Config(
        hidden_size=80, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, vocab_size=300, tie_word_embeddings=False,
    )  # fmt: skip
    model = Qwen3ForCausalLM(config)
    weights = sum(
        p.numel()
        for n, p in model.named_parameters()
        if "norm" not in n and "embed_tokens" not in n
    )
    dims = model_dims(parse_hf_config(config.to_dict()))
    attention_one_token = 2 * 4 * 32 * config.num_hidden_layers  # 2 x q_size x 1^2 per layer
    assert training_flops(dims, [1]) == pytest.approx(3 * (2 * weights + attention_one_token))
    assert training_flops(dims, [5, 7]) == pytest.approx(
        training_flops(dims, [5]) + training_flops(dims, [7])
    )


def test_mfu_is_achieved_over_peak() -> None:
    assert model_flops_utilization(2e12, 0.5, 8.0) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="must be positive"):
        model_flops_utilization(1.0, 0.0, 1.0)
