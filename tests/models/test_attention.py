"""SDPAttention (the local spec's core attention) against Megatron's own DotProductAttention.

Float64, forward output and the gradients of query, key and value; packed (THD) sequences
against each sequence run on its own. The worker runs in a subprocess (Megatron's state).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from oprd_mega.models.attention import SDPAttention
from oprd_mega.models.hf_config import parse_hf_config
from oprd_mega.models.specs import layer_spec
from tests.models.test_hf_config import config

WORKER = Path(__file__).parent / "workers" / "attention_worker.py"


@pytest.fixture(scope="module")
def results() -> dict:
    out = subprocess.run(
        [sys.executable, str(WORKER)], capture_output=True, text=True, timeout=300, check=False
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert out.returncode == 0 and lines, out.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT ") :])


@pytest.mark.parametrize("case", ["causal", "explicit_mask", "packed_vs_separate"])
def test_matches_megatron_dot_product_attention(results: dict, case: str) -> None:
    assert results[case] < 1e-12


def test_packed_output_is_token_major(results: dict) -> None:
    assert results["packed_shape"] == [25, 96]


@pytest.mark.parametrize("name", ["layer_scaling", "window"])
def test_unsupported_options_are_refused_by_name(results: dict, name: str) -> None:
    assert results[f"refused_{name}"].startswith("SDPAttention does not support")


def test_local_spec_uses_sdpa() -> None:
    spec = layer_spec(parse_hf_config(config("qwen3")), use_te=False)
    assert spec.submodules.self_attention.submodules.core_attention is SDPAttention
