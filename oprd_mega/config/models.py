"""Student and teacher checkpoints and the parallel layout they train under."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from oprd_mega.config.adopt import adopt
from oprd_mega.config.base import Section
from oprd_mega.parallel.layout import ParallelLayout

# The names oprd_mega.models.builder.resolve_dtype accepts (a test keeps them equal).
DType = Literal["float32", "bfloat16", "float16"]
# oprd_mega.models.specs.TRANSFORMER_IMPLS (a test keeps them equal).
TransformerImpl = Literal["local", "transformer_engine", "auto"]


class ModelSection(Section):
    """A Hugging Face model directory and the dtype its weights are trained or run in."""

    path: str
    """Hugging Face model directory (config.json, tokenizer, safetensors weights)."""
    dtype: DType = "bfloat16"
    """Parameter dtype (paper: bf16; float32 on CPU)."""
    transformer_impl: TransformerImpl = "auto"
    """Layer implementation, as Megatron-LM's ``--transformer-impl``: ``transformer_engine``
    (fails before any server starts when TE cannot run), ``local`` (Megatron's own modules with
    SDPA attention) or ``auto`` (TE when it imports on CUDA, local otherwise). With TE, the fused
    RoPE and gradient-accumulation paths are on whenever their requirements hold."""
    make_vocab_size_divisible_by: int = Field(128, ge=1)
    """Megatron pads the vocabulary with zero rows to a multiple of this (parallel.tp must
    divide it); padding rows are never sampled, stay out of OPD and are dropped from weight
    sync and export. Unlike Megatron-LM (this times TP) the padded size does not depend on TP,
    so checkpoints load and resume at any TP."""


Parallel = adopt(
    ParallelLayout,
    {
        "tp": "Tensor-parallel size.",
        "pp": "Pipeline-parallel size.",
        "sp": "Sequence parallelism (needs tp > 1).",
        "cp": "Context-parallel size (both models): every sequence splits into 2 x cp chunks, "
        "rank r of the context-parallel group holds chunks r and 2cp-1-r (load-balanced causal "
        "attention). The data-parallel size is world_size / (tp * pp * cp).",
    },
)
