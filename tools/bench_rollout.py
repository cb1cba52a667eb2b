"""Measure the embedded rollout server: generation throughput and weight-sync time per MiB, or
one-batch-at-a-time against continuous batching.

    python tools/bench_rollout.py [--hidden 64 --layers 2 --prompts 64 --n 4 --new-tokens 64]
    python tools/bench_rollout.py --batching [--requests 64 --rate 16 --hidden 256 --layers 4]

Makes a random Llama of the given size (with a tiny BPE tokenizer) in a temporary directory,
starts ``oprd-mega serve`` on it in a subprocess on 127.0.0.1, samples ``prompts x n`` responses
through the client, then syncs new random weights by disk and by distributed broadcast (gloo)
and checks each sync with the probe. Prints one JSON object.

``--batching`` instead runs one fixed workload through the engine twice, each mode in a fresh
subprocess: ``--requests`` greedy requests arriving as a Poisson process of ``--rate`` per
second (seeded), prompts of 16-64 tokens, a long-tailed mix of response lengths (most 8-32
tokens, one in five 128-256). It reports tokens/s over the whole run, time to first token and
latency (p50, p99) per mode, and whether the two modes gave the same tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from oprd_mega.parallel.distributed import free_port  # noqa: E402
from oprd_mega.rollout.client import ClientConfig, RolloutClient  # noqa: E402
from oprd_mega.rollout.engine import GenerationEngine, SequenceJob  # noqa: E402
from oprd_mega.rollout.sampling import SamplingConfig  # noqa: E402
from oprd_mega.rollout.weight_sync import DiskWeightSync, DistributedWeightSync  # noqa: E402
from tools.tiny_hf import make_tiny_model_dir  # noqa: E402


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


def batching_workload(requests: int, rate: float, seed: int) -> list[tuple[float, list[int], int]]:
    """(arrival s, prompt, new tokens) per request: Poisson arrivals, a long-tailed length mix."""
    rng = random.Random(seed)
    workload, arrival = [], 0.0
    for _ in range(requests):
        arrival += rng.expovariate(rate)
        prompt = [rng.randrange(5, 300) for _ in range(rng.randint(16, 64))]
        tokens = rng.randint(128, 256) if rng.random() < 0.2 else rng.randint(8, 32)
        workload.append((arrival, prompt, tokens))
    return workload


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_batching_mode(args: argparse.Namespace) -> dict:
    """One mode over the workload, in this process: the engine without HTTP, so that the
    figures are the scheduler's (time to first token is the engine's own record)."""
    engine = GenerationEngine(
        args.model_dir,
        max_batch_size=args.max_batch_size,
        seed=0,
        continuous=args.mode == "continuous",
    )
    greedy = dict(temperature=0.0, ignore_eos=True)
    warm = SequenceJob(input_ids=[5, 6, 7], config=SamplingConfig(max_new_tokens=4, **greedy))
    engine.submit([warm])[0].result()
    jobs: list[SequenceJob] = []
    began = time.perf_counter()
    for arrival, prompt, tokens in batching_workload(args.requests, args.rate, args.seed):
        time.sleep(max(0.0, began + arrival - time.perf_counter()))
        job = SequenceJob(input_ids=prompt, config=SamplingConfig(max_new_tokens=tokens, **greedy))
        engine.submit([job])
        jobs.append(job)
    answers = [job.future.result() for job in jobs]
    latency = [a["meta_info"]["e2e_latency"] for a in answers]
    ended = max(job.submitted + t for job, t in zip(jobs, latency, strict=True))
    engine.close()
    ttft = [job.first_token_at - job.submitted for job in jobs]
    tokens = sum(len(a["output_ids"]) for a in answers)
    return {
        "mode": args.mode,
        "new_tokens": tokens,
        "seconds": round(ended - began, 3),
        "tokens_per_s": round(tokens / (ended - began), 1),
        "ttft_p50_s": round(_percentile(ttft, 0.5), 4),
        "ttft_p99_s": round(_percentile(ttft, 0.99), 4),
        "latency_p50_s": round(_percentile(latency, 0.5), 4),
        "latency_p99_s": round(_percentile(latency, 0.99), 4),
        "max_batch": engine.stats["max_batch"],
        "prefills": engine.stats["batches"],
        "outputs": [a["output_ids"] for a in answers],
    }


def compare_batching(args: argparse.Namespace) -> dict:
    """Both modes on the same model and workload, each in a fresh subprocess."""
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_tiny_model_dir(Path(tmp), seed=0, layers=args.layers, hidden=args.hidden)
        for mode in ("one-batch", "continuous"):
            cmd = [sys.executable, __file__, "--batching-worker", mode,
                   "--model-dir", str(model_dir), "--requests", str(args.requests),
                   "--rate", str(args.rate), "--seed", str(args.seed),
                   "--max-batch-size", str(args.max_batch_size)]  # fmt: skip
            done = subprocess.run(cmd, check=True, capture_output=True, text=True)
            results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    outputs = [results[mode].pop("outputs") for mode in results]
    return {
        "batching": results,
        "same_tokens_in_both_modes": outputs[0] == outputs[1],
        "continuous_over_one_batch": {
            key: round(results["continuous"][key] / results["one-batch"][key], 3)
            for key in (
                "tokens_per_s",
                "ttft_p50_s",
                "ttft_p99_s",
                "latency_p50_s",
                "latency_p99_s",
            )
        },
        "workload": {
            "requests": args.requests,
            "rate_per_s": args.rate,
            "seed": args.seed,
            "max_batch_size": args.max_batch_size,
        },
        "model": {"hidden": args.hidden, "layers": args.layers, "threads": torch.get_num_threads()},
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
    parser.add_argument(
        "--batching", action="store_true", help="one batch at a time against continuous batching"
    )
    parser.add_argument("--requests", type=int, default=64, help="--batching: requests")
    parser.add_argument("--rate", type=float, default=16.0, help="--batching: arrivals per s")
    parser.add_argument("--seed", type=int, default=0, help="--batching: workload seed")
    parser.add_argument("--batching-worker", dest="mode", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode is not None:  # one mode of --batching, in its own process
        print(json.dumps(run_batching_mode(args)))
        return
    if args.batching:
        print(json.dumps(compare_batching(args), indent=2))
        return
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
