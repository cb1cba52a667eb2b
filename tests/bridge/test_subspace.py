"""P_T and mu_T: one float64 eigh against an SVD of all rows, and the planted truth."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from oprd_mega.bridge import StreamingCovariance, principal_subspace, sweep_ranks
from oprd_mega.bridge.subspace import fix_signs

from .synthetic import planted


def test_eigh_equals_svd_of_all_rows() -> None:
    g = torch.Generator().manual_seed(1)
    rows = torch.randn(300, 7, generator=g, dtype=torch.float64) @ torch.randn(
        7, 7, generator=g, dtype=torch.float64
    )
    stream = StreamingCovariance(7)
    for batch in rows.split(41):
        stream.update(batch)
    subspace = principal_subspace(stream)
    centred = rows.numpy() - rows.numpy().mean(0)
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    np.testing.assert_allclose(subspace.eigenvalues.numpy(), singular**2 / 300, rtol=1e-9)
    # Same directions up to sign; after the sign convention, identical.
    expected = fix_signs(torch.from_numpy(vt.copy()))
    torch.testing.assert_close(subspace.eigenvectors, expected, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(subspace.mean, torch.from_numpy(rows.numpy().mean(0)))
    projected = subspace.project(rows, 3)
    torch.testing.assert_close(projected, torch.from_numpy(centred @ expected[:3].numpy().T))


def test_sign_convention() -> None:
    vectors = torch.tensor([[0.1, -0.9, 0.3], [0.5, 0.5, -0.2], [0.0, 0.0, 0.0]])
    fixed = fix_signs(vectors)
    assert fixed[0].tolist() == pytest.approx([-0.1, 0.9, -0.3])
    assert fixed[1].tolist() == pytest.approx([0.5, 0.5, -0.2])  # tie: the first index decides
    assert fixed[2].tolist() == [0.0, 0.0, 0.0]
    assert torch.equal(fix_signs(-fixed[:2]), fixed[:2])


def test_planted_subspace_is_recovered() -> None:
    data = planted(noise=1.0)
    stream = StreamingCovariance(32)
    for batch in data.teacher.split(500):
        stream.update(batch)
    subspace = principal_subspace(stream)
    p_t = subspace.projection(4)
    # Distance between the recovered and the true rank-4 projectors (spectral norm = sin of the
    # largest principal angle), and each direction against its planted counterpart.
    gap = torch.linalg.matrix_norm(p_t.t() @ p_t - data.basis.t() @ data.basis, ord=2)
    per_direction = (p_t * data.basis).sum(1).abs()
    print(f"planted subspace: sin(max angle)={float(gap):.4f}, |cos| per direction={per_direction}")
    assert float(gap) < 0.1  # a random 4-dim subspace of 32 would be near 1
    assert bool((per_direction > 0.99).all())
    # The top-4 variances are the planted ones (64, 36, 16, 4) plus the unit noise.
    torch.testing.assert_close(
        subspace.eigenvalues[:4],
        torch.tensor([65.0, 37.0, 17.0, 5.0], dtype=torch.float64),
        rtol=0.12,
        atol=0.0,
    )
    torch.testing.assert_close(subspace.mean, data.mean, atol=0.5, rtol=0)
    assert subspace.explained(32) == pytest.approx(1.0)
    assert 0.75 < subspace.explained(4) < 0.85


def test_sweep_ranks() -> None:
    assert sweep_ranks([8, 1, 2, 4, 256, 32, 16], 64) == [1, 2, 4, 8, 16, 32, 64]
    assert sweep_ranks([0], 10) == [10]
    with pytest.raises(ValueError, match="ranks"):
        sweep_ranks([-1], 10)
    with pytest.raises(ValueError, match="empty"):
        sweep_ranks([], 10)
