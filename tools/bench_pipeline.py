#!/usr/bin/env python
"""End-to-end step time of the trainer with its rollouts ahead (``rollout.max_staleness`` 1) and
in turn (0), side by side in one run, at several balances of rollout time to train time; and
with a long tail of response lengths, with and without partial rollouts (``rollout.partial``,
cut by time or by tokens).

    python tools/bench_pipeline.py [--balances 0.5,1,2 --steps 10 --prompts 16]
    python tools/bench_pipeline.py --partial-only

The servers' generation takes a set time and leaves the CPU free, as servers on other GPUs
would: the embedded server sleeps ``--decode-step-delay`` seconds per decoding step
(``oprd-mega serve --decode-step-delay``), on a tiny random student (2 layers) whose own compute
is small, while a deep teacher (``--teacher-layers``) makes the trainer's side heavy.
First a synchronous run without delay measures the trainer's side of a step (T: everything but
waiting for rollouts: schedule, teacher, student, optimizer, weight sync) and the rollout time
the model itself takes; then, per balance B, the delay that makes the rollout time about B x T
is set and the same config trains at max_staleness 0 and 1. Each run is one
``torch.distributed.run`` launch (2 processes, TP2, gloo) of ``oprd_mega.train``; the figures
are means over its steps but the first two and the last, from its metrics.jsonl (``time/wall``: one
step's wall time, ``time/rollout`` + ``time/rollout_settle``: the trainer waiting for rollouts,
``time/server_idle``: no request in flight). The last lines are
``ratio staleness1/staleness0 balance=B step_time=X``.

The long-tail part: responses end at any of a set of stop tokens (``--stop-fraction`` of the
vocabulary), so most are short and a few run to ``max_new_tokens``; at max_staleness 1 it
compares partial rollouts off, cut by time (``rollout.partial``) and cut by tokens
(``rollout.partial_chunk_tokens``, each of ``--tail-chunks``): step time, trainer wait, server
idle, lengths, continued and restarted responses.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from oprd_mega.parallel.distributed import free_port  # noqa: E402
from oprd_mega.train.metrics import read_metrics  # noqa: E402
from tools.tiny_hf import make_tiny_model_dir  # noqa: E402


def make_task(root: Path, args: argparse.Namespace) -> Path:
    make_tiny_model_dir(root / "student", seed=0, layers=2, hidden=args.hidden)
    make_tiny_model_dir(root / "teacher", seed=1, layers=args.teacher_layers, hidden=args.hidden)
    rng = random.Random(0)
    with (root / "train.jsonl").open("w") as handle:
        for i in range(512):
            words = " ".join(
                rng.choice(["fox", "dog", "cat", "sun", "sky"]) for _ in range(args.prompt_words)
            )
            handle.write(json.dumps({"prompt": f"{i} {words}"}) + "\n")
    return root


def config(task: Path, run: Path, args: argparse.Namespace, delay: float, **over: Any) -> Path:
    sampling: dict[str, Any] = {
        "n": 2,
        "temperature": 1.0,
        "max_new_tokens": args.new_tokens,
        "sampling_seed": 0,
        "ignore_eos": True,
    }
    sampling.update(over.pop("sampling", {}))
    body: dict[str, Any] = {
        "seed": 0,
        "student": {"path": str(task / "student"), "dtype": "float32"},
        "teacher": {"path": str(task / "teacher"), "dtype": "float32"},
        "parallel": {"tp": 2, "pp": 1},
        "rollout": {
            "mode": "launch",
            "launch": {
                "backend": "embedded",
                "base_port": free_port(),
                "health_timeout_s": 120,
                "log_dir": str(run / "logs" / "rollout"),
                "extra_args": ["--max-batch-size", "256", "--decode-step-delay", str(delay)],
            },
            "sampling": sampling,
            # One probe token: under the simulated delay each costs a whole batch's decoding
            # step, where a real server answers the probe's single sequence in milliseconds.
            "weight_sync": {
                "disk": {"directory": str(run / "rollout_weights")},
                "probe": {"max_new_tokens": 1},
            },
            **over.pop("rollout", {}),
        },
        "data": {"path": str(task / "train.jsonl"), "chat_template": False},
        "batch": {"prompts_per_step": args.prompts, "max_tokens_per_microbatch": 4096},
        "distillation": {"method": "oprd", "layers": "all", "positions": {"mode": "all"}},
        "optimizer": {"lr": 1.0e-4, "weight_decay": 0.0},
        "schedule": {"steps": args.steps, "warmup_steps": 1},
        "checkpoint": {"dir": str(run / "ckpt"), "interval": 10_000, "keep_last": 1},
        "metrics": {"dir": str(run / "logs"), "sinks": ["jsonl"], "progress_bar": False},
        "evaluation": {"interval": 0},
    }
    run.mkdir(parents=True, exist_ok=True)
    path = run / "config.yaml"
    path.write_text(yaml.safe_dump(body), encoding="utf-8")
    return path


def train(path: Path, run: Path) -> list[dict[str, Any]]:
    """One launch; its train records."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
        "--log-dir", str(run / "torchrun"), "--master-addr", "127.0.0.1",
        "--master-port", str(free_port()), "-m", "oprd_mega.train", "--config", str(path),
        "--resume", "never",
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    (run / "stdout.log").write_text(result.stdout, encoding="utf-8")
    (run / "stderr.log").write_text(result.stderr, encoding="utf-8")
    if result.returncode != 0:
        errors = [line for line in result.stderr.splitlines() if "Error" in line][-8:]
        sys.exit(
            f"bench_pipeline: training run {run.name} failed (exit {result.returncode}); "
            f"its output is in {run}/stderr.log:\n" + "\n".join(errors)
        )
    return read_metrics(run / "logs", kind="train")


