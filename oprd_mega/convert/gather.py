"""Full HF-named tensors out of a live Megatron model at any TP/PP, on one rank.

Weight sync and export both need the model as Hugging Face names and full tensors. Here every
rank of the model replica that holds ``dst_rank`` takes part: per mapping unit (the model-level
tensors, then each layer in global order) the owning pipeline stage all-gathers the TP shards
and unshards them by their ``tp_kind``; one rank of that stage sends the full Megatron tensors to
``dst_rank``, which renames and splits them through :func:`mcore_to_hf_state` (the one mapping)
and yields them. At most one unit is held at a time on ``dst_rank``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from oprd_mega.convert import layout
from oprd_mega.convert.mapping import get_mapping, mcore_to_hf_state, tp_kind
from oprd_mega.convert.mcore_io import global_parameters
from oprd_mega.models.hf_config import HFModelArgs
from oprd_mega.parallel.model_groups import groups_of

TIED_OUTPUT = "output_layer.weight"
Include = Callable[[str], bool]


def mapping_units(args: HFModelArgs) -> list[tuple[int | None, list[str]]]:
    """The mapping's Megatron names per unit: model-level tensors (``None``), then each layer."""
    mapping = get_mapping(args.family)
    return [
        (layer, [rule.mcore.format(i=layer) for rule in mapping.rules(args, layer)])
        for layer in [None, *range(args.num_layers)]
    ]


@dataclass(frozen=True)
class _RankInfo:
    """What one rank tells the others before the gather (tensors only from TP rank 0)."""

    rank: int
    replica: tuple[int, int]  # (data-parallel rank, context-parallel rank)
    pp: int
    tp: int
    tensors: dict[str, tuple[tuple[int, ...], str]] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)


def _local_info(model: torch.nn.Module, args: HFModelArgs, include: Include) -> _RankInfo:
    groups = groups_of(model)  # the model's own layout
    mapped = {n for _, names in mapping_units(args) for n in names}
    tp = groups.tp.rank()
    info = _RankInfo(
        rank=dist.get_rank(),
        replica=(groups.dp.rank(), groups.cp.rank()),
        pp=groups.pp.rank(),
        tp=tp,
    )
    if tp != 0:
        return info
    for name, param in global_parameters(model).items():
        if args.tie_word_embeddings and name == TIED_OUTPUT:
            continue  # the last stage's copy of the tied embedding
        if not include(name):
            continue
        if name not in mapped:
            info.unknown.append(name)
        else:
            dtype = str(param.dtype).removeprefix("torch.")
            info.tensors[name] = (tuple(param.shape), dtype)
    return info


def _full_shape(kind: str, shard_shape: tuple[int, ...], tp_size: int) -> torch.Size:
    shard = torch.empty(shard_shape, device="meta")
    return layout.unshard(kind, [shard] * tp_size).shape


def _local_gather(model: torch.nn.Module, args: HFModelArgs) -> Iterator[tuple[str, torch.Tensor]]:
    """Without torch.distributed: the whole model is local (TP1, PP1)."""
    params = {n: p.detach() for n, p in global_parameters(model).items()}
    for layer, names in mapping_units(args):
        missing = [n for n in names if n not in params]
        if missing:
            raise KeyError(f"Megatron tensor(s) {missing[:5]} missing from the model")
        yield from mcore_to_hf_state(args, {n: params[n] for n in names}, layer).items()


@torch.no_grad()
def gather_hf_weights(
    model: torch.nn.Module,
    args: HFModelArgs,
    *,
    dst_rank: int = 0,
    include: Include | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, full tensor)`` of a live model on ``dst_rank``; nothing elsewhere.

    Collective: every rank of the default group must call it and exhaust the iterator (it is a
    generator; nothing runs until it is iterated). Ranks outside ``dst_rank``'s data/context
    parallel replica only take part in the initial exchange of tensor names.

    ``include(name)`` (canonical Megatron name, global layer index) picks the model parameters
    meant for the servers; the default keeps the mapping's own names, so extra Megatron-only
    parameters (the OPRD projection) are skipped. An included parameter the mapping does not
    know, or a mapping tensor no stage holds, raises on every rank. Tensors keep the model's
    dtype and device.
    """
    if include is None:
        mapped = {n for _, names in mapping_units(args) for n in names}
        include = mapped.__contains__
    if not dist.is_initialized():
        if dst_rank != 0:
            raise ValueError(f"dst_rank={dst_rank} without torch.distributed")
        yield from _local_gather(model, args)
        return
    world = dist.get_world_size()
    if not 0 <= dst_rank < world:
        raise ValueError(f"dst_rank={dst_rank} is not a rank of the world of {world}")
    infos: list[_RankInfo | None] = [None] * world
    dist.all_gather_object(infos, _local_info(model, args, include))
    me = dist.get_rank()
    replica = infos[dst_rank].replica  # type: ignore[union-attr]
    members = [i for i in infos if i is not None and i.replica == replica]
    stages: dict[int, list[int]] = {}
    for info in sorted(members, key=lambda i: (i.pp, i.tp)):
        stages.setdefault(info.pp, []).append(info.rank)
    owner: dict[str, int] = {}
    shapes: dict[str, tuple[tuple[int, ...], str]] = {}
    unknown: list[str] = []
    for info in members:
        unknown += info.unknown
        for name, meta in info.tensors.items():
            owner.setdefault(name, info.pp)
            shapes.setdefault(name, meta)
    if unknown:
        raise ValueError(
            f"model parameter(s) {sorted(set(unknown))[:5]} are not in the {args.family} "
            "mapping: pass include= to leave Megatron-only parameters out of the sync"
        )
    units = mapping_units(args)
    missing = [n for _, names in units for n in names if n not in owner]
    if missing:
        raise KeyError(
            f"Megatron tensor(s) {missing[:5]} are held by no pipeline stage (or excluded by "
            "include=): the servers need every tensor of the mapping"
        )
    if all(me != i.rank for i in members):
        return
    params = {n: p for n, p in global_parameters(model).items() if n in owner}
    device = next(iter(global_parameters(model).values())).device
    tp_group = groups_of(model).tp
    for layer, names in units:
        full: dict[str, torch.Tensor] = {}
        for name in names:
            ranks = stages[owner[name]]
            kind = tp_kind(args, name)
            if me in ranks:
                local = params[name].detach().contiguous()
                if len(ranks) > 1:
                    shards = [torch.empty_like(local) for _ in ranks]
                    dist.all_gather(shards, local, group=tp_group)
                    tensor = layout.unshard(kind, shards)
                else:
                    tensor = local
                if me == dst_rank:
                    full[name] = tensor
                elif me == ranks[0] and dst_rank not in ranks:
                    dist.send(tensor.contiguous(), dst=dst_rank)
            elif me == dst_rank:
                shard_shape, dtype = shapes[name]
                buffer = torch.empty(
                    _full_shape(kind, shard_shape, len(ranks)),
                    dtype=getattr(torch, dtype),
                    device=device,
                )
                dist.recv(buffer, src=ranks[0])
                full[name] = buffer
        if me == dst_rank:
            yield from mcore_to_hf_state(args, full, layer).items()
        del full
