"""One rank of a weight-update group, made by SGLang's or the project's function.

Usage: group_worker.py IMPL RANK WORLD PORT GROUP_NAME, IMPL ``sglang`` (SGLang's own
``init_custom_process_group`` from the pinned wheel) or ``oprd`` (the project's). Rank 0
broadcasts a float64 and a bfloat16 tensor, then the last rank broadcasts one back; every rank
prints what it holds afterwards as one JSON line.
"""

import faulthandler
import json
import os
import sys
from datetime import timedelta
from pathlib import Path

faulthandler.dump_traceback_later(int(os.environ.get("OPRD_TEST_HANG_S", "120")), exit=True)
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # repo root: tests.*

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from oprd_mega.rollout.process_group import init_custom_process_group  # noqa: E402
from tests.rollout.sglang_source import sglang_init_custom_process_group  # noqa: E402

TIMEOUT_S = 60.0


def main() -> None:
    impl, rank, world, port, group_name = sys.argv[1:6]
    rank, world = int(rank), int(world)
    if impl == "sglang":
        group = sglang_init_custom_process_group()(
            backend="gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            timeout=timedelta(seconds=TIMEOUT_S),
            world_size=world,
            rank=rank,
            group_name=group_name,
        )
    else:
        group = init_custom_process_group(
            "127.0.0.1", int(port), rank, world, group_name, "gloo", TIMEOUT_S
        )
    forward = torch.arange(12, dtype=torch.float64) * 0.5 + 1 if rank == 0 else torch.zeros(12)
    forward = forward.to(torch.float64)
    half = torch.linspace(-2, 2, 7).to(torch.bfloat16) if rank == 0 else torch.zeros(7)
    half = half.to(torch.bfloat16)
    back = torch.full((3,), 7.25) if rank == world - 1 else torch.zeros(3)
    dist.broadcast(forward, src=0, group=group)
    dist.broadcast(half, src=0, group=group)
    dist.broadcast(back, src=world - 1, group=group)
    print(
        json.dumps(
            {
                "rank": rank,
                "forward": forward.tolist(),
                "half": half.float().tolist(),
                "back": back.tolist(),
            }
        ),
        flush=True,
    )
    dist.destroy_process_group(group)


if __name__ == "__main__":
    main()
