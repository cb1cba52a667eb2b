"""Conversion and per-layer parity for the real-shaped models without RoPE scaling (slow).

Those with scaled RoPE run in CI inside tests/convert/test_parity.py. One torchrun launch
(4 gloo processes) converts each model, checks the round trip bit for bit, and compares every
layer and the logits with transformers at TP1, TP2, PP2 (3 layers: 2 + 1) and TP2xPP2.
"""

import json
from pathlib import Path

import pytest
import torch

from oprd_mega.convert.verify import TOLERANCE
from tests.real_shapes import LAYOUTS, SLOW_REAL_SHAPED, parity_plan
from tests.torchrun_utils import run_torchrun

WORKER = Path(__file__).parent / "workers" / "parity_worker.py"
EXPECTED_KEYS = {"layer 1", "layer 2", "layer 3", "final_norm", "logits"}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    work = tmp_path_factory.mktemp("real_shapes")
    plan = parity_plan(SLOW_REAL_SHAPED)
    run_torchrun(WORKER, str(work), json.dumps(plan), nproc=4, timeout=600)
    data = json.loads((work / "results.json").read_text())
    print(json.dumps(data, indent=1))  # the measured differences, for the record (pytest -s)
    return data


@pytest.mark.parametrize("model", SLOW_REAL_SHAPED)
def test_round_trip_reproduces_every_tensor_bit_exactly(results: dict, model: str) -> None:
    out = results[model]
    assert out["roundtrip_names_equal"] and out["roundtrip_bad"] == []


@pytest.mark.parametrize("model", SLOW_REAL_SHAPED)
def test_every_layer_and_logits_match_transformers_at_every_layout(
    results: dict, model: str
) -> None:
    layouts = results[model]["layouts"]
    assert sorted(layouts) == sorted(LAYOUTS)
    for layout, diffs in layouts.items():
        assert set(diffs) == EXPECTED_KEYS, (layout, sorted(diffs))
        for name, (max_abs, max_rel) in diffs.items():
            assert max_rel <= TOLERANCE[torch.float32], f"{model} {layout} {name}: {max_rel:.2e}"
            assert max_abs <= 1e-4, f"{model} {layout} {name}: abs {max_abs:.2e}"
