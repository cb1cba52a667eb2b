"""Under torchrun (2 ranks, gloo): each rank holds half of both vocabularies; compare to dense.

Then with padded output layers (Megatron's padded vocabulary): 26 real tokens in 60 rows, so
rank 1's shard is padding only; the result must be the dense oracle of the 26 real tokens."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from oprd_mega.distill.opd import OPDOptions, opd_loss
from tests.distill.opd_reference import make_inputs, pad_rows, reference_opd


def main() -> None:
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    for kind in ("top1", "topk"):
        s_h, s_w, t_h, t_w, ids, weights = make_inputs(seed=3, vocab=52)
        shard = slice(rank * 52 // size, (rank + 1) * 52 // size)
        hidden = s_h.clone().requires_grad_()
        weight = s_w[shard].clone().requires_grad_()
        options = OPDOptions(kind, k=6, chunk_tokens=5, group=dist.group.WORLD)
        result = opd_loss(hidden, weight, t_h, t_w[shard], ids, weights, options)
        result.loss.backward()
        partial = hidden.grad.clone()
        dist.all_reduce(partial)  # what the caller's tensor-parallel mapping does
        loss, ref_hidden, ref_weight, metrics = reference_opd(
            s_h, s_w, t_h, t_w, ids, weights, kind, 6
        )
        torch.testing.assert_close(result.loss.double(), loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(partial.double(), ref_hidden, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(weight.grad.double(), ref_weight[shard], rtol=1e-4, atol=1e-6)
        for name, value in metrics.items():
            assert abs(result.metrics[name].item() - value) <= 1e-4 * abs(value) + 1e-5, name
    for kind in ("top1", "topk"):
        s_h, s_w, t_h, t_w, ids, weights = make_inputs(seed=7, vocab=26)
        shard = slice(rank * 30, (rank + 1) * 30)
        hidden = s_h.clone().requires_grad_()
        weight = pad_rows(s_w, 60, seed=8)[shard].clone().requires_grad_()
        options = OPDOptions(kind, k=6, chunk_tokens=5, group=dist.group.WORLD, vocab_size=26)
        teacher = pad_rows(t_w, 60, seed=9)[shard]
        result = opd_loss(hidden, weight, t_h, teacher, ids, weights, options)
        result.loss.backward()
        partial = hidden.grad.clone()
        dist.all_reduce(partial)
        loss, ref_hidden, ref_weight, metrics = reference_opd(
            s_h, s_w, t_h, t_w, ids, weights, kind, 6
        )
        torch.testing.assert_close(result.loss.double(), loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(partial.double(), ref_hidden, rtol=1e-4, atol=1e-6)
        real = weight.grad[: max(26 - rank * 30, 0)]
        torch.testing.assert_close(real.double(), ref_weight[shard], rtol=1e-4, atol=1e-6)
        assert torch.count_nonzero(weight.grad[real.shape[0] :]) == 0
        for name, value in metrics.items():
            assert abs(result.metrics[name].item() - value) <= 1e-4 * abs(value) + 1e-5, name
    print("opd tp ok", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
