"""Measure the embedded rollout server: generation throughput and weight-sync time per MiB.

    python tools/bench_rollout.py [--hidden 64 --layers 2 --prompts 64 --n 4 --new-tokens 64]

Makes a random Llama of the given size (with a tiny BPE tokenizer) in a temporary directory,
starts ``oprd-mega serve`` on it in a subprocess on 127.0.0.1, samples ``prompts x n`` responses
through the client, then syncs new random weights by disk and by distributed broadcast (gloo)
and checks each sync with the probe. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from oprd_mega.rollout.client import ClientConfig, RolloutClient  # noqa: E402
from oprd_mega.rollout.weight_sync import DiskWeightSync, DistributedWeightSync  # noqa: E402
from tools.tiny_hf import make_tiny_model_dir  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def bench(args: argparse.Namespace, model_dir: Path, new_dir: Path, url: str) -> dict:
    from transformers import AutoModelForCausalLM

    result: dict = {}
    config = ClientConfig(max_concurrency_per_server=args.concurrency)
    async with RolloutClient([url], config) as client:
        await client.wait_healthy(timeout_s=300)
        prompts = [[(7 * i + k) % 250 + 5 for k in range(16)] for i in range(args.prompts)]
        params = {"max_new_tokens": args.new_tokens, "n": args.n, "ignore_eos": True}
        await client.generate_groups(prompts, dict(params, max_new_tokens=4))  # warm-up
        runs = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            groups = await client.generate_groups(prompts, params)
            elapsed = time.perf_counter() - start
            tokens = sum(s.response_length for g in groups for s in g)
            runs.append(tokens / elapsed)
        result["generation"] = {
            "samples": sum(len(g) for g in groups),
            "new_tokens_per_run": tokens,
            "tokens_per_s_runs": [round(r, 1) for r in runs],
            "tokens_per_s_best": round(max(runs), 1),
        }
        new = AutoModelForCausalLM.from_pretrained(str(new_dir), dtype=torch.float32).eval()
        forward = lambda ids: new(input_ids=torch.tensor([list(ids)])).logits[0]
        state = new.state_dict()
        with tempfile.TemporaryDirectory() as sync_dir:
            disk = DiskWeightSync(client, sync_dir, model_dir, bucket_bytes=args.bucket_mib * 2**20)
            report = await disk.sync(state.items(), "disk-1")
            await disk.check("disk-1", forward)
        result["disk_sync"] = _report(report)
        dist_sync = DistributedWeightSync(
            client, "127.0.0.1", free_port(), bucket_bytes=args.bucket_mib * 2**20
        )
        try:
            await dist_sync.connect()
            report = await dist_sync.sync(state.items(), "dist-1")
            await dist_sync.check("dist-1", forward)
            result["distributed_sync"] = _report(report)
        finally:
            await dist_sync.close()
    return result


def _report(report) -> dict:
    return {
        "mib": round(report.bytes / 2**20, 2),
        "buckets": report.buckets,
        "seconds": round(report.seconds, 3),
        "seconds_per_mib": round(report.seconds_per_mib, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--bucket-mib", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3, help="timed generation runs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_tiny_model_dir(
            Path(tmp) / "a", seed=0, layers=args.layers, hidden=args.hidden
        )
        new_dir = make_tiny_model_dir(
            Path(tmp) / "b", seed=1, layers=args.layers, hidden=args.hidden
        )
        port = free_port()
        cmd = [sys.executable, "-m", "oprd_mega.cli", "serve", "--model", str(model_dir),
               "--port", str(port), "--max-batch-size", str(args.max_batch_size)]  # fmt: skip
        server = subprocess.Popen(cmd, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            result = asyncio.run(bench(args, model_dir, new_dir, f"http://127.0.0.1:{port}"))
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
    result["model"] = {
        "hidden": args.hidden,
        "layers": args.layers,
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
