"""Under torchrun (2 ranks): switching layouts repeatedly must not accumulate process groups."""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import torch.distributed as dist
from megatron.core import parallel_state

from oprd_mega.parallel import (
    ParallelLayout,
    destroy_distributed,
    init_distributed,
    reset_model_parallel,
)


def threads() -> int:
    return len(os.listdir("/proc/self/task"))


def main() -> None:
    counts = []
    for round_ in range(6):
        layout = ParallelLayout(tp=2) if round_ % 2 == 0 else ParallelLayout(pp=2)
        init_distributed(layout)
        dist.barrier(group=parallel_state.get_model_parallel_group())
        counts.append(threads())
        reset_model_parallel()
    # Without the reset each initialisation adds dozens of gloo threads for good.
    assert counts[-1] <= counts[1] + 4, counts
    destroy_distributed()
    print(f"reset ok {counts}", flush=True)


if __name__ == "__main__":
    main()
