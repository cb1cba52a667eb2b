"""Time the Megatron weight sync (gather + transport) per MiB: run under torchrun, 4 processes.

Usage: torchrun --nproc-per-node 4 tools/bench_megatron_sync.py WORKDIR [TP PP HIDDEN LAYERS]
Rank 0 prints one line per sync: transport, MiB, seconds, ms per MiB, gather-only seconds.
"""

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch.distributed as dist

from oprd_mega.convert.gather import gather_hf_weights
from oprd_mega.convert.hf_io import HFCheckpointReader
from oprd_mega.convert.mcore_io import load_hf_weights
from oprd_mega.models import build_gpt_model, load_hf_config
from oprd_mega.parallel import ParallelLayout, init_distributed
from oprd_mega.parallel.distributed import free_port
from oprd_mega.rollout.client import RolloutClient
from oprd_mega.rollout.megatron_sync import sync_model_weights
from oprd_mega.rollout.weight_sync import DiskWeightSync, DistributedWeightSync
from tools.tiny_hf_models import make_tiny_model


def start_server(model_dir: Path, port: int) -> subprocess.Popen:
    """The embedded rollout server on ``port``, in its own session (killed as a group)."""
    command = [sys.executable, "-m", "oprd_mega.cli", "serve", "--model", str(model_dir)]
    return subprocess.Popen(
        [*command, "--port", str(port), "--seed", "0"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


async def bench(work: Path, port: int, model_dir: Path) -> None:
    rank = dist.get_rank()
    args = load_hf_config(model_dir)
    model = build_gpt_model(args)
    load_hf_weights(model, args, HFCheckpointReader(model_dir))
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
    work = Path(sys.argv[1])
    tp, pp, hidden, layers = (int(x) for x in (sys.argv[2:] or ["2", "2", "512", "8"]))
    init_distributed(ParallelLayout(tp=tp, pp=pp))
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
        server = start_server(model_dir, port)
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
