"""Llama: HF <-> Megatron tensor rules (Qwen2 and Qwen3 extend these)."""

from __future__ import annotations

from oprd_mega.convert.layout import TP_COLUMN, TP_REPLICATED, TP_ROW, TP_SWIGLU
from oprd_mega.convert.mapping import COPY, QKV, SWIGLU, FamilyMapping, TensorRule
from oprd_mega.models.hf_config import HFModelArgs


def _q(a: HFModelArgs) -> int:
    return a.num_attention_heads * a.head_dim


def _kv(a: HFModelArgs) -> int:
    return a.num_key_value_heads * a.head_dim


HF_LAYER = "model.layers.{i}."
MC_LAYER = "decoder.layers.{i}."

LAYER_RULES: tuple[TensorRule, ...] = (
    TensorRule(
        MC_LAYER + "input_layernorm.weight",
        (HF_LAYER + "input_layernorm.weight",),
        COPY,
        TP_REPLICATED,
        lambda a: ((a.hidden_size,),),
    ),
    TensorRule(
        MC_LAYER + "self_attention.linear_qkv.weight",
        tuple(HF_LAYER + f"self_attn.{p}_proj.weight" for p in "qkv"),
        QKV,
        TP_COLUMN,
        lambda a: ((_q(a), a.hidden_size), (_kv(a), a.hidden_size), (_kv(a), a.hidden_size)),
    ),
    TensorRule(
        MC_LAYER + "self_attention.linear_proj.weight",
        (HF_LAYER + "self_attn.o_proj.weight",),
        COPY,
        TP_ROW,
        lambda a: ((a.hidden_size, _q(a)),),
    ),
    TensorRule(
        MC_LAYER + "pre_mlp_layernorm.weight",
        (HF_LAYER + "post_attention_layernorm.weight",),
        COPY,
        TP_REPLICATED,
        lambda a: ((a.hidden_size,),),
    ),
    TensorRule(
        MC_LAYER + "mlp.linear_fc1.weight",
        (HF_LAYER + "mlp.gate_proj.weight", HF_LAYER + "mlp.up_proj.weight"),
        SWIGLU,
        TP_SWIGLU,
        lambda a: ((a.intermediate_size, a.hidden_size),) * 2,
    ),
    TensorRule(
        MC_LAYER + "mlp.linear_fc2.weight",
        (HF_LAYER + "mlp.down_proj.weight",),
        COPY,
        TP_ROW,
        lambda a: ((a.hidden_size, a.intermediate_size),),
    ),
)

GLOBAL_RULES: tuple[TensorRule, ...] = (
    TensorRule(
        "embedding.word_embeddings.weight",
        ("model.embed_tokens.weight",),
        COPY,
        TP_COLUMN,
        lambda a: ((a.vocab_size, a.hidden_size),),
        vocab_rows=True,
    ),
    TensorRule(
        "decoder.final_layernorm.weight",
        ("model.norm.weight",),
        COPY,
        TP_REPLICATED,
        lambda a: ((a.hidden_size,),),
    ),
    TensorRule(
        "output_layer.weight",
        ("lm_head.weight",),
        COPY,
        TP_COLUMN,
        lambda a: ((a.vocab_size, a.hidden_size),),
        vocab_rows=True,
    ),
)

MAPPING = FamilyMapping("llama", LAYER_RULES, GLOBAL_RULES)
