"""Launching the trainer in tests: a tiny task (random tiny Llama student and teacher, a prompt
file) and ``torchrun ... -m oprd_mega.train`` as a subprocess with a hard timeout."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.torchrun_utils import free_port, run_torchrun, torchrun_command, torchrun_env
from tools.tiny_hf import make_tiny_model_dir

# Keys that differ between two runs of the same config (wall clock, memory, throughput).
TIMING_KEYS = ("time", "tokens_per_s", "tokens_per_s_e2e", "memory/peak_mib")
# Trainer launches run on CPU with one thread per process even where this process sets
# otherwise, and keep library warnings out of the output the tests read.
TRAINER_ENV = {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONWARNINGS": "ignore"}


def make_task(root: Path) -> Path:
    """Student (2 layers), teacher (4 layers, same width), train and held-out prompts."""
    make_tiny_model_dir(root / "student", seed=0, layers=2, hidden=64)
    make_tiny_model_dir(root / "teacher", seed=1, layers=4, hidden=64)
    with (root / "train.jsonl").open("w") as handle:
        for i in range(40):
            handle.write(json.dumps({"prompt": f"numbers {i % 10} and the fox"}) + "\n")
    with (root / "heldout.jsonl").open("w") as handle:
        for i in range(4):
            handle.write(json.dumps({"prompt": f"the quick {i}", "answer": str(i)}) + "\n")
    return root


def task_config(task: Path, run: Path, **sections: Any) -> Path:
    """A config for ``task`` writing under ``run``; ``sections`` replace top-level keys."""
    config: dict[str, Any] = {
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
                # One sequence per forward: batch composition cannot change a sampled token.
                "extra_args": ["--max-batch-size", "1"],
            },
            "sampling": {"n": 2, "temperature": 1.0, "max_new_tokens": 6, "sampling_seed": 0},
            "weight_sync": {"disk": {"directory": str(run / "rollout_weights")}},
        },
        "data": {"path": str(task / "train.jsonl"), "chat_template": False},
        "batch": {"prompts_per_step": 4, "max_tokens_per_microbatch": 48},
        "distillation": {"method": "oprd", "layers": "all", "positions": {"mode": "all"}},
        "optimizer": {"lr": 1.0e-3, "weight_decay": 0.0},
        "schedule": {"steps": 6, "warmup_steps": 1},
        "checkpoint": {"dir": str(run / "ckpt"), "interval": 2, "keep_last": 5},
        "metrics": {"dir": str(run / "logs"), "sinks": ["jsonl"], "progress_bar": False},
        "evaluation": {
            "prompts": str(task / "heldout.jsonl"),
            "k": 2,
            "interval": 2,
            "verifier": "exact",
            "sampling": {"temperature": 1.0, "max_new_tokens": 3, "sampling_seed": 5},
        },
    }
    config.update(sections)
    run.mkdir(parents=True, exist_ok=True)
    path = run / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def _trainer(config: Path, args: tuple[str, ...]) -> tuple[str, ...]:
    """The trainer module and its arguments, for torchrun's ``-m``."""
    return ("oprd_mega.train", "--config", str(config), *args)


def launch_command(
    config: Path, *args: str, nproc: int, nnodes: int = 1, node_rank: int = 0, port: int = 0
) -> list[str]:
    """``torchrun`` of the trainer on loopback (for tests that watch or kill the launch)."""
    return torchrun_command(
        *_trainer(config, args),
        nproc=nproc,
        module=True,
        nnodes=nnodes,
        node_rank=node_rank,
        port=port,
    )


def child_env() -> dict[str, str]:
    """Environment of a trainer launch: CPU, one thread per process, stack dumps on hangs."""
    return torchrun_env(env=TRAINER_ENV)


def train(
    config: Path, *args: str, nproc: int = 2, timeout: float = 300.0
) -> subprocess.CompletedProcess[str]:
    """Run the trainer to completion (or failure); never raises on a non-zero exit."""
    return run_torchrun(
        *_trainer(config, args),
        nproc=nproc,
        module=True,
        timeout=timeout,
        env=TRAINER_ENV,
        check=False,
    )


def require_success(result: subprocess.CompletedProcess[str]) -> str:
    """The run's stdout, or an AssertionError with both streams."""
    assert result.returncode == 0, (
        f"trainer exited {result.returncode}\n--- stdout ---\n{result.stdout}\n"
        f"--- stderr ---\n{result.stderr[-6000:]}"
    )
    return result.stdout


def comparable(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Metric records without the keys that differ between identical runs."""
    return [
        {k: v for k, v in r.items() if k not in TIMING_KEYS and not k.startswith("time/")}
        for r in records
    ]
