"""The order in which a run reads its prompts: seeded epochs, resumable at any position."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Generic, TypeVar

import torch

T = TypeVar("T")


class PromptStream(Generic[T]):
    """Endless epochs over ``items``, each a fresh permutation seeded by ``(seed, epoch)``
    (or the file order without ``shuffle``). The position is two integers, so a checkpoint
    restores the exact next batch."""

    def __init__(self, items: Sequence[T], seed: int, shuffle: bool = True) -> None:
        if not items:
            raise ValueError("the prompt stream has no prompts")
        self.items = list(items)
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.offset = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.items)))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.items), generator=generator).tolist()

    def take(self, count: int) -> list[T]:
        """The next ``count`` items; an epoch boundary continues into a new permutation."""
        out: list[T] = []
        while len(out) < count:
            if self.offset == len(self._order):
                self.epoch += 1
                self.offset = 0
                self._order = self._permutation(self.epoch)
            end = min(len(self._order), self.offset + count - len(out))
            out.extend(self.items[i] for i in self._order[self.offset : end])
            self.offset = end
        return out

    def state_dict(self) -> dict[str, Any]:
        """The position: epoch and offset into that epoch's order."""
        return {"epoch": self.epoch, "offset": self.offset, "size": len(self.items)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position (the prompt file must have the same length)."""
        if state["size"] != len(self.items):
            raise ValueError(
                f"data.path: the checkpoint was taken with {state['size']} prompts, the file "
                f"now has {len(self.items)}; the data position cannot be restored"
            )
        self.epoch = int(state["epoch"])
        self.offset = int(state["offset"])
        self._order = self._permutation(self.epoch)
