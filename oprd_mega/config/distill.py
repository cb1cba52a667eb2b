"""The distillation objective: method, supervised layers and positions, projection, kernel."""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

from pydantic import Field, PlainSerializer, PlainValidator, model_validator

from oprd_kernels.api import Impl
from oprd_mega.config.adopt import adopt
from oprd_mega.config.base import Section, invalid
from oprd_mega.distill.layers import LAYER_MODES, select_layers
from oprd_mega.distill.opd import OPDOptions
from oprd_mega.distill.positions import PositionSpec

Method = Literal["oprd", "opd-top1", "opd-topk", "combined"]
METHODS: tuple[str, ...] = get_args(Method)


def _layer_spec(value: Any) -> str | tuple[int, ...]:
    """A layer mode or an explicit list, checked by ``select_layers`` (depth checked later)."""
    if isinstance(value, str):
        if value not in LAYER_MODES:
            raise ValueError(
                f"must be one of {', '.join(LAYER_MODES)} or a list of 1-based layer numbers"
            )
        return value
    if not isinstance(value, list | tuple):
        raise ValueError(
            f"must be one of {', '.join(LAYER_MODES)} or a list of 1-based layer numbers"
        )
    numbers = [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    if any(n < 1 for n in numbers):
        raise ValueError("layer numbers are 1-based (>= 1; the embedding is not a layer)")
    select_layers(list(value), max([1, *numbers]))  # types, emptiness, duplicates
    return tuple(value)


LayerSpec = Annotated[
    str | tuple[int, ...],
    PlainValidator(_layer_spec, json_schema_input_type=str | list[int]),
    PlainSerializer(lambda v: v if isinstance(v, str) else list(v), when_used="json"),
]

Positions = adopt(
    PositionSpec,
    {
        "mode": "Supervised response positions: all, last, first_k or last_k (paper: last_k).",
        "k": "Positions per response for first_k / last_k (paper: 2000).",
    },
)


class ProjectionSection(Section):
    """How student states meet teacher states when widths (or architectures) differ."""

    mode: Literal["identity", "full", "bridge"] = "identity"
    """'identity' (equal widths), 'full' (trainable d_T x d_S map) or 'bridge' (frozen
    low-rank OPRD-Bridge projections from bridge_path)."""
    per_layer: bool = False
    """With 'full': one map per supervised layer instead of one shared map."""
    bridge_path: str | None = None
    """With 'bridge': the bridge file built offline (stage 1)."""

    @model_validator(mode="after")
    def _options_fit_mode(self) -> ProjectionSection:
        if self.mode == "bridge" and self.bridge_path is None:
            raise invalid("bridge_path", None, "mode 'bridge' needs the bridge file's path")
        if self.mode != "bridge" and self.bridge_path is not None:
            raise invalid("bridge_path", self.bridge_path, "only mode 'bridge' reads a bridge")
        if self.mode != "full" and self.per_layer:
            raise invalid("per_layer", True, "only mode 'full' has per-layer maps")
        return self


class KernelSection(Section):
    """Options of the fused projected-MSE kernel (``oprd_kernels.projected_mse``)."""

    impl: Impl = "auto"
    """'auto' (triton on CUDA, torch elsewhere), 'triton', 'torch' or 'reference'."""
    recompute: bool = False
    """Save nothing in forward and recompute the projection in backward (one more GEMM)."""
    workspace_bytes: int | None = Field(None, gt=0)
    """Chunk workspace of the torch path; null: 64 MiB."""


class OPDSection(Section):
    """Options of the output-space term (names as in ``oprd_mega.distill.opd.OPDOptions``)."""

    k: int = 16
    """k of opd-topk (paper: 16); must be >= 1 when used."""
    chunk_tokens: int = 1024
    """Tokens whose logits are formed at a time (no [tokens, vocab] tensor ever exists)."""


class DistillationSection(Section):
    """The loss: OPRD, OPD baselines, or OPD + mu * OPRD."""

    method: Method = "oprd"
    """'oprd' (representation alignment), 'opd-top1' (sampled-token reverse KL), 'opd-topk'
    (KL on the student's top-k) or 'combined' (L_OPD + mu * L_OPRD)."""
    combined_opd: Literal["opd-top1", "opd-topk"] = "opd-top1"
    """The OPD term of 'combined'."""
    mu: float = Field(10.0, ge=0)
    """Weight of L_OPRD in 'combined' (paper: 0, 1, 10; 10 best); must be > 0 there."""
    loss_coef: float = Field(1.0, gt=0)
    """Coefficient of the OPRD loss (normalized MSE needs ~100-1000x plain MSE's)."""
    layers: LayerSpec = "all"
    """Supervised student layers: last, all, even, odd (authors' parity) or a list of 1-based
    layers (paper: all)."""
    positions: Positions = PositionSpec()
    """Supervised response positions."""
    normalize: bool = False
    """L2-normalise both sides before the MSE (normalized MSE); false: plain MSE (paper's
    same-architecture runs). The bridge needs true."""
    projection: ProjectionSection = ProjectionSection()
    """Student-to-teacher projection."""
    kernel: KernelSection = KernelSection()
    """Loss kernel options."""
    opd: OPDSection = OPDSection()
    """Output-space (OPD) term options."""

    @property
    def uses_oprd(self) -> bool:
        """Whether the representation loss is part of the objective."""
        return self.method in ("oprd", "combined")

    @property
    def opd_term(self) -> str | None:
        """The output-space term in use ('opd-top1', 'opd-topk') or None."""
        if self.method == "combined":
            return self.combined_opd
        return self.method if self.method.startswith("opd-") else None

    def opd_options(self, group: Any = None) -> OPDOptions | None:
        """The OPD term's options for ``opd_loss`` (None when the method has no OPD term)."""
        if self.opd_term is None:
            return None
        kind = self.opd_term.removeprefix("opd-")
        return OPDOptions(kind, self.opd.k, self.opd.chunk_tokens, group)

    @model_validator(mode="after")
    def _method_options(self) -> DistillationSection:
        if self.method == "combined" and self.mu <= 0:
            raise invalid("mu", self.mu, "method 'combined' needs mu > 0 (L_OPD + mu * L_OPRD)")
        if self.opd_term is not None:
            try:
                self.opd_options()
            except ValueError as exc:
                field = "k" if "opd.k" in str(exc) else "chunk_tokens"
                value = getattr(self.opd, field)
                raise invalid(f"opd.{field}", value, f"{exc} (for {self.opd_term})") from None
        if self.projection.mode == "bridge" and not self.normalize:
            raise invalid(
                "normalize",
                False,
                "projection 'bridge' is trained for normalized MSE; set distillation.normalize"
                "=true",
            )
        return self
