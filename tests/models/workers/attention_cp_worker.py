"""SDPAttention under context parallelism vs Megatron's DotProductAttention on the whole sequence.

torchrun worker (2 processes, CP2, float64): each rank attends its load-balanced chunks
(``oprd_mega.parallel.context``) with K/V gathered over the CP group; its output rows and the
gradients of its query, key and value rows must equal the single-process reference at the same
positions (causal ``[s, b, n, h]``; packed THD against each sequence on its own). Rank 0 prints
one ``RESULT`` JSON line of the worst differences over both ranks.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # repo root

import torch
import torch.distributed as dist
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from oprd_mega.models.attention import SDPAttention, thd_params
from oprd_mega.parallel import ParallelLayout, destroy_distributed, init_distributed
from oprd_mega.parallel.context import context_positions
from tests.models.workers.attention_worker import config, qkv, run

HIDDEN = 96


def worst(mine, reference, keep: torch.Tensor, dim: int) -> float:
    """Max difference between this rank's output/grads and the reference rows ``keep``."""
    pairs = [(mine[0], reference[0]), *zip(mine[1], reference[1], strict=True)]
    return max(float((a - b.index_select(dim, keep)).abs().max()) for a, b in pairs)


def main() -> None:
    init_distributed(ParallelLayout(cp=2))
    cp, rank = 2, dist.get_rank()
    reference = DotProductAttention(config(), 1, AttnMaskType.causal, "self")
    ours = SDPAttention(config(context_parallel_size=cp), 1, AttnMaskType.causal, "self")
    generator = torch.Generator().manual_seed(0)
    out = {}

    seq, batch = 24, 2
    tensors = qkv(seq, batch, generator)
    weight = torch.randn(seq, batch, HIDDEN, generator=generator, dtype=torch.float64)
    keep = context_positions([0, seq], cp, rank)
    local = [t.index_select(0, keep) for t in tensors]
    mine = run(ours, local, weight.index_select(0, keep), attention_mask=None)
    full = run(reference, tensors, weight, attention_mask=None)
    out["causal"] = worst(mine, full, keep, 0)
    out["causal_rows"] = int(mine[0].shape[0])

    lengths = [8, 12, 4]  # every sequence a multiple of 2 x cp
    cu = torch.tensor([0, 8, 20, 24], dtype=torch.int32)
    packed = [t[:, 0].detach() for t in qkv(sum(lengths), 1, generator)]
    weight = torch.randn(sum(lengths), HIDDEN, generator=generator, dtype=torch.float64)
    params = thd_params(cu)
    keep = context_positions(cu.tolist(), cp, rank)
    mine = run(
        ours,
        [t.index_select(0, keep) for t in packed],
        weight.index_select(0, keep),
        attention_mask=None,
        packed_seq_params=params,
    )
    pieces, grads = [], [[], [], []]
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        one = [t[start:end].unsqueeze(1) for t in packed]
        result, one_grads = run(reference, one, weight[start:end].unsqueeze(1), attention_mask=None)
        pieces.append(result[:, 0])
        for store, grad in zip(grads, one_grads, strict=True):
            store.append(grad[:, 0])
    separate = (torch.cat(pieces), [torch.cat(g) for g in grads])
    out["packed"] = worst(mine, separate, keep, 0)
    out["packed_rows"] = int(mine[0].shape[0])

    try:
        run(ours, tensors, weight, attention_mask=torch.zeros(1, 1, seq, seq, dtype=torch.bool))
        out["refused_mask"] = ""
    except ValueError as exc:
        out["refused_mask"] = str(exc)

    worst_values = torch.tensor([out["causal"], out["packed"]], dtype=torch.float64)
    dist.all_reduce(worst_values, op=dist.ReduceOp.MAX)
    out["causal"], out["packed"] = worst_values.tolist()
    if rank == 0:
        print("RESULT " + json.dumps(out), flush=True)
    destroy_distributed()


if __name__ == "__main__":
    main()