def summary(records: list[dict[str, Any]]) -> dict[str, float]:
    """Means over the steady steps: not the first two (start-up, the pool filling) nor the
    last (the pool no longer samples ahead, so it has nothing to overlap)."""
    steady = records[2:-1] or records

    def mean(key: str) -> float:
        return statistics.fmean(float(r.get(key) or 0.0) for r in steady)

    return {
        "step_time_s": mean("time/wall"),
        "trainer_side_s": mean("time/wall") - mean("time/rollout") - mean("time/rollout_settle"),
        "trainer_wait_s": mean("time/rollout") + mean("time/rollout_settle"),
        "server_idle_s": mean("time/server_idle"),
        "tokens_per_s_e2e": mean("tokens_per_s_e2e"),
        "staleness_mean": mean("rollout/staleness_mean"),
        "response_length_mean": mean("response_length/mean"),
        "response_length_max": max(float(r["response_length/max"]) for r in steady),
        "truncated_fraction": mean("response_length/truncated_fraction"),
        "continued_samples": mean("rollout/continued_samples"),
        "restarted_samples": mean("rollout/restarted_samples"),
        "steps": float(len(steady)),
    }


def balances(task: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    base = summary(train(config(task, work / "calibrate", args, 0.0), work / "calibrate"))
    trainer = base["trainer_side_s"]
    own = base["trainer_wait_s"]  # the rollout time of the model's own compute, no delay
    report: dict[str, Any] = {"calibration": base, "balances": {}}
    for balance in args.balances:
        delay = max(balance * trainer - own, 0.0) / args.new_tokens
        row: dict[str, Any] = {"decode_step_delay_s": delay}
        for staleness in (0, 1):
            name = f"b{balance:g}-s{staleness}"
            over = {"rollout": {"max_staleness": staleness}}
            row[f"staleness{staleness}"] = summary(
                train(config(task, work / name, args, delay, **over), work / name)
            )
        sync = row["staleness0"]
        row["measured_balance"] = sync["trainer_wait_s"] / sync["trainer_side_s"]
        row["ratio_step_time"] = row["staleness1"]["step_time_s"] / sync["step_time_s"]
        report["balances"][f"{balance:g}"] = row
    return report


def long_tail(task: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    vocab = json.loads((task / "student" / "config.json").read_text())["vocab_size"]
    stops = random.Random(1).sample(range(3, vocab), max(1, int(args.stop_fraction * vocab)))
    sampling = {"ignore_eos": False, "stop_token_ids": stops, "max_new_tokens": args.tail_tokens}
    report: dict[str, Any] = {
        "stop_token_ids": len(stops),
        "max_new_tokens": args.tail_tokens,
        "decode_step_delay_s": args.tail_delay,
    }
    modes: dict[str, dict[str, Any]] = {
        "partial_off": {"partial": False},
        "partial_on": {"partial": True},  # cut by time
        **{f"partial_chunk{c}": {"partial": True, "partial_chunk_tokens": c} for c in args.chunks},
    }
    for key, mode in modes.items():
        over = {"rollout": {"max_staleness": 1, **mode}, "sampling": sampling}
        run = work / f"tail-{key}"
        report[key] = summary(train(config(task, run, args, args.tail_delay, **over), run))
    off = report["partial_off"]["step_time_s"]
    report["ratio_step_time"] = report["partial_on"]["step_time_s"] / off
    for c in args.chunks:
        report[f"ratio_step_time_chunk{c}"] = report[f"partial_chunk{c}"]["step_time_s"] / off
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--balances", default="0.5,1,2", help="rollout time / trainer time")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--prompts", type=int, default=16, help="prompts per step (n = 2)")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens per response")
    parser.add_argument("--prompt-words", type=int, default=48, help="words per prompt")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument(
        "--teacher-layers",
        type=int,
        default=16,
        help="the teacher's depth (the student has 2 layers: the served model stays cheap while "
        "the trainer's side of a step is heavy)",
    )
    parser.add_argument("--tail-tokens", type=int, default=40, help="long tail: max_new_tokens")
    parser.add_argument("--tail-delay", type=float, default=0.15, help="long tail: s per step")
    parser.add_argument(
        "--stop-fraction",
        type=float,
        default=0.16,
        help="long tail: the share of the vocabulary that ends a response (0.16 on the default "
        "model: median 7 tokens, about one response in ten at --tail-tokens)",
    )
    parser.add_argument(
        "--tail-chunks",
        default="20",
        help="long tail: rollout.partial_chunk_tokens of the runs cut by tokens, comma-separated "
        "('' for none; 20 = half the budget: at max_staleness 1 no response restarts)",
    )
    parser.add_argument("--partial-only", action="store_true", help="only the long-tail part")
    parser.add_argument("--balances-only", action="store_true", help="only the balances")
    parser.add_argument("--keep", type=Path, help="keep the runs in this directory")
    args = parser.parse_args()
    args.balances = [float(b) for b in args.balances.split(",")]
    args.chunks = [int(c) for c in args.tail_chunks.split(",") if c.strip()]
    with tempfile.TemporaryDirectory(prefix="bench_pipeline.") as tmp:
        work = args.keep or Path(tmp)
        task = make_task(work / "task", args)
        report: dict[str, Any] = {}
        if not args.partial_only:
            report["balances"] = balances(task, work, args)
        if not args.balances_only:
            report["long_tail"] = long_tail(task, work, args)
    print(json.dumps(report, indent=1))
    for balance, row in report.get("balances", {}).get("balances", {}).items():
        print(
            f"ratio staleness1/staleness0 balance={balance} (measured "
            f"{row['measured_balance']:.2f}) step_time={row['ratio_step_time']:.3f}"
        )
    if "long_tail" in report:
        tail = report["long_tail"]
        print(
            f"ratio partial_on/partial_off long_tail step_time={tail['ratio_step_time']:.3f} "
            f"server_idle={tail['partial_on']['server_idle_s']:.3f}/"
            f"{tail['partial_off']['server_idle_s']:.3f} s"
        )
        for c in args.chunks:
            chunked = tail[f"partial_chunk{c}"]
            print(
                f"ratio partial_chunk{c}/partial_off long_tail "
                f"step_time={tail[f'ratio_step_time_chunk{c}']:.3f} "
                f"server_idle={chunked['server_idle_s']:.3f}/"
                f"{tail['partial_off']['server_idle_s']:.3f} s"
            )


if __name__ == "__main__":
    main()
