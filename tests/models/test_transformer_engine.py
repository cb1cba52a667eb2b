"""Transformer Engine layers, where TE runs (CUDA): HF weights through the name map match HF."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from oprd_mega.models.specs import te_available

WORKER = Path(__file__).parent / "workers" / "te_worker.py"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not te_available(), reason="Transformer Engine cannot run here"),
]


def test_hf_weights_in_te_layers_match_transformers(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(WORKER), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert out.returncode == 0 and lines, out.stderr[-3000:]
    results = json.loads(lines[-1][len("RESULT ") :])
    assert results["fusions"]["apply_rope_fusion"]
    for family in ("llama", "qwen2", "qwen3"):
        # Fused norm+linear parameters exist, so the map really took the TE names.
        assert results[family]["te_layer_norm_names"] > 0
        assert results[family]["max_rel"] <= 1e-4, (family, results[family])
