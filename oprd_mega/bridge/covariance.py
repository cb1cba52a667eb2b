"""Streaming mean and covariance of hidden states, accumulated in float64.

Each batch contributes its own mean and centred scatter, merged with Chan et al.'s pairwise
update, so no row is kept after its batch. Data-parallel ranks combine their streams by an
all-reduce of scatter sums taken about one shared shift (rank 0's mean), which is exact and
stays well conditioned because the shift is close to every rank's mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StreamingCovariance:
    """Row count, mean [d] and centred scatter M2 [d, d] of the rows seen so far (float64)."""

    dim: int
    count: int = 0
    mean: torch.Tensor | None = None
    scatter: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.dim < 1:
            raise ValueError(f"StreamingCovariance.dim: must be positive, got {self.dim}")
        if self.mean is None:
            self.mean = torch.zeros(self.dim, dtype=torch.float64)
        if self.scatter is None:
            self.scatter = torch.zeros(self.dim, self.dim, dtype=torch.float64)

    def update(self, rows: torch.Tensor) -> StreamingCovariance:
        """Add rows [tokens, dim] (any float dtype and device; accumulated on CPU in float64)."""
        if rows.dim() != 2 or rows.shape[1] != self.dim:
            raise ValueError(
                f"StreamingCovariance.update: rows must be [tokens, {self.dim}], "
                f"got {list(rows.shape)}"
            )
        if rows.shape[0] == 0:
            return self
        rows = rows.detach().to("cpu", torch.float64)
        batch_mean = rows.mean(dim=0)
        centred = rows - batch_mean
        batch = StreamingCovariance(self.dim, rows.shape[0], batch_mean, centred.t() @ centred)
        return self.merge_(batch)

    def merge_(self, other: StreamingCovariance) -> StreamingCovariance:
        """Fold ``other`` into this stream in place (Chan's pairwise merge); returns self."""
        if other.dim != self.dim:
            raise ValueError(f"StreamingCovariance.merge: dim {other.dim} != {self.dim}")
        if other.count == 0:
            return self
        assert self.mean is not None and self.scatter is not None
        assert other.mean is not None and other.scatter is not None
        total = self.count + other.count
        delta = other.mean - self.mean
        weight = self.count * other.count / total
        self.scatter = self.scatter + other.scatter + weight * torch.outer(delta, delta)
        self.mean = self.mean + delta * (other.count / total)
        self.count = total
        return self

    def merged(self, other: StreamingCovariance) -> StreamingCovariance:
        """A new stream holding both streams' rows."""
        return self.copy().merge_(other)

    def copy(self) -> StreamingCovariance:
        """An independent copy."""
        assert self.mean is not None and self.scatter is not None
        return StreamingCovariance(self.dim, self.count, self.mean.clone(), self.scatter.clone())

    def covariance(self, unbiased: bool = False) -> torch.Tensor:
        """Covariance [dim, dim] in float64 (divided by n, or n - 1 when ``unbiased``)."""
        denominator = self.count - 1 if unbiased else self.count
        if denominator < 1:
            raise ValueError(f"StreamingCovariance: {self.count} row(s) give no covariance")
        assert self.scatter is not None
        return self.scatter / denominator

    def shifted_sums(self, shift: torch.Tensor) -> torch.Tensor:
        """[1 + dim + dim * dim] float64: n, sum(x - c), sum (x - c)(x - c)^T about ``shift`` c.

        These add across ranks; :meth:`from_shifted_sums` turns their sum back into a stream.
        """
        assert self.mean is not None and self.scatter is not None
        offset = self.mean - shift.to(torch.float64)
        first = self.count * offset
        second = self.scatter + self.count * torch.outer(offset, offset)
        count = torch.tensor([float(self.count)], dtype=torch.float64)
        return torch.cat([count, first, second.reshape(-1)])

    @classmethod
    def from_shifted_sums(cls, sums: torch.Tensor, shift: torch.Tensor) -> StreamingCovariance:
        """The stream whose :meth:`shifted_sums` about ``shift`` are ``sums``."""
        dim = shift.numel()
        if sums.numel() != 1 + dim + dim * dim:
            raise ValueError(
                f"StreamingCovariance.from_shifted_sums: {sums.numel()} values do not fit dim {dim}"
            )
        sums = sums.to("cpu", torch.float64)
        count = round(float(sums[0]))
        if count == 0:
            return cls(dim)
        first = sums[1 : 1 + dim]
        second = sums[1 + dim :].reshape(dim, dim)
        offset = first / count
        scatter = second - count * torch.outer(offset, offset)
        return cls(dim, count, shift.to("cpu", torch.float64) + offset, scatter)


def all_reduce_covariance(
    stream: StreamingCovariance, group: torch.distributed.ProcessGroup | None = None
) -> StreamingCovariance:
    """The stream of all ranks' rows in ``group``, returned on every rank (a collective).

    The shift is the mean of the group's first rank (broadcast), so the summed scatter stays
    centred near the data. Tensors travel on CUDA under NCCL, on CPU otherwise.
    """
    import torch.distributed as dist

    device = torch.device("cpu")
    if dist.get_backend(group) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    assert stream.mean is not None
    shift = stream.mean.to(device).clone()
    source = dist.get_global_rank(group, 0) if group is not None else 0
    dist.broadcast(shift, src=source, group=group)
    sums = stream.shifted_sums(shift.cpu()).to(device)
    dist.all_reduce(sums, group=group)
    return StreamingCovariance.from_shifted_sums(sums, shift.cpu())
