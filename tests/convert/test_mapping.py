"""The per-family HF <-> Megatron mapping on real transformers state dicts (no Megatron run)."""

import pytest
import torch

from oprd_mega.convert import layout
from oprd_mega.convert.mapping import (
    all_hf_names,
    get_mapping,
    hf_to_mcore_state,
    mcore_to_hf_state,
    tp_kind,
)
from tools.tiny_hf_models import make_tiny_model


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def hf_model(request, tmp_path_factory):
    from safetensors.torch import load_file

    from oprd_mega.models.hf_config import load_hf_config

    directory = make_tiny_model(request.param, tmp_path_factory.mktemp(request.param))
    return load_hf_config(directory), load_file(str(directory / "model.safetensors"))


def test_expected_names_are_exactly_transformers_tensors(hf_model) -> None:
    args, tensors = hf_model
    expected = all_hf_names(args)
    assert sorted(expected) == sorted(tensors)
    assert all(tuple(tensors[n].shape) == s for n, s in expected.items())


@pytest.mark.parametrize("tp", [1, 2])
def test_round_trip_through_tp_shards_is_bit_exact(hf_model, tp: int) -> None:
    args, tensors = hf_model
    for layer in [None, *range(args.num_layers)]:
        shards = [hf_to_mcore_state(args, tensors, layer, tp_rank=r, tp_size=tp) for r in range(tp)]
        merged = {name: [s[name] for s in shards] for name in shards[0]}
        back = mcore_to_hf_state(args, merged, layer)
        for name, tensor in back.items():
            assert torch.equal(tensor, tensors[name]), name


def test_megatron_names_and_values(hf_model) -> None:
    args, tensors = hf_model
    state = hf_to_mcore_state(args, tensors, 1)
    qkv = state["decoder.layers.1.self_attention.linear_qkv.weight"]
    q = tensors["model.layers.1.self_attn.q_proj.weight"]
    k = tensors["model.layers.1.self_attn.k_proj.weight"]
    # group 0 = query heads 0..2, then key head 0 (head_dim 16)
    assert torch.equal(qkv[:48], q[:48]) and torch.equal(qkv[48:64], k[:16])
    fc1 = state["decoder.layers.1.mlp.linear_fc1.weight"]
    assert torch.equal(fc1[:160], tensors["model.layers.1.mlp.gate_proj.weight"])
    assert ("decoder.layers.1.self_attention.linear_qkv.bias" in state) == (args.family == "qwen2")
    assert ("decoder.layers.1.self_attention.q_layernorm.weight" in state) == (
        args.family == "qwen3"
    )
    assert tp_kind(args, "decoder.layers.1.self_attention.linear_proj.weight") == layout.TP_ROW
    assert tp_kind(args, "embedding.word_embeddings.weight") == layout.TP_COLUMN


def test_shape_mismatch_names_the_tensor(hf_model) -> None:
    args, tensors = hf_model
    bad = dict(tensors)
    bad["model.layers.2.mlp.up_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"model\.layers\.2\.mlp\.up_proj\.weight"):
        hf_to_mcore_state(args, bad, 2)


def test_tied_models_have_no_output_layer_rule(hf_model) -> None:
    args, _ = hf_model
    from dataclasses import replace

    tied = replace(args, tie_word_embeddings=True)
    names = [r.mcore for r in get_mapping(args.family).rules(tied, None)]
    assert "output_layer.weight" not in names and "lm_head.weight" not in all_hf_names(tied)
    with pytest.raises(ValueError, match="no mapping"):
        get_mapping("gpt2")


def test_vocabulary_rows_are_padded_with_zeros_and_stripped_again(hf_model) -> None:
    """1000 tokens: 1024 Megatron rows (512 per TP2 shard), the last 24 zero; at TP3, which
    does not divide 1024, 1152 rows (384 per shard, a multiple of 128 x 3); the HF side keeps
    1000 rows from either, and a Megatron tensor short of the vocabulary is refused naming it."""
    args, tensors = hf_model
    assert args.padded_vocab_size == 1024
    shards = [hf_to_mcore_state(args, tensors, None, tp_rank=r, tp_size=2) for r in range(2)]
    for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        assert [tuple(s[name].shape) for s in shards] == [(512, args.hidden_size)] * 2
        assert torch.count_nonzero(shards[1][name][1000 - 512 :]) == 0
    hf_name = {"embedding.word_embeddings.weight": "model.embed_tokens.weight"}
    hf_name["output_layer.weight"] = "lm_head.weight"
    full = {name: torch.cat([s[name] for s in shards]) for name in shards[0]}
    for name, hf in hf_name.items():
        assert torch.equal(full[name][:1000], tensors[hf])
    thirds = [hf_to_mcore_state(args, tensors, None, tp_rank=r, tp_size=3) for r in range(3)]
    for name, hf in hf_name.items():
        assert [tuple(s[name].shape) for s in thirds] == [(384, args.hidden_size)] * 3
        joined = torch.cat([s[name] for s in thirds])
        assert torch.equal(joined[:1000], tensors[hf]) and torch.count_nonzero(joined[1000:]) == 0
        exported = mcore_to_hf_state(args, {**full, name: [s[name] for s in thirds]}, None)
        assert torch.equal(exported[hf], tensors[hf])
    full["output_layer.weight"] = full["output_layer.weight"][:999]
    with pytest.raises(ValueError, match="Megatron tensor output_layer.weight: 999 rows, fewer"):
        mcore_to_hf_state(args, full, None)
