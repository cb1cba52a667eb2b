"""SDPAttention under context parallelism (2 gloo ranks, float64) against Megatron's own
DotProductAttention on the whole sequence: output, dQ, dK and dV (the all-gather's backward
reduce-scatters dK/dV), for causal rows and packed (THD) sequences."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.torchrun_utils import run_torchrun

WORKER = Path(__file__).parent / "workers" / "attention_cp_worker.py"


@pytest.fixture(scope="module")
def results() -> dict:
    out = run_torchrun(WORKER, nproc=2, timeout=300)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, out.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT ") :])


@pytest.mark.parametrize("case", ["causal", "packed"])
def test_context_parallel_attention_matches_the_whole_sequence(results: dict, case: str) -> None:
    assert results[case] < 1e-12
    assert results[f"{case}_rows"] == 12  # each rank attends half of the 24 tokens


def test_a_mask_under_context_parallelism_is_refused(results: dict) -> None:
    assert "context parallelism supports causal attention" in results["refused_mask"]
