"""Time the Megatron weight sync (gather + transport) per MiB: run under torchrun, 4 processes.

Usage: torchrun --nproc-per-node 4 tools/bench_megatron_sync.py WORKDIR [TP PP HIDDEN LAYERS]
Rank 0 prints one line per sync: transport, MiB, seconds, ms per MiB, gather-only seconds.
"""

import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch.distributed as dist

from tests.rollout.workers import megatron_sync_worker as w


async def bench(work: Path, port: int, model_dir: Path) -> None:
    from oprd_mega.convert.gather import gather_hf_weights
    from oprd_mega.rollout.client import RolloutClient
    from oprd_mega.rollout.megatron_sync import sync_model_weights
    from oprd_mega.rollout.weight_sync import DiskWeightSync, DistributedWeightSync
    from tests.torchrun_utils import free_port

    rank = dist.get_rank()
    model, args = w.build_loaded(model_dir)
    client = disk = dsync = None
    if rank == 0:
        client = RolloutClient([f"http://127.0.0.1:{port}"])
        await client.wait_healthy(timeout_s=300)
        disk = DiskWeightSync(client, work / "sync", model_dir, bucket_bytes=32 * 2**20)
        dsync = DistributedWeightSync(client, "127.0.0.1", free_port(), bucket_bytes=32 * 2**20)
    for step in range(3):
        start = time.perf_counter()
        for _ in gather_hf_weights(model, args):
            pass
        gather_s = time.perf_counter() - start
        for label, sync in (("disk", disk), ("distributed", dsync)):
            report = await sync_model_weights(sync, model, args, f"{label}-{step}", probe=False)
            if rank == 0:
                mib = report.bytes / 2**20
                print(
                    f"BENCH {label} {mib:.1f} MiB {report.seconds:.3f} s "
                    f"{1000 * report.seconds_per_mib:.2f} ms/MiB gather-only {gather_s:.3f} s",
                    flush=True,
                )
    if rank == 0:
        await dsync.close()
        await client.aclose()


def main() -> None:
    import os
    import signal

    from tests.tiny_hf_models import make_tiny_model
    from tests.torchrun_utils import free_port

    work = Path(sys.argv[1])
    tp, pp, hidden, layers = (int(x) for x in (sys.argv[2:] or ["2", "2", "512", "8"]))
    w.use_layout(tp, pp)
    model_dir = work / f"llama-h{hidden}-l{layers}"
    port, server = free_port(), None
    if dist.get_rank() == 0:
        make_tiny_model(
            "llama",
            model_dir,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=hidden // 8,
            vocab_size=4096,
        )
        server = w.start_server(model_dir, port)
    dist.barrier()
    try:
        asyncio.run(bench(work, port, model_dir))
    finally:
        if server is not None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
