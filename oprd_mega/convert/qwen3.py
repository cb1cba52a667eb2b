"""Qwen3: Llama's rules plus RMSNorm weights on each head of Q and K (``head_dim`` sized)."""

from __future__ import annotations

from oprd_mega.convert import llama
from oprd_mega.convert.layout import TP_REPLICATED
from oprd_mega.convert.mapping import COPY, FamilyMapping, TensorRule

QK_NORM = tuple(
    TensorRule(
        llama.MC_LAYER + f"self_attention.{p}_layernorm.weight",
        (llama.HF_LAYER + f"self_attn.{p}_norm.weight",),
        COPY,
        TP_REPLICATED,
        lambda a: ((a.head_dim,),),
    )
    for p in "qk"
)

MAPPING = FamilyMapping("qwen3", (*llama.LAYER_RULES, *QK_NORM), llama.GLOBAL_RULES)
