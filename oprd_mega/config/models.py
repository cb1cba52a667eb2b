"""Student and teacher checkpoints and the parallel layout they train under."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from oprd_mega.config.adopt import adopt
from oprd_mega.config.base import Section
from oprd_mega.models.shapes import PipelineSplit
from oprd_mega.parallel.layout import ParallelLayout, TeacherLayout

# The names oprd_mega.models.builder.resolve_dtype accepts (a test keeps them equal).
DType = Literal["float32", "bfloat16", "float16"]
# oprd_mega.models.specs.TRANSFORMER_IMPLS (a test keeps them equal).
TransformerImpl = Literal["local", "transformer_engine", "auto"]

Split = adopt(
    PipelineSplit,
    {
        "first": "Layers on the first pipeline stage (Megatron's "
        "num_layers_in_first_pipeline_stage); unset: a middle-sized stage.",
        "last": "Layers on the last pipeline stage (num_layers_in_last_pipeline_stage); "
        "unset: a middle-sized stage.",
    },
)


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
    """Megatron pads the vocabulary with zero rows to a multiple of this; where the TP does not
    divide that padded size, to a multiple of this x TP, as Megatron-LM pads. Padding rows are
    never sampled, stay out of OPD and are dropped from weight sync and export; a checkpoint
    stored with another padding loads at any TP (rows added or dropped, zero)."""
    pipeline_split: Split | None = None
    """Uneven pipeline stages set by hand: layers on the first and/or last stage, the stages
    between share the rest equally (at least one layer each). It counts the layers this model
    runs: the teacher's up to its deepest tapped layer (all of them with OPD). Unset: the split
    is chosen automatically when parallel.pp does not divide that depth (see
    docs/pipeline-split.md)."""


TeacherParallel = adopt(
    TeacherLayout,
    {
        "tp": "The teacher's tensor-parallel size (null: parallel.tp).",
        "pp": "The teacher's pipeline-parallel size (null: parallel.pp).",
    },
)

Parallel = adopt(
    ParallelLayout,
    {
        "tp": "Tensor-parallel size.",
        "pp": "Pipeline-parallel size.",
        "sp": "Sequence parallelism (needs tp > 1).",
        "cp": "Context-parallel size (both models): every sequence splits into 2 x cp chunks, "
        "rank r of the context-parallel group holds chunks r and 2cp-1-r (load-balanced causal "
        "attention). The data-parallel size is world_size / (tp * pp * cp).",
        "teacher": "The teacher's own layout (each size defaults to the student's). When it "
        "differs, the teacher runs in its own Megatron groups over the same ranks, with "
        "data-parallel size world_size / (teacher.tp * teacher.pp), running whole sequences "
        "(no sequence or context parallelism), and sends its targets to the student ranks "
        "that own the paired rows (each keeps its context chunks and sequence shard). With "
        "an OPD term its final-norm states at the OPD rows go to the student's last stage, "
        "which holds a copy of the teacher's head split at parallel.tp (vocabulary x teacher "
        "width / tp more memory there).",
    },
    nested={"teacher": TeacherParallel},
)
