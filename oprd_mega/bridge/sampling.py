"""Which token rows feed the bridge statistics: a uniform subsample of at most ``max_rows``.

The rollouts are known before any hidden state is computed, so the number of supervised token
rows is known too; the rows are chosen up front (uniformly, without replacement, seeded) and
each batch then keeps only its chosen rows, so no more than one batch of states is ever held.
Rows are numbered globally in stream order, which makes the choice independent of how the
stream is split into batches or across data-parallel ranks.
"""

from __future__ import annotations

import torch

DEFAULT_MAX_ROWS = 16_384


def select_rows(total_rows: int, max_rows: int = DEFAULT_MAX_ROWS, seed: int = 0) -> torch.Tensor:
    """Ascending global row indices [min(total_rows, max_rows)] (int64), uniform and seeded."""
    if total_rows < 0:
        raise ValueError(f"select_rows: total_rows must be >= 0, got {total_rows}")
    if max_rows < 1:
        raise ValueError(f"select_rows: max_rows must be positive, got {max_rows}")
    if total_rows <= max_rows:
        return torch.arange(total_rows, dtype=torch.int64)
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(total_rows, generator=generator)[:max_rows].sort().values


class RowSelection:
    """Walks a stream of batches and says which rows of each batch are selected.

    ``start``: the global index of this stream's first row (a data-parallel rank's offset).
    """

    def __init__(self, selected: torch.Tensor, start: int = 0) -> None:
        if selected.dim() != 1:
            raise ValueError(f"RowSelection: selected must be 1-D, got {list(selected.shape)}")
        self.selected = selected.to(torch.int64)
        if self.selected.numel() > 1 and bool((self.selected[1:] <= self.selected[:-1]).any()):
            raise ValueError("RowSelection: selected indices must be strictly ascending")
        self.position = start

    def take(self, batch_rows: int) -> torch.Tensor:
        """Local indices [k] of the selected rows among the next ``batch_rows`` rows."""
        if batch_rows < 0:
            raise ValueError(f"RowSelection.take: batch_rows must be >= 0, got {batch_rows}")
        lo = int(torch.searchsorted(self.selected, self.position))
        hi = int(torch.searchsorted(self.selected, self.position + batch_rows))
        local = self.selected[lo:hi] - self.position
        self.position += batch_rows
        return local
