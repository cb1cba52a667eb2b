"""Weight sync from a live Megatron model: gather on every rank, sync and check on one.

:func:`sync_model_weights` is the trainer's call after each optimizer step. Every rank runs the
gather (:func:`oprd_mega.convert.gather.gather_hf_weights`); ``dst_rank``, the rank that talks
to the servers, streams the HF-named tensors into a :class:`WeightSync` (disk or distributed),
then checks the servers (weight version + greedy probe against the trainer's own Megatron
forward, which every rank of the model replica joins). The outcome is broadcast, so a failed
sync or check raises the same :class:`WeightSyncError` on every rank instead of leaving the
others waiting or training on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from oprd_mega.convert.gather import Include, gather_hf_weights
from oprd_mega.models.hf_config import HFModelArgs
from oprd_mega.models.running import forward_only, unwrap
from oprd_mega.models.shapes import real_vocab_size, sequence_multiple
from oprd_mega.parallel.context import context_positions, gathered_positions
from oprd_mega.parallel.distributed import broadcast_object
from oprd_mega.parallel.model_groups import groups_of, is_last_stage
from oprd_mega.rollout.weight_sync import SyncReport, WeightSync, WeightSyncError

_FORWARD = "forward"
_DONE = "done"


def _replica(model: torch.nn.Module) -> int:
    """The model's data-parallel rank: every rank of one model replica (its tensor, pipeline
    and context-parallel ranks) runs the probe's forward together."""
    return groups_of(model).dp.rank()


@torch.no_grad()
def _megatron_logits(model: torch.nn.Module, tokens: Sequence[int]) -> torch.Tensor | None:
    """Forward one sequence through this rank's stage; full logits ``[tokens, vocab]`` on the
    last pipeline stage (vocabulary shards gathered), None elsewhere. Collective over the
    model-parallel groups (the model's own)."""
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    inner = unwrap(model)
    groups = groups_of(model)
    device = next(inner.parameters()).device
    length = len(tokens)
    cp = groups.cp.size()
    multiple = sequence_multiple(tp=groups.tp.size(), cp=cp, sp=inner.config.sequence_parallel)
    padded = list(tokens) + [0] * (-length % multiple)  # causal: padding after changes nothing
    ids = torch.tensor([padded], dtype=torch.long, device=device)
    bounds = [0, len(padded)]
    if cp > 1:  # this rank's load-balanced chunks (oprd_mega.parallel.context)
        keep = context_positions(bounds, cp, groups.cp.rank()).to(device)
        ids = ids.index_select(1, keep)

    results = forward_only(
        model,
        [ids],
        seq_length=len(padded),
        micro_batch_size=1,
        outputs=lambda _ids, out: {"logits": out.detach()},
    )
    if not is_last_stage(groups):
        return None
    logits = gather_from_tensor_model_parallel_region(results[0]["logits"], group=groups.tp)
    if cp > 1:  # every rank's chunks, back in sequence order
        shares = [torch.empty_like(logits) for _ in range(cp)]
        dist.all_gather(shares, logits.contiguous(), group=groups.cp)
        order = torch.argsort(gathered_positions(bounds, cp)).to(device)
        logits = torch.cat(shares, dim=1).index_select(1, order)
    return logits[0, :length, : real_vocab_size(model)].float()


def _probe_forward(model: torch.nn.Module, tokens: list[int], dst_rank: int) -> torch.Tensor:
    """Run by every rank in the check loop: Megatron forward in ``dst_rank``'s replica, logits
    sent from the last stage of ``dst_rank``'s pipeline to ``dst_rank``."""
    me = dist.get_rank()
    logits = _megatron_logits(model, tokens)
    pp = groups_of(model).pp
    last = dist.get_global_rank(pp, pp.size() - 1)
    if me == dst_rank:
        if last != me:
            vocab = real_vocab_size(model)
            logits = torch.empty(len(tokens), vocab, device=next(model.parameters()).device)
            dist.recv(logits, src=last)
        return logits  # type: ignore[return-value]
    pipeline = dist.get_process_group_ranks(pp)
    if logits is not None and dst_rank in pipeline:
        dist.send(logits.contiguous(), dst=dst_rank)
    return torch.empty(0)


async def check_model_weights(
    sync: WeightSync | None,
    model: torch.nn.Module,
    version: str,
    *,
    dst_rank: int = 0,
    probe: bool = True,
    error: str | None = None,
) -> None:
    """Collective post-sync check: ``dst_rank`` probes the servers (version, and with ``probe``
    the greedy log-probs against this model's Megatron forward, run by all ranks of its
    replica); every rank raises the same :class:`WeightSyncError` if it fails. A non-None
    ``error`` (an earlier failure on ``dst_rank``) skips the probe and is raised everywhere."""
    me = dist.get_rank()
    if me == dst_rank:
        replica = _replica(model)

        def forward(tokens: Sequence[int]) -> torch.Tensor:
            broadcast_object((_FORWARD, list(tokens), replica), dst_rank)
            return _probe_forward(model, list(tokens), dst_rank)

        if error is None and sync is None:
            error = f"weight sync of {version!r}: no WeightSync was given on dst_rank {dst_rank}"
        if error is None:
            try:
                await sync.check(version, forward if probe else None)  # type: ignore[union-attr]
            except WeightSyncError as exc:
                error = str(exc)
            except Exception as exc:  # a dead server, a bad answer: stop training all the same
                error = f"check of weight version {version!r} failed: {exc!r}"
        broadcast_object((_DONE, error, None), dst_rank)
    else:
        while True:
            kind, payload, replica = broadcast_object(None, dst_rank)
            if kind == _DONE:
                error = payload
                break
            if replica == _replica(model):
                _probe_forward(model, payload, dst_rank)
    if error is not None:
        raise WeightSyncError(error)


async def sync_model_weights(
    sync: WeightSync | None,
    model: torch.nn.Module,
    args: HFModelArgs,
    version: str,
    *,
    dst_rank: int = 0,
    include: Include | None = None,
    probe: bool = True,
) -> SyncReport | None:
    """Sync ``model``'s weights to the servers as ``version`` and check them (collective).

    Every rank calls it; ``sync`` (a :class:`DiskWeightSync` or :class:`DistributedWeightSync`)
    is needed on ``dst_rank`` only. Returns the :class:`SyncReport` on ``dst_rank`` (its time
    includes the gather), None elsewhere. Raises :class:`WeightSyncError` on every rank when the
    sync or its check fails. ``include``: see :func:`gather_hf_weights`.
    """
    weights = gather_hf_weights(model, args, dst_rank=dst_rank, include=include)
    report: SyncReport | None = None
    error: str | None = None
    if dist.get_rank() == dst_rank and sync is not None:
        try:
            # Generation pauses around the update (as slime does); in-flight requests resume
            # after it, re-prefilled with the new weights.
            await sync.client.pause_generation(urls=sync.control_urls)
            try:
                report = await sync.sync(weights, version)
            finally:
                await sync.client.continue_generation(urls=sync.control_urls)
        except Exception as exc:
            error = f"weight sync of {version!r} failed: {exc}"
    # Exhaust the gather (all of it on other ranks; what a failed sync left on dst_rank) so
    # that every rank leaves its collectives in step.
    for _ in weights:
        pass
    await check_model_weights(sync, model, version, dst_rank=dst_rank, probe=probe, error=error)
    return report
