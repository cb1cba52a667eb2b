"""Qwen2: Llama's rules plus biases on the Q, K and V projections."""

from __future__ import annotations

from oprd_mega.convert import llama
from oprd_mega.convert.layout import TP_COLUMN
from oprd_mega.convert.mapping import QKV, FamilyMapping, TensorRule

QKV_BIAS = TensorRule(
    llama.MC_LAYER + "self_attention.linear_qkv.bias",
    tuple(llama.HF_LAYER + f"self_attn.{p}_proj.bias" for p in "qkv"),
    QKV,
    TP_COLUMN,
    lambda a: (
        (a.num_attention_heads * a.head_dim,),
        (a.num_key_value_heads * a.head_dim,),
        (a.num_key_value_heads * a.head_dim,),
    ),
)

MAPPING = FamilyMapping("qwen2", (*llama.LAYER_RULES, QKV_BIAS), llama.GLOBAL_RULES)
