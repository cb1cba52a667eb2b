"""Processes for the lifetime kill tests; each prints ``PIDS <json>`` once its children are up,
then sleeps until it is killed.

Usage: lifetime_worker.py rank | server MODEL_DIR PORT LOG_DIR
"""

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root

import oprd_mega  # noqa: F401  (the package a spawned child re-imports)


def report(**pids: object) -> None:
    print("PIDS " + json.dumps(pids), flush=True)
    time.sleep(600)


def main() -> None:
    mode = sys.argv[1]
    if mode == "rank":  # under torchrun
        from oprd_mega.parallel import init_distributed

        init_distributed()
        report(rank=os.getpid())
    elif mode == "server":
        from oprd_mega.rollout.servers import LaunchConfig, ServerGroup

        config = LaunchConfig(
            model_path=sys.argv[2],
            backend="embedded",
            base_port=int(sys.argv[3]),
            log_dir=sys.argv[4],
            health_timeout_s=240,
        )
        group = ServerGroup.launch(config)
        report(servers=[p.pid for p in group.processes])


if __name__ == "__main__":
    main()
