"""Student taps: alignment loss at each tapped layer, its gradient injected during backward.

A forward hook on ``model.decoder.layers[i]`` (global ``layer_number``, on whichever pipeline
stage owns the layer) selects the supervised rows of the layer output ``[s, b, h]`` (this
rank's sequence shard under sequence parallelism), computes the layer loss with
``oprd_kernels.projected_mse`` (gradient formed in forward) and returns the hidden state
through :class:`InjectLoss`, which passes it on unchanged and, in backward, gives the loss the
upstream gradient ``scale``: the loss's own backward then adds its gradient to the layer
output (Megatron's ``MoEAuxLossAutoScaler`` pattern). The loss never joins the pipeline's
output, so it works on every stage.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from oprd_kernels import projected_mse

_COSINE_CHUNK = 4096


class InjectLoss(torch.autograd.Function):
    """Identity on ``hidden``; in backward the attached ``loss`` gets gradient ``scale``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        hidden: torch.Tensor,
        loss: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        ctx.save_for_backward(loss)
        ctx.scale = scale  # type: ignore[attr-defined]
        return hidden

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_output: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, None]:
        (loss,) = ctx.saved_tensors  # type: ignore[attr-defined]
        return grad_output, torch.full_like(loss, ctx.scale), None  # type: ignore[attr-defined]


@dataclass
class TapInputs:
    """What the taps align in one microbatch on this rank.

    ``rows``: indices into the flattened local layer output; ``targets``: student layer ->
    ``[rows, d]`` teacher targets (only the layers this stage owns); ``token_weight``: the
    weight of one token (1 / global supervised token count).
    """

    rows: torch.Tensor
    targets: dict[int, torch.Tensor]
    token_weight: float


@dataclass
class LayerStats:
    """Per-(head, layer) sums over this rank's tokens (each token weighted by
    ``token_weight``)."""

    loss: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    cosine: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)

    def add(self, key: tuple[str, int], loss: torch.Tensor, cosine: torch.Tensor) -> None:
        """Accumulate one microbatch's weighted sums."""
        self.loss[key] = self.loss.get(key, torch.zeros_like(loss)) + loss
        self.cosine[key] = self.cosine.get(key, torch.zeros_like(cosine)) + cosine


@dataclass(frozen=True)
class KernelOptions:
    """Options passed to ``projected_mse``."""

    normalize: bool = False
    impl: str = "auto"
    recompute: bool = False
    workspace_bytes: int | None = None


@dataclass(frozen=True)
class TapHead:
    """One teacher's alignment on the student: the student layers it taps, its projection (a
    module with ``project(layer, rows) -> (inputs, weight)``, :mod:`oprd_mega.distill.
    projection`, or None for identity) and the gradient each of its layer losses receives
    (its loss weight x loss coefficient / its number of tapped layers)."""

    name: str
    layers: tuple[int, ...]
    projection: torch.nn.Module | None
    scale: float


# Per microbatch: head name -> what that head aligns (heads the microbatch is not routed to
# are absent).
HeadInputs = dict[str, TapInputs]


