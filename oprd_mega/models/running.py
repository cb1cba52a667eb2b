"""Running a built Megatron model: the module inside its wrappers, hooks on its layers, and a
forward-only pass through Megatron's pipeline schedule.

The teacher pass, the bridge's state collection, the conversion check and the weight-sync probe
all run their models through here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import Any

import torch
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

from oprd_mega.parallel.model_groups import groups_of

LayerHook = Callable[[torch.nn.Module, tuple, Any], None]


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


@contextlib.contextmanager
def layer_hooks(
    model: torch.nn.Module, hook: LayerHook, layers: Collection[int] | None = None
) -> Iterator[None]:
    """``hook(layer, inputs, output)`` on the decoder layers this pipeline stage owns (only
    those whose global ``layer_number`` is in ``layers``, when given), removed on exit."""
    handles = [
        layer.register_forward_hook(hook)
        for layer in unwrap(model).decoder.layers
        if layers is None or layer.layer_number in layers
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def forward_only(
    model: torch.nn.Module,
    batches: Sequence[Any],
    *,
    seq_length: int,
    micro_batch_size: int,
    forward: Callable[[torch.nn.Module, Any], torch.Tensor] | None = None,
    outputs: Callable[[Any, torch.Tensor], dict] | None = None,
) -> list[dict]:
    """Megatron's forward-only schedule over ``batches`` (one microbatch each; collective over
    the model's own model-parallel groups, ``model.pg_collection``), without autograd.

    ``forward(model, batch)`` runs one microbatch (default: ``model(batch, None, None)``, the
    batch being the token ids); ``outputs(batch, output)`` gives the dict the last pipeline
    stage returns for it (default: nothing). Returns those dicts in order (last stage only).
    """

    def forward_step(data_iterator, step_model):  # type: ignore[no-untyped-def]
        batch = next(data_iterator)
        output = step_model(batch, None, None) if forward is None else forward(step_model, batch)

        def loss_func(tensor: torch.Tensor):  # type: ignore[no-untyped-def]
            kept = {} if outputs is None else outputs(batch, tensor)
            return torch.zeros((), device=tensor.device), kept

        return output, loss_func

    groups = groups_of(model)
    pipelined = groups.pp.size() > 1
    schedule = get_forward_backward_func(pp_size=groups.pp.size(), vp_size=None)
    # the pipelined schedule takes the groups with a p2p communicator over their pp group
    p2p = P2PCommunicator(pp_group=groups.pp, config=unwrap(model).config) if pipelined else None
    with torch.no_grad():
        return schedule(
            forward_step_func=forward_step,
            data_iterator=iter(batches),
            model=[model],
            num_microbatches=len(batches),
            seq_length=seq_length,
            micro_batch_size=micro_batch_size,
            forward_only=True,
            p2p_communicator=p2p,
            pg_collection=groups,
        )


def output_weight(model: torch.nn.Module) -> torch.Tensor:
    """This rank's output-layer weight shard ``[vocab/tp, h]`` (last stage)."""
    inner = unwrap(model)
    if getattr(inner, "share_embeddings_and_output_weights", False):
        return inner.shared_embedding_or_output_weight()
    if getattr(inner, "output_layer", None) is None:
        raise ValueError("OPD needs an output layer on the last pipeline stage")
    return inner.output_layer.weight
