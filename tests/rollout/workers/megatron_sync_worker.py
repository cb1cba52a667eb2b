"""torchrun worker (4 processes): gather a live Megatron model to HF tensors, sync it to a server.

Usage: megatron_sync_worker.py WORKDIR. Writes WORKDIR/results.json on rank 0.

One Megatron layout at a time (TP2xPP2, then TP2 with DP2, then PP2 with DP2). At each, the
gather of four tiny models (Llama and Qwen3, tied and untied) is compared bit-exactly with the
original safetensors. At TP2xPP2 the end-to-end part runs too: a Qwen3 model (tied embeddings)
is perturbed elementwise (as an optimizer step would change it), synced to an embedded server
subprocess through the disk and the distributed paths, and the server's greedy log-probs are
compared with transformers on the same perturbation applied directly to the HF weights.
"""

import asyncio
import faulthandler
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

faulthandler.dump_traceback_later(int(os.environ.get("OPRD_TEST_HANG_S", "600")), exit=True)
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # repo root: tests.*

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

MODELS = [("llama", False), ("llama", True), ("qwen3", False), ("qwen3", True)]
E2E_MODEL = "qwen3-tied"
PROMPT = [3, 9, 27, 81, 200, 7]


def say(label: str) -> None:
    """Progress on rank 0 (the test log shows where time goes)."""
    if dist.get_rank() == 0:
        print(f"PROGRESS {time.strftime('%H:%M:%S')} {label}", flush=True)


def name_of(family: str, tied: bool) -> str:
    return f"{family}-{'tied' if tied else 'untied'}"


def perturb(tensor: torch.Tensor) -> torch.Tensor:
    """An elementwise change (so it commutes with any layout): exactly the same bits on both
    sides, whatever the sharding."""
    return torch.where(tensor > 0, tensor * 1.25, tensor * 0.8) + 0.003


def load_all(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def use_layout(tp: int, pp: int):
    from oprd_mega.parallel import ParallelLayout, init_distributed, reset_model_parallel

    reset_model_parallel()
    return init_distributed(ParallelLayout(tp=tp, pp=pp))


def build_loaded(directory: Path):
    from oprd_mega.convert.hf_io import HFCheckpointReader
    from oprd_mega.convert.mcore_io import load_hf_weights
    from oprd_mega.distill.projection import PROJECTION_ATTR
    from oprd_mega.models import build_gpt_model, load_hf_config

    args = load_hf_config(directory)
    model = build_gpt_model(args)
    load_hf_weights(model, args, HFCheckpointReader(directory))
    # A Megatron-only parameter (like the OPRD projection): never synced.
    setattr(model, PROJECTION_ATTR, torch.nn.Linear(4, 4, bias=False))
    return model, args


def compare(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> dict:
    return {
        "names_equal": sorted(got) == sorted(want),
        "count": len(got),
        "bad": [
            k
            for k in want
            if k not in got or got[k].dtype != want[k].dtype or not torch.equal(got[k], want[k])
        ],
    }


def gather_checks(work: Path, layout: str, dsts: list[int], results: dict) -> None:
    from oprd_mega.convert.gather import gather_hf_weights

    rank = dist.get_rank()
    for k, (family, tied) in enumerate(MODELS):
        name = name_of(family, tied)
        model, args = build_loaded(work / name)
        dst = dsts[k % len(dsts)]
        start = time.perf_counter()
        got = {n: t.clone() for n, t in gather_hf_weights(model, args, dst_rank=dst)}
        seconds = time.perf_counter() - start
        if rank == dst:
            out = compare(got, load_all(work / name))
            out.update(dst=dst, seconds=seconds, padded_vocab=args.padded_vocab_size)
        else:
            out = {"nonempty_on_non_dst": bool(got)}
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, out)
        results[f"{layout} {name}"] = parts
        say(f"{layout} {name} gathered")
    # include= everything: the Megatron-only parameter is refused, on every rank alike.
    try:
        list(gather_hf_weights(model, args, include=lambda n: True))
        message = None
    except ValueError as exc:
        message = str(exc)
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, message)
    results[f"{layout} include-all"] = parts


