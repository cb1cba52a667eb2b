"""reset_model_parallel frees Megatron's process groups, so layouts can be switched freely."""

from __future__ import annotations

from pathlib import Path

from tests.torchrun_utils import run_torchrun


def test_switching_layouts_does_not_leak_groups() -> None:
    worker = Path(__file__).parent / "workers" / "reset_worker.py"
    result = run_torchrun(worker, nproc=2, timeout=300)
    assert result.stdout.count("reset ok") == 2, result.stdout
