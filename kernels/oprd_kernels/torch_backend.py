"""Chunk primitives in plain PyTorch: the CPU path and the fallback where Triton is missing."""

from __future__ import annotations

import torch

from .engine import StatisticsChunks
from .statistics import NUM_STATS, STAT_DD, STAT_PP, STAT_PT, STAT_TT


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[rows]`` dot products of matching rows, without a [rows, d] temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


class TorchChunkBackend(StatisticsChunks):
    """Projection in the inputs' dtype, statistics and gradient in float32, per chunk of rows."""

    name = "torch"
    # Masked rows are gathered away so they cost no FLOPs (a host sync, free on CPU).
    compacts_masked_rows = True

    def workspace_bytes_per_row(self, d_s: int, d_t: int, element_size: int) -> int:
        del element_size  # the chunk is processed in float32 whatever the inputs' dtype
        # float32 projection, float32 target copy and one [rows, d_t] temporary, plus the
        # gathered student rows and their gradient.
        return 4 * (3 * d_t + 2 * d_s)

    def project_with_statistics(
        self,
        student: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        target: torch.Tensor,
        active: torch.Tensor | None,
        keep_projection: bool,
        normalize: bool,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``(projection [rows, d_t] float32 or None, stats [4, rows] float32)`` of one chunk.

        Only the statistics the loss needs are filled: ``pp, pt, tt`` when ``normalize``,
        else ``dd`` (computed from the difference itself, which does not cancel).
        """
        del active  # rows are already compacted
        if weight is None:
            projection = student.to(torch.float32, copy=True)
        else:
            projection = (student @ weight.t()).to(torch.float32)
        if bias is not None:
            projection += bias.to(torch.float32)
        target32 = target.to(torch.float32)
        stats = projection.new_zeros(NUM_STATS, projection.shape[0])
        if normalize:
            stats[STAT_PP] = _row_dot(projection, projection)
            stats[STAT_PT] = _row_dot(projection, target32)
            stats[STAT_TT] = _row_dot(target32, target32)
        else:
            difference = projection - target32
            stats[STAT_DD] = _row_dot(difference, difference)
            del difference
        return (projection if keep_projection else None), stats

    def projection_to_gradient(
        self,
        projection: torch.Tensor,
        target: torch.Tensor,
        alpha: torch.Tensor,
        beta: torch.Tensor,
    ) -> torch.Tensor:
        """Overwrite ``projection`` with ``alpha * projection + beta * target`` and return it."""
        projection.mul_(alpha.unsqueeze(1))
        projection.addcmul_(target.to(torch.float32), beta.unsqueeze(1))
        return projection