def start_server(model_dir: Path, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "oprd_mega.cli", "serve", "--model", str(model_dir)]
    return subprocess.Popen(
        [*cmd, "--port", str(port), "--seed", "0"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


async def greedy(client, url: str) -> tuple[list[int], list[float]]:
    body = {
        "input_ids": PROMPT,
        "sampling_params": {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True},
        "return_logprob": True,
    }
    answer = await client.call(url, "POST", "/generate", body)
    return answer["output_ids"], [e[0] for e in answer["meta_info"]["output_token_logprobs"]]


def hf_reference(model_dir: Path, times: int, output: list[int]) -> list[float]:
    """transformers' log-probs of ``output`` after ``times`` perturbations of the HF weights."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        for param in model.parameters():  # tied weights appear once
            for _ in range(times):
                param.copy_(perturb(param))
        logits = model(input_ids=torch.tensor([PROMPT + output])).logits[0].double()
    logprobs = torch.log_softmax(logits, -1)
    return [float(logprobs[len(PROMPT) - 1 + i, t]) for i, t in enumerate(output)]


def perturb_model(model) -> None:
    from oprd_mega.convert.mcore_io import global_parameters
    from oprd_mega.distill.projection import is_projection_param

    with torch.no_grad():
        for name, param in global_parameters(model).items():
            if not is_projection_param(name):
                param.copy_(perturb(param))


async def end_to_end(work: Path, port: int, results: dict) -> None:
    from oprd_mega.rollout.client import RolloutClient
    from oprd_mega.rollout.megatron_sync import check_model_weights, sync_model_weights
    from oprd_mega.rollout.weight_sync import DiskWeightSync, DistributedWeightSync, WeightSyncError
    from tests.torchrun_utils import free_port

    rank = dist.get_rank()
    model_dir = work / E2E_MODEL
    model, args = build_loaded(model_dir)
    url = f"http://127.0.0.1:{port}"
    out: dict = {}
    client = RolloutClient([url]) if rank == 0 else None
    disk = dist_sync = None
    if rank == 0:
        await client.wait_healthy(timeout_s=240)
        disk = DiskWeightSync(client, work / "sync", model_dir, bucket_bytes=256 * 1024)
        dist_sync = DistributedWeightSync(client, "127.0.0.1", free_port(), bucket_bytes=256 * 1024)
    try:
        say("e2e: server healthy")
        # v1 through the disk path.
        perturb_model(model)
        report = await sync_model_weights(disk, model, args, "v1")
        if rank == 0:
            ids, got = await greedy(client, url)
            want = hf_reference(model_dir, 1, ids)
            original = load_all(model_dir)
            written = load_all(work / "sync" / "weights-v1")
            out["disk"] = {
                "report": [report.tensors, report.bytes, report.buckets, report.seconds],
                "max_diff": max(abs(a - b) for a, b in zip(got, want, strict=True)),
                "weights": compare(written, {k: perturb(v) for k, v in original.items()}),
            }
        say("e2e: disk sync checked")
        # v2 through the distributed path (weights perturbed twice now).
        perturb_model(model)
        report = await sync_model_weights(dist_sync, model, args, "v2")
        if rank == 0:
            ids, got = await greedy(client, url)
            want = hf_reference(model_dir, 2, ids)
            out["distributed"] = {
                "report": [report.tensors, report.bytes, report.buckets, report.seconds],
                "max_diff": max(abs(a - b) for a, b in zip(got, want, strict=True)),
            }
        say("e2e: distributed sync checked")
        # A skipped sync: the check fails on every rank, first on the version...
        perturb_model(model)
        errors = []
        try:
            await check_model_weights(dist_sync, model, "v3")
        except WeightSyncError as exc:
            errors.append(str(exc))
        # ...and, when a server claims the version without the weights, on the probe.
        if rank == 0:
            await client.call(url, "POST", "/update_weight_version", {"new_version": "v3"})
        dist.barrier()
        try:
            await check_model_weights(dist_sync, model, "v3")
        except WeightSyncError as exc:
            errors.append(str(exc))
        out["skipped_errors"] = errors
        # Syncing v3 for real makes the check pass again.
        await sync_model_weights(dist_sync, model, args, "v3b")
        out["resynced"] = True
    finally:
        if rank == 0:
            await dist_sync.close()
            await client.aclose()
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, out)
    results["e2e"] = parts


def main() -> None:
    from oprd_mega.parallel import destroy_distributed
    from tests.torchrun_utils import free_port
    from tools.tiny_hf_models import make_tiny_model

    work = Path(sys.argv[1])
    use_layout(2, 2)
    rank = dist.get_rank()
    server = None
    port = free_port() if rank == 0 else 0
    if rank == 0:
        for k, (family, tied) in enumerate(MODELS):
            make_tiny_model(family, work / name_of(family, tied), tied=tied, seed=k + 1)
        server = start_server(work / E2E_MODEL, port)
    dist.barrier()
    results: dict = {}
    timings: dict = {}
    try:
        start = time.perf_counter()
        gather_checks(work, "TP2PP2", [0, 3], results)
        timings["TP2PP2 gather"] = time.perf_counter() - start
        start = time.perf_counter()
        asyncio.run(end_to_end(work, port, results))
        timings["TP2PP2 e2e"] = time.perf_counter() - start
        for tp, pp, dsts in ((2, 1, [0, 3]), (1, 2, [0, 3])):
            start = time.perf_counter()
            use_layout(tp, pp)
            gather_checks(work, f"TP{tp}PP{pp}", dsts, results)
            timings[f"TP{tp}PP{pp} gather"] = time.perf_counter() - start
    finally:
        if server is not None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(timeout=10)
    results["timings"] = timings
    if rank == 0:
        (work / "results.json").write_text(json.dumps(results, indent=1))
    destroy_distributed()


if __name__ == "__main__":
    main()
