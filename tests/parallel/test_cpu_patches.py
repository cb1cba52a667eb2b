"""The CPU patches for Megatron on gloo: each one named, needed and working."""

from pathlib import Path

import pytest
import torch

from oprd_mega.parallel import cpu_patches
from tests.torchrun_utils import run_torchrun

WORKER = Path(__file__).parent / "workers" / "cpu_patches_worker.py"


def test_each_patch_fails_before_and_works_after_under_torchrun() -> None:
    result = run_torchrun(WORKER, nproc=2, timeout=240)
    for name in cpu_patches.patch_names():
        for rank in (0, 1):
            assert f"PATCH-OK {name} rank={rank}" in result.stdout, result.stdout
    assert "P2P-OK rank=0" in result.stdout and "P2P-OK rank=1" in result.stdout
    assert "TRAIN-OK rank=0" in result.stdout and "TRAIN-OK rank=1" in result.stdout


def test_patches_are_not_applied_when_cuda_is_present(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    before = torch.cuda.synchronize
    assert cpu_patches.apply_cpu_patches() == cpu_patches.applied_patches()
    assert "synchronize" not in cpu_patches.applied_patches()
    assert torch.cuda.synchronize is before


def test_unknown_patch_name_is_rejected_before_applying_anything() -> None:
    before = cpu_patches.applied_patches()
    with pytest.raises(ValueError, match="unknown CPU patch"):
        cpu_patches.apply_cpu_patches(["rng_state", "no_such_patch"], force=True)
    assert cpu_patches.applied_patches() == before


def test_patch_names_are_unique_and_documented() -> None:
    names = cpu_patches.patch_names()
    assert len(names) == len(set(names)) == 5
    assert all(patch.reason for patch in cpu_patches.PATCHES)
