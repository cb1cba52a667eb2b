"""Build a Megatron-Core ``GPTModel`` from validated Hugging Face model arguments.

``build_gpt_model`` gives the full model (student, conversion); ``build_truncated_model`` the
teacher's first K layers without final norm and output layer. Both build in the process groups
they are given (``pg_collection``, Megatron-Core's ``ProcessGroupCollection``; default:
``parallel_state``'s, the student's, see :func:`oprd_mega.parallel.init_distributed`), and the
model keeps them (``model.pg_collection``).
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.transformer_block import get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig

from oprd_mega.models.hf_config import HFModelArgs
from oprd_mega.models.recompute import RecomputeOptions
from oprd_mega.models.rope import apply_rope_scaling, softmax_scale
from oprd_mega.models.shapes import (
    REAL_VOCAB_ATTR,
    layers_per_stage,
    pipeline_split,
    shape_problems,
)
from oprd_mega.models.specs import block_spec, te_available
from oprd_mega.parallel.model_groups import global_groups, is_first_stage, is_last_stage

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str | torch.dtype | None, default: torch.dtype = torch.float32):
    """A torch dtype from a name such as ``"bfloat16"`` (``None`` gives ``default``)."""
    if name is None:
        return default
    if isinstance(name, torch.dtype):
        return name
    if name not in _DTYPES:
        raise ValueError(f"dtype {name!r} is not supported; supported: {sorted(_DTYPES)}")
    return _DTYPES[name]


def fusions(*, use_te: bool, trainable: bool) -> dict[str, bool]:
    """Megatron's fused paths, each on exactly when its requirements hold on this machine.

    Softmax, bias-activation (SwiGLU) and bias-dropout fusions need CUDA only. RoPE fusion needs
    Transformer Engine's fused rotary kernels. Gradient-accumulation fusion (weight gradients
    accumulated straight into Megatron DDP's fp32 ``main_grad``) needs TE linear layers and, for
    Megatron's own output layer, apex's ``fused_weight_gradient_mlp_cuda``; it only matters for
    a model that trains.
    """
    cuda = torch.cuda.is_available()
    te = cuda and use_te
    return {
        "masked_softmax_fusion": cuda,
        "bias_activation_fusion": cuda,
        "bias_dropout_fusion": cuda,
        "apply_rope_fusion": te and _rope_fusion_available(),
        "gradient_accumulation_fusion": te
        and trainable
        and importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None,
    }


def _rope_fusion_available() -> bool:
    from megatron.core.models.common.embeddings import rope_utils

    return rope_utils.fused_apply_rotary_pos_emb is not None


def transformer_config(
    args: HFModelArgs,
    *,
    num_layers: int | None = None,
    params_dtype: torch.dtype = torch.float32,
    sequence_parallel: bool = False,
    use_te: bool = False,
    trainable: bool = True,
    recompute: RecomputeOptions | None = None,
    pg_collection: ProcessGroupCollection | None = None,
) -> TransformerConfig:
    """Megatron's ``TransformerConfig`` for ``args`` in the layout of ``pg_collection``
    (default: ``parallel_state``'s).

    ``use_te`` and ``trainable`` (the student, not the frozen teacher) decide which fused paths
    are switched on (:func:`fusions`); ``recompute``: activation recompute (none by default).
    """
    groups = global_groups() if pg_collection is None else pg_collection
    tp, pp, cp = groups.tp.size(), groups.pp.size(), groups.cp.size()
    num_layers = args.num_layers if num_layers is None else num_layers
    if not 1 <= num_layers <= args.num_layers:
        raise ValueError(f"num_layers={num_layers} must be in [1, {args.num_layers}]")
    problems = shape_problems(args, tp=tp, pp=pp, num_layers=num_layers)
    if problems:
        raise ValueError(
            "; ".join(f"{p.knob} = {p.value}: {p.detail}" for p in problems)
            + " (tp/pp: the parallel layout this process group was started with)"
        )
    recompute = recompute or RecomputeOptions()
    recompute_problems = recompute.stage_problems(layers_per_stage(num_layers, pp))
    if recompute_problems:
        raise ValueError("; ".join(recompute_problems))
    return TransformerConfig(
        num_layers=num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.intermediate_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_key_value_heads,
        kv_channels=args.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=args.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=args.qkv_bias,
        qk_layernorm=args.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        attention_softmax_in_fp32=True,
        apply_query_key_layer_scaling=False,
        softmax_scale=softmax_scale(args.rope, args.head_dim),
        init_method_std=args.initializer_range,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=cp,
        sequence_parallel=sequence_parallel,
        use_cpu_initialization=not torch.cuda.is_available(),
        persist_layer_norm=False,
        **fusions(use_te=use_te, trainable=trainable),
        **pipeline_split(num_layers, pp, args.pipeline_split),
        **recompute.megatron_kwargs(),
    )


def _build(
    args: HFModelArgs,
    config: TransformerConfig,
    *,
    post_process: bool,
    use_te: bool,
    tied: bool,
    pg_collection: ProcessGroupCollection,
) -> GPTModel:
    num_to_build = get_num_layers_to_build(config, pp_rank=pg_collection.pp.rank())
    model = GPTModel(
        config=config,
        transformer_layer_spec=block_spec(args, num_to_build, use_te),
        # the padded vocabulary this TP splits evenly (checkpoints may store another padding)
        vocab_size=args.at_tp(config.tensor_model_parallel_size).padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=is_first_stage(pg_collection),
        post_process=post_process and is_last_stage(pg_collection),
        share_embeddings_and_output_weights=tied,
        position_embedding_type="rope",
        rotary_base=args.rope_theta,
        pg_collection=pg_collection,
    )
    apply_rope_scaling(model, args.rope, args.head_dim)
    setattr(model, REAL_VOCAB_ATTR, args.vocab_size)
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model


def build_gpt_model(
    args: HFModelArgs,
    *,
    params_dtype: torch.dtype = torch.float32,
    sequence_parallel: bool = False,
    use_te: bool | None = None,
    trainable: bool = True,
    recompute: RecomputeOptions | None = None,
    pg_collection: ProcessGroupCollection | None = None,
) -> GPTModel:
    """This rank's pipeline stage of the full model (embedding, layers, final norm, LM head).

    ``use_te``: Transformer Engine layers (default: when TE can run, see
    :func:`~oprd_mega.models.specs.resolve_use_te`); ``trainable=False`` for a frozen model;
    ``recompute``: the student's activation recompute; ``pg_collection``: the process groups
    it is built and runs in (default: ``parallel_state``'s).
    """
    use_te = te_available() if use_te is None else use_te
    pg_collection = global_groups() if pg_collection is None else pg_collection
    config = transformer_config(
        args,
        params_dtype=params_dtype,
        sequence_parallel=sequence_parallel,
        use_te=use_te,
        trainable=trainable,
        recompute=recompute,
        pg_collection=pg_collection,
    )
    return _build(
        args,
        config,
        post_process=True,
        use_te=use_te,
        tied=args.tie_word_embeddings,
        pg_collection=pg_collection,
    )


def build_truncated_model(
    args: HFModelArgs,
    num_layers: int,
    *,
    params_dtype: torch.dtype = torch.float32,
    sequence_parallel: bool = False,
    use_te: bool | None = None,
    pg_collection: ProcessGroupCollection | None = None,
) -> GPTModel:
    """The first ``num_layers`` layers only: no final norm, no output layer (the teacher).

    Its forward returns the last kept layer's output ``[seq, batch, hidden]`` (a sequence shard
    under sequence parallelism). ``pg_collection``: as :func:`build_gpt_model`'s.
    """
    use_te = te_available() if use_te is None else use_te
    pg_collection = global_groups() if pg_collection is None else pg_collection
    config = transformer_config(
        args,
        num_layers=num_layers,
        params_dtype=params_dtype,
        sequence_parallel=sequence_parallel,
        use_te=use_te,
        trainable=False,
        pg_collection=pg_collection,
    )
    return _build(
        args, config, post_process=False, use_te=use_te, tied=False, pg_collection=pg_collection
    )
