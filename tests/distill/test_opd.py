"""OPD top-1 and top-k in token chunks, single process and vocabulary-parallel over 2 ranks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from oprd_mega.distill.opd import OPDOptions, opd_loss
from tests.distill.opd_reference import make_inputs, pad_rows, reference_opd
from tests.torchrun_utils import run_torchrun


@pytest.mark.parametrize("kind", ["top1", "topk"])
@pytest.mark.parametrize("chunk_tokens", [1, 7, 1024])
def test_matches_dense_float64(kind: str, chunk_tokens: int) -> None:
    s_h, s_w, t_h, t_w, ids, weights = make_inputs(seed=1)
    s_h.requires_grad_()
    s_w.requires_grad_()
    result = opd_loss(s_h, s_w, t_h, t_w, ids, weights, OPDOptions(kind, 5, chunk_tokens))
    upstream = torch.tensor(0.37)
    hidden_grad, weight_grad = torch.autograd.grad(result.loss * upstream, [s_h, s_w])
    loss, ref_hidden, ref_weight, metrics = reference_opd(s_h, s_w, t_h, t_w, ids, weights, kind, 5)
    torch.testing.assert_close(result.loss.double(), loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hidden_grad.double(), ref_hidden * 0.37, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(weight_grad.double(), ref_weight * 0.37, rtol=1e-4, atol=1e-6)
    for name, value in metrics.items():
        assert result.metrics[name].item() == pytest.approx(value, rel=1e-4, abs=1e-5), name


@pytest.mark.parametrize("kind", ["top1", "topk"])
def test_padding_rows_stay_out_of_the_loss(kind: str) -> None:
    """Output layers with padding rows beyond the real vocabulary (Megatron's padded vocabulary)
    give the float64 oracle of the real vocabulary alone, and no gradient reaches the padding."""
    s_h, s_w, t_h, t_w, ids, weights = make_inputs(seed=4)
    padded_s = pad_rows(s_w, 64, seed=5).requires_grad_()
    padded_t = pad_rows(t_w, 64, seed=6)
    hidden = s_h.clone().requires_grad_()
    options = OPDOptions(kind, 5, chunk_tokens=7, vocab_size=50)
    result = opd_loss(hidden, padded_s, t_h, padded_t, ids, weights, options)
    hidden_grad, weight_grad = torch.autograd.grad(result.loss, [hidden, padded_s])
    loss, ref_hidden, ref_weight, metrics = reference_opd(s_h, s_w, t_h, t_w, ids, weights, kind, 5)
    torch.testing.assert_close(result.loss.double(), loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hidden_grad.double(), ref_hidden, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(weight_grad[:50].double(), ref_weight, rtol=1e-4, atol=1e-6)
    assert torch.count_nonzero(weight_grad[50:]) == 0
    for name, value in metrics.items():
        assert result.metrics[name].item() == pytest.approx(value, rel=1e-4, abs=1e-5), name
    unmasked = opd_loss(s_h, padded_s.detach(), t_h, padded_t, ids, weights, OPDOptions(kind, 5))
    assert not torch.allclose(unmasked.loss.double(), loss, rtol=1e-3)  # the rows would matter


def test_no_grad_and_bad_inputs() -> None:
    s_h, s_w, t_h, t_w, ids, weights = make_inputs(seed=2)
    s_w.requires_grad_()
    with torch.no_grad():
        result = opd_loss(s_h, s_w, t_h, t_w, ids, weights, OPDOptions("top1"))
    assert result.loss.grad_fn is None
    with pytest.raises(
        ValueError, match="student vocabulary shard 50 differs from the teacher's 49"
    ):
        opd_loss(s_h, s_w, t_h, t_w[:49], ids, weights, OPDOptions("top1"))
    with pytest.raises(ValueError, match="opd.kind: 'top2'"):
        OPDOptions("top2")
    with pytest.raises(ValueError, match="opd.k: 0 must be >= 1"):
        OPDOptions("topk", 0)
    with pytest.raises(ValueError, match="opd.vocab_size: 4 must be >= k=5"):
        OPDOptions("topk", 5, vocab_size=4)


def test_vocab_parallel_over_two_ranks_matches_dense() -> None:
    worker = Path(__file__).parent / "workers" / "opd_tp_worker.py"
    result = run_torchrun(worker, nproc=2, timeout=240)
    assert result.stdout.count("opd tp ok") == 2, result.stdout
