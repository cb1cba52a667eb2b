"""Principal subspace of teacher states: P_T [r, d_T] and mu_T [d_T] for a sweep of ranks.

One float64 ``eigh`` of the covariance serves every rank: the rank-r projection is the first r
rows of the descending eigenvector matrix. Each eigenvector's sign is fixed so that its
largest-magnitude component (first such index on ties) is positive, making P_T reproducible.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from .covariance import StreamingCovariance


@dataclass(frozen=True)
class Subspace:
    """Eigenvalues [d] (descending), eigenvectors as rows [d, d] and the mean [d], float64."""

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    mean: torch.Tensor
    rows: int

    @property
    def dim(self) -> int:
        """d_T."""
        return int(self.mean.numel())

    def projection(self, rank: int) -> torch.Tensor:
        """P_T [rank, d_T] (float64): the top-``rank`` principal directions as rows."""
        if not 1 <= rank <= self.dim:
            raise ValueError(f"rank: {rank} is outside 1..{self.dim} (d_T)")
        return self.eigenvectors[:rank]

    def project(self, hidden: torch.Tensor, rank: int) -> torch.Tensor:
        """P_T (h_T - mu_T): [tokens, d_T] -> [tokens, rank] in float64."""
        return (hidden.to(torch.float64) - self.mean) @ self.projection(rank).t()

    def explained(self, rank: int) -> float:
        """Fraction of the total variance in the top ``rank`` directions."""
        total = float(self.eigenvalues.clamp_min(0).sum())
        return float(self.eigenvalues[:rank].clamp_min(0).sum()) / total if total > 0 else 0.0


def fix_signs(vectors: torch.Tensor) -> torch.Tensor:
    """Flip rows [k, d] so each row's largest-magnitude entry (first on ties) is positive."""
    pivot = vectors.abs().argmax(dim=1)
    signs = torch.sign(vectors.gather(1, pivot[:, None]))
    signs[signs == 0] = 1
    return vectors * signs


def principal_subspace(stream: StreamingCovariance) -> Subspace:
    """Eigendecompose the stream's covariance once (float64), descending eigenvalues."""
    covariance = stream.covariance()
    values, vectors = torch.linalg.eigh(covariance)  # ascending, vectors as columns
    order = torch.arange(values.numel() - 1, -1, -1)
    assert stream.mean is not None
    return Subspace(
        eigenvalues=values[order].contiguous(),
        eigenvectors=fix_signs(vectors[:, order].t().contiguous()),
        mean=stream.mean.clone(),
        rows=stream.count,
    )


def sweep_ranks(ranks: Iterable[int], dim: int) -> list[int]:
    """The sweep's ranks, ascending and unique; ``0`` or any rank above ``dim`` means full."""
    out = set()
    for rank in ranks:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise ValueError(f"ranks: {rank!r} is not a non-negative integer")
        out.add(dim if rank == 0 or rank > dim else rank)
    if not out:
        raise ValueError("ranks: the sweep is empty")
    return sorted(out)
