"""Hidden states of both Megatron models at the selected rows, collected where they live and
gathered to global rank 0.

Each model runs forward only (``get_forward_backward_func(forward_only=True)``), one microbatch
per call so that every call may have its own sequence length under pipeline parallelism.
Without sequence parallelism a layer's output is replicated over the tensor-parallel group, so
tensor-parallel rank 0 of the stage that owns the layer keeps its selected rows; per teacher
layer it also streams them into a :class:`StreamingCovariance`, merged over the data-parallel
group with :func:`all_reduce_covariance`. Rank 0 then receives every layer's rows, ordered by
data-parallel rank, which is global row order (:func:`oprd_mega.bridge.plan.data_parallel_share`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from oprd_mega.models.running import forward_only, layer_hooks

from .covariance import StreamingCovariance, all_reduce_covariance
from .plan import WorkItem, batch_tensors


def forward_rows(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    columns: torch.Tensor,
    layers: Iterable[int],
) -> dict[int, torch.Tensor]:
    """Run ``tokens`` [batch, seq] through this rank's stage and return, per layer of ``layers``
    that the stage owns, its output at (``positions``, ``columns``) as [rows, hidden] float32 on
    CPU (a collective over the tensor- and pipeline-parallel groups)."""
    wanted = set(layers)
    captured: dict[int, torch.Tensor] = {}

    def keep(module: torch.nn.Module, _inputs: tuple, output: object) -> None:
        hidden = output[0] if isinstance(output, tuple) else output  # [seq, batch, hidden]
        assert isinstance(hidden, torch.Tensor)
        rows = hidden[positions.to(hidden.device), columns.to(hidden.device)]
        captured[module.layer_number] = rows.detach().to("cpu", torch.float32)

    with layer_hooks(model, keep, wanted):
        forward_only(
            model,
            [tokens.to(next(model.parameters()).device)],
            seq_length=tokens.shape[1],
            micro_batch_size=tokens.shape[0],
        )
    return captured


@dataclass
class LocalStates:
    """This rank's selected rows per layer (tensor-parallel rank 0 only) and per teacher layer
    the stream of its rows."""

    student: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    teacher: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    streams: dict[int, StreamingCovariance] = field(default_factory=dict)


def collect_states(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    batches: Sequence[Sequence[WorkItem]],
    student_layers: Sequence[int],
    teacher_layers: Sequence[int],
    progress: Callable[[int], None] | None = None,
) -> LocalStates:
    """Both models' rows over this data-parallel rank's microbatches (collective over TP/PP)."""
    keeper = parallel_state.get_tensor_model_parallel_rank() == 0
    states = LocalStates()
    for items in batches:
        for side, model, layers in (
            ("student", student, student_layers),
            ("teacher", teacher, teacher_layers),
        ):
            tokens, positions, columns = batch_tensors(items, side)
            rows = forward_rows(model, tokens, positions, columns, layers)
            if not keeper:
                continue
            kept = states.student if side == "student" else states.teacher
            for layer, value in rows.items():
                kept.setdefault(layer, []).append(value)
                if side == "teacher":
                    stream = states.streams.setdefault(layer, StreamingCovariance(value.shape[1]))
                    stream.update(value)
        if progress is not None:
            progress(1)
    return states


def merge_streams(
    states: LocalStates, owned_teacher_layers: Sequence[int], d_teacher: int
) -> dict[int, StreamingCovariance]:
    """Every owned teacher layer's stream over the data-parallel group (a collective there;
    call it on every rank, in the same layer order within a stage)."""
    if parallel_state.get_tensor_model_parallel_rank() != 0:
        return {}
    group = parallel_state.get_data_parallel_group()
    merged = {}
    for layer in owned_teacher_layers:
        stream = states.streams.get(layer, StreamingCovariance(d_teacher))
        merged[layer] = all_reduce_covariance(stream, group)
    return merged


@dataclass
class GatheredStates:
    """On global rank 0: rows [N, d] per student and teacher layer (global row order) and the
    merged stream of every teacher layer."""

    student: dict[int, torch.Tensor]
    teacher: dict[int, torch.Tensor]
    streams: dict[int, StreamingCovariance]


def _gather_layer(local: object | None) -> list[object] | None:
    """gather_object of one (data-parallel rank, payload) or None to global rank 0."""
    out: list[object] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(local, out, dst=0)
    return out


def owned_layers(model: torch.nn.Module) -> set[int]:
    """Global 1-based numbers of the layers on this rank's pipeline stage."""
    return {layer.layer_number for layer in model.decoder.layers}


def gather_states(
    states: LocalStates,
    streams: dict[int, StreamingCovariance],
    layers: dict[str, Sequence[int]],
    owned: dict[str, set[int]],
    dims: dict[str, int],
) -> GatheredStates | None:
    """Send every layer's rows (and each teacher layer's merged stream) to global rank 0, one
    layer at a time to bound the memory; ``None`` on the other ranks (a collective).

    ``layers``, ``owned`` and ``dims`` are keyed by side (``student``, ``teacher``): all layers
    to gather (the same list on every rank), those on this stage, and the widths.
    """
    keeper = parallel_state.get_tensor_model_parallel_rank() == 0
    dp_rank = parallel_state.get_data_parallel_rank()
    out = GatheredStates({}, {}, {})
    for side in ("student", "teacher"):
        kept = states.student if side == "student" else states.teacher
        target = out.student if side == "student" else out.teacher
        for layer in layers[side]:
            payload = None
            if keeper and layer in owned[side]:
                rows = torch.cat(kept[layer]) if kept.get(layer) else torch.zeros(0, dims[side])
                payload = (dp_rank, rows, streams.get(layer) if side == "teacher" else None)
            parts = _gather_layer(payload)
            if parts is None:
                continue
            found = sorted((p for p in parts if p is not None), key=lambda p: p[0])  # type: ignore[index]
            target[layer] = torch.cat([rows for _, rows, _ in found])  # type: ignore[misc]
            if side == "teacher":
                out.streams[layer] = found[0][2]  # type: ignore[index]
    return out if dist.get_rank() == 0 else None
