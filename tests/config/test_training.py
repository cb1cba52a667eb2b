"""training.recompute / overlap_* : refused combinations name their key, before any server
starts; accepted ones reach Megatron's TransformerConfig unchanged."""

from __future__ import annotations

import pytest
from megatron.core.transformer.transformer_config import TransformerConfig

from oprd_mega.config import ConfigError
from oprd_mega.config.against_models import check_models
from oprd_mega.models.recompute import RecomputeOptions
from tests.config.helpers import minimal
from tests.config.test_against_models import _model

FULL_UNIFORM = ["training.recompute.granularity=full", "training.recompute.method=uniform"]

# (overrides, dotted key, value as shown, a fragment saying what is allowed)
REFUSED = [
    (["training.recompute.granularity=partial"], "training.recompute.granularity", "'none'"),
    (["training.recompute.granularity=full"], "training.recompute.method", "needs method"),
    (FULL_UNIFORM, "training.recompute.num_layers", "needs method"),
    (
        ["training.recompute.granularity=selective", "training.recompute.method=block"],
        "training.recompute.method",
        "'full' only",
    ),
    (
        ["training.recompute.granularity=selective", "training.recompute.num_layers=2"],
        "training.recompute.num_layers",
        "'full' only",
    ),
    (["training.recompute.num_layers=2"], "training.recompute.num_layers", "'full' only"),
    ([*FULL_UNIFORM, "training.recompute.num_layers=0"], "training.recompute.num_layers", ">= 1"),
    (
        ["training.recompute.granularity=selective", "training.recompute.modules=[moe]"],
        "training.recompute.modules",
        "core_attn",
    ),
    (
        ["training.recompute.granularity=selective", "training.recompute.modules=[]"],
        "training.recompute.modules",
        "needs a module",
    ),
    (["training.overlap_param_gather=true"], "training.overlap_param_gather", "distributed"),
    (
        [
            "training.overlap_grad_reduce=true",
            "parallel.pp=2",
            "distillation.projection.mode=full",
            "distillation.projection.per_layer=false",
        ],
        "training.overlap_grad_reduce",
        "shared projection",
    ),
    (
        [
            *FULL_UNIFORM,
            "training.recompute.num_layers=1",
            "training.overlap_grad_reduce=true",
            "distillation.projection.mode=full",
            "distillation.projection.per_layer=false",
        ],
        "training.overlap_grad_reduce",
        "once per checkpointed chunk",
    ),
]


@pytest.mark.parametrize("overrides, key, allowed", REFUSED)
def test_refused_combinations_name_the_key(overrides: list[str], key: str, allowed: str) -> None:
    with pytest.raises(ConfigError) as info:
        minimal(*overrides)
    (problem,) = info.value.problems
    assert problem.startswith(f"{key} = "), problem
    assert allowed in problem, problem


def test_accepted_options_reach_the_training_section() -> None:
    config = minimal(
        *FULL_UNIFORM,
        "training.recompute.num_layers=2",
        "training.overlap_grad_reduce=true",
        "optimizer.use_distributed_optimizer=true",
        "training.overlap_param_gather=true",
    )
    assert config.training.recompute == RecomputeOptions("full", "uniform", 2)
    assert config.training.overlap_grad_reduce and config.training.overlap_param_gather
    assert minimal().training.recompute.megatron_kwargs() == {}


@pytest.mark.parametrize(
    "overrides, layers, problem",
    [  # 7 layers over PP2 split 4 | 3 (oprd_mega.models.shapes.pipeline_split)
        (["training.recompute.num_layers=2"], 7, "must divide every pipeline stage's"),
        (["training.recompute.num_layers=4", "training.recompute.method=block"], 7, "more than"),
    ],
)
def test_num_layers_must_fit_every_pipeline_stage(
    overrides: list[str], layers: int, problem: str
) -> None:
    config = minimal(*FULL_UNIFORM, "parallel.pp=2", *overrides)
    with pytest.raises(ConfigError) as info:
        check_models(config, _model(layers, 64), _model(layers, 64))
    (message,) = info.value.problems
    assert message.startswith("training.recompute.num_layers = "), message
    assert problem in message and "[3, 4]" in message, message


def test_num_layers_that_fit_pass() -> None:
    for extra in (["training.recompute.num_layers=2"], ["training.recompute.method=block"]):
        config = minimal(*FULL_UNIFORM, "parallel.pp=2", "training.recompute.num_layers=2", *extra)
        check_models(config, _model(8, 64), _model(8, 64))  # 4 | 4


def test_every_megatron_recompute_assert_is_checked_first() -> None:
    """What our check accepts, Megatron's TransformerConfig accepts; what Megatron refuses
    among the combinations, ours refuses first."""

    def megatron_accepts(kwargs: dict) -> bool:
        try:
            TransformerConfig(num_layers=4, hidden_size=32, num_attention_heads=4, **kwargs)
        except (ValueError, AssertionError):
            return False
        return True

    for granularity in ("none", "selective", "full"):
        for method in (None, "uniform", "block"):
            for num_layers in (None, 1, 2):
                try:
                    options = RecomputeOptions(granularity, method, num_layers)
                except ValueError:
                    continue
                assert megatron_accepts(options.megatron_kwargs()), options
    assert not megatron_accepts({"recompute_granularity": "full"})  # Megatron would refuse too
    for module in ("core_attn", "layernorm", "mlp"):
        kwargs = RecomputeOptions("selective", modules=(module,)).megatron_kwargs()
        assert megatron_accepts(kwargs), module
