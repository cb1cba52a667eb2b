"""P_S fits: linear against closed-form least squares; the planted sweep against the oracle."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from oprd_mega.bridge import (
    FitConfig,
    StreamingCovariance,
    StudentMap,
    fit_student_map,
    fit_sweep,
    format_report,
    mean_cosine,
    principal_subspace,
)
from oprd_mega.bridge.student_map import split_rows

from .synthetic import planted


def test_linear_fit_matches_least_squares() -> None:
    g = torch.Generator().manual_seed(0)
    inputs = torch.randn(400, 8, generator=g) * torch.linspace(0.5, 20, 8) + 3.0
    truth = torch.randn(3, 8, generator=g)
    targets = inputs @ truth.t() + 0.1 * torch.randn(400, 3, generator=g)
    config = FitConfig(epochs=100, batch_size=64, lr=0.05, patience=100, seed=1)
    result = fit_student_map(inputs, targets, config)
    train, heldout = split_rows(400, config.heldout_fraction, config.seed)
    x, y = inputs[train].double().numpy(), targets[train].double().numpy()
    solution = np.linalg.lstsq(x, y, rcond=None)[0].T  # no intercept, like P_S
    fitted = result.map.weight().double().numpy()
    error = np.linalg.norm(fitted - solution) / np.linalg.norm(solution)
    print(f"linear P_S vs least squares: relative error {error:.2e}")
    assert error < 1e-2
    x_out, y_out = inputs[heldout].double().numpy(), targets[heldout].double().numpy()
    ls_cos = mean_cosine(torch.from_numpy(x_out @ solution.T), torch.from_numpy(y_out))
    assert result.cosine_after == pytest.approx(ls_cos, abs=1e-3)


def test_planted_sweep_matches_the_oracle_cosine() -> None:
    data = planted(noise=1.0)
    stream = StreamingCovariance(32).update(data.teacher)
    subspace = principal_subspace(stream)
    config = FitConfig(epochs=30, batch_size=128, lr=0.03, patience=5)
    fits = fit_sweep(
        data.student, data.teacher, subspace, [1, 2, 4, 8, 0], config, layer_pair=(1, 2)
    )
    print("\n" + format_report(fits))
    _, heldout = split_rows(data.student.shape[0], config.heldout_fraction, config.seed)
    by_rank = {}
    for fit in fits:
        # Oracle: the teacher's planted signal in the recovered subspace, z A P_T^T.
        target = subspace.project(data.teacher[heldout], fit.rank)
        oracle = data.latents[heldout] @ data.basis @ subspace.projection(fit.rank).t()
        oracle_cos = mean_cosine(oracle, target)
        print(f"rank {fit.rank}: oracle {oracle_cos:.4f} fitted {fit.cosine_after:.4f}")
        assert fit.cosine_after == pytest.approx(oracle_cos, abs=0.03)
        assert abs(fit.cosine_before) < 0.5
        by_rank[fit.rank] = fit.cosine_after
    assert by_rank[4] > 0.95
    assert by_rank[32] < by_rank[4] - 0.03  # noise directions cannot be predicted


def test_mlp_map_learns_and_round_trips() -> None:
    data = planted(tokens=1024, noise=0.3)
    subspace = principal_subspace(StreamingCovariance(32).update(data.teacher))
    targets = subspace.project(data.teacher, 4)
    config = FitConfig(kind="mlp", mlp_hidden=32, epochs=15, batch_size=128, lr=0.01)
    result = fit_student_map(data.student, targets, config)
    assert result.cosine_after > 0.9 > result.cosine_before
    copy = StudentMap.from_tensors(result.map.tensors(), "test")
    torch.testing.assert_close(copy(data.student[:5]), result.map(data.student[:5]))


def test_early_stopping_restores_the_best_epoch() -> None:
    g = torch.Generator().manual_seed(5)
    inputs, targets = torch.randn(60, 24, generator=g), torch.randn(60, 2, generator=g)
    config = FitConfig(epochs=200, batch_size=16, lr=0.05, patience=2, heldout_fraction=0.3)
    result = fit_student_map(inputs, targets, config)
    assert len(result.heldout_loss) < 200
    assert result.best_epoch == int(np.argmin(result.heldout_loss)) + 1
    assert len(result.heldout_loss) == result.best_epoch + config.patience
    _, heldout = split_rows(60, 0.3, config.seed)
    with torch.no_grad():
        restored = float(((result.map(inputs[heldout]) - targets[heldout]) ** 2).mean())
    assert restored == pytest.approx(result.heldout_loss[result.best_epoch - 1], rel=1e-4)


def test_fit_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="fit.kind"):
        FitConfig(kind="conv")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fit.heldout_fraction"):
        FitConfig(heldout_fraction=1.0)
    with pytest.raises(ValueError, match="equal tokens"):
        fit_student_map(torch.zeros(5, 3), torch.zeros(4, 2))
