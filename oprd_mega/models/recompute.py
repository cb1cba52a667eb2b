"""Activation recompute of the student: the options and the checks Megatron-Core 0.16 would
assert later, stated up front with the config keys that cause them.

Megatron's ``TransformerConfig`` takes ``recompute_granularity`` (``selective``: only the
``recompute_modules`` inside each layer; ``full``: whole layers), ``recompute_method``
(``uniform``: every stage's layers in chunks of ``recompute_num_layers``, each chunk
checkpointed; ``block``: only the first ``recompute_num_layers`` layers of each stage) and
``recompute_num_layers``. Loads no Megatron, so the config can adopt it.
"""

from __future__ import annotations

from dataclasses import dataclass

GRANULARITIES = ("none", "selective", "full")
METHODS = ("uniform", "block")
# Megatron 0.16's selective modules that exist in a dense (no MoE, no MLA) GPT layer.
SELECTIVE_MODULES = ("core_attn", "layernorm", "mlp")
# Messages name fields as "recompute.FIELD": the config reports them at training.recompute.FIELD.
KEY = "recompute"


@dataclass(frozen=True)
class RecomputeOptions:
    """Which student activations are dropped in forward and recomputed in backward."""

    granularity: str = "none"
    method: str | None = None
    num_layers: int | None = None
    modules: tuple[str, ...] = ("core_attn",)

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"{KEY}.granularity: {self.granularity!r} is not one of {GRANULARITIES}"
            )
        if self.method is not None and self.method not in METHODS:
            raise ValueError(f"{KEY}.method: {self.method!r} is not one of {METHODS}")
        if self.num_layers is not None and self.num_layers < 1:
            raise ValueError(f"{KEY}.num_layers: {self.num_layers} must be >= 1")
        if self.granularity != "full" and (self.method, self.num_layers) != (None, None):
            field = "method" if self.method is not None else "num_layers"
            raise ValueError(
                f"{KEY}.{field}: method and num_layers apply to granularity 'full' only, not "
                f"{self.granularity!r} (selective recomputes the chosen modules of every "
                "layer); leave them null"
            )
        if self.granularity == "full" and (self.method is None or self.num_layers is None):
            field = "method" if self.method is None else "num_layers"
            raise ValueError(
                f"{KEY}.{field}: granularity 'full' needs method ('uniform' or 'block') and "
                "num_layers (Megatron has no default for either)"
            )
        unknown = sorted(set(self.modules) - set(SELECTIVE_MODULES))
        if unknown:
            raise ValueError(
                f"{KEY}.modules: {unknown} not among {SELECTIVE_MODULES} (the selective "
                "modules of a dense GPT layer)"
            )
        if self.granularity == "selective" and not self.modules:
            raise ValueError(f"{KEY}.modules: empty; selective recompute needs a module")

    def megatron_kwargs(self) -> dict:
        """The ``TransformerConfig`` fields (nothing for ``none``)."""
        if self.granularity == "none":
            return {}
        if self.granularity == "selective":
            return {"recompute_granularity": "selective", "recompute_modules": list(self.modules)}
        return {
            "recompute_granularity": "full",
            "recompute_method": self.method,
            "recompute_num_layers": self.num_layers,
        }

    def stage_problems(self, stage_layers: list[int]) -> list[str]:
        """Why ``num_layers`` cannot serve pipeline stages of ``stage_layers`` layers each.

        ``uniform`` checkpoints chunks ``[i, i + num_layers)`` of each stage and Megatron
        indexes past the stage's last layer when ``num_layers`` does not divide it; ``block``
        recomputes at most a stage's layers (Megatron: 1 <= num_layers <= layers per stage).
        """
        if self.granularity != "full" or self.num_layers is None:
            return []
        counts = sorted(set(stage_layers))
        if self.method == "uniform" and any(count % self.num_layers for count in counts):
            return [
                f"training.{KEY}.num_layers = {self.num_layers}: method 'uniform' checkpoints "
                "chunks of this many layers, which must divide every pipeline stage's layer "
                f"count {counts}"
            ]
        if self.num_layers > counts[0]:
            return [
                f"training.{KEY}.num_layers = {self.num_layers}: more than the {counts[0]} "
                f"layer(s) of a pipeline stage (stages hold {counts})"
            ]
        return []