class StudentTaps:
    """Hooks on this stage's tapped student layers, for one or more heads (teachers).

    A layer tapped by several heads carries the sum of their scaled losses; each head's loss
    and cosine are recorded under ``(head name, layer)``. Layers not on this stage are ignored.
    """

    def __init__(self, model: torch.nn.Module, heads: list[TapHead], kernel: KernelOptions) -> None:
        names = [head.name for head in heads]
        if len(set(names)) != len(names):
            raise ValueError(f"tap heads must have distinct names, got {names}")
        self.heads = {head.name: head for head in heads}
        self.kernel = kernel
        self.stats = LayerStats()
        self.inputs: dict[int, HeadInputs] = {}
        self.current: HeadInputs | None = None
        wanted = {layer for head in heads for layer in head.layers}
        self.layers = [
            layer.layer_number for layer in model.decoder.layers if layer.layer_number in wanted
        ]
        self.layer_heads = {n: [head for head in heads if n in head.layers] for n in self.layers}
        # Inputs of forwards run without autograd (full recompute), awaiting the rerun.
        self.recompute_queue: dict[int, deque[HeadInputs]] = {n: deque() for n in self.layers}
        self._handles = [
            layer.register_forward_hook(self._hook)
            for layer in model.decoder.layers
            if layer.layer_number in wanted
        ]

    def load(self, inputs: dict[int, HeadInputs]) -> None:
        """Targets for the coming step, by microbatch index and head; resets the statistics."""
        self.inputs = inputs
        self.stats = LayerStats()
        for queue in self.recompute_queue.values():
            queue.clear()

    def select(self, microbatch: int | None) -> None:
        """The microbatch the next forward belongs to (None: taps pass through)."""
        self.current = None if microbatch is None else self.inputs[microbatch]

    def remove(self) -> None:
        """Unregister the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, module: torch.nn.Module, _inputs: tuple, output):
        hidden = output[0] if isinstance(output, tuple) else output
        layer = module.layer_number
        grad = torch.is_grad_enabled()
        if self.current is None:
            queue = self.recompute_queue[layer]
            if not (grad and queue):
                return None
            parts = self._losses(layer, hidden, queue.popleft(), record=False)
        else:
            parts = self._losses(layer, hidden, self.current)
            if not grad:  # inside a checkpoint's forward: backward reruns this layer
                self.recompute_queue[layer].append(self.current)
        if not parts or not (grad and hidden.requires_grad):
            return None
        if len(parts) == 1:
            loss, scale = parts[0]
        else:
            loss, scale = sum(part * part_scale for part, part_scale in parts), 1.0
        injected = InjectLoss.apply(hidden, loss, scale)
        return (injected, *output[1:]) if isinstance(output, tuple) else injected

    def _losses(
        self, layer: int, hidden: torch.Tensor, inputs: HeadInputs, record: bool = True
    ) -> list[tuple[torch.Tensor, float]]:
        """``(loss, scale)`` of every head routed here that taps ``layer`` and has rows."""
        parts = []
        for head in self.layer_heads[layer]:
            head_inputs = inputs.get(head.name)
            if head_inputs is None:
                continue
            loss = self.layer_loss(head, layer, hidden, head_inputs, record)
            if loss is not None:
                parts.append((loss, head.scale))
        return parts

    def layer_loss(
        self,
        head: TapHead,
        layer: int,
        hidden: torch.Tensor,
        inputs: TapInputs,
        record: bool = True,
    ) -> torch.Tensor | None:
        """Weighted loss sum of ``head`` at ``layer`` on this rank's rows (recorded in
        ``stats`` when ``record``)."""
        target = inputs.targets[layer]
        rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, inputs.rows)
        if rows.shape[0] != target.shape[0]:
            raise RuntimeError(
                f"tap layer {layer} ({head.name}): {rows.shape[0]} supervised rows but "
                f"{target.shape[0]} teacher targets (student and teacher masks differ)"
            )
        weight = None
        if head.projection is not None:
            rows, weight = head.projection.project(layer, rows)
        token_weight = torch.full(
            (rows.shape[0],), inputs.token_weight, dtype=torch.float32, device=rows.device
        )
        loss = projected_mse(
            rows,
            target,
            weight,
            None,
            token_weight,
            normalize=self.kernel.normalize,
            reduction="sum",
            impl=self.kernel.impl,  # type: ignore[arg-type]
            recompute=self.kernel.recompute,
            workspace_bytes=self.kernel.workspace_bytes,
        )
        if record:
            self.stats.add(
                (head.name, layer),
                loss.detach(),
                weighted_cosine(rows, target, weight, token_weight),
            )
        return loss if rows.shape[0] else None


@torch.no_grad()
def weighted_cosine(
    student: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    token_weight: torch.Tensor,
) -> torch.Tensor:
    """``sum_i w_i cos(W s_i, t_i)`` in float32, in token chunks."""
    total = torch.zeros((), dtype=torch.float32, device=student.device)
    for start in range(0, student.shape[0], _COSINE_CHUNK):
        rows = slice(start, start + _COSINE_CHUNK)
        projected = student[rows].detach().float()
        if weight is not None:
            projected = projected @ weight.detach().float().t()
        cosine = F.cosine_similarity(projected, target[rows].float(), dim=-1)
        total += (cosine * token_weight[rows]).sum()
    return total
