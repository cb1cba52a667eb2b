"""One conversion, loaded at TP3 (3 gloo processes): the vocabulary re-padded for the TP.

Tiny Llama (untied) and Qwen2 (tied) models with 6 heads, 3 KV heads and 1,000 tokens are
converted with the default padding (1,024 rows, which 3 does not divide). At TP3 the model holds
1,152 rows (a multiple of 128 x 3, as Megatron-LM pads): the loader adds zero rows, and every
layer and the logits match transformers' own forward; gathered weights, a checkpoint saved at
TP3 and loaded at TP1, and its export reproduce the HF files bit for bit.
"""

import json
from pathlib import Path

import pytest
import torch

from oprd_mega.convert.verify import TOLERANCE
from tests.torchrun_utils import run_torchrun

WORKER = Path(__file__).parent / "workers" / "tp3_worker.py"
MODELS = ["llama-untied", "qwen2-tied"]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    work = tmp_path_factory.mktemp("tp3")
    run_torchrun(WORKER, str(work), nproc=3, timeout=600)
    data = json.loads((work / "results.json").read_text())
    print(json.dumps(data, indent=1))
    return data


@pytest.mark.parametrize("model", MODELS)
def test_converted_at_the_default_padding_it_matches_transformers_at_tp3(
    results: dict, model: str
) -> None:
    out = results[model]
    assert out["stored"] == [128, 1024]  # 3 does not divide the stored rows
    assert set(out["diffs"]) == {"layer 1", "layer 2", "layer 3", "final_norm", "logits"}
    for name, (max_abs, max_rel) in out["diffs"].items():
        assert max_rel <= TOLERANCE[torch.float32], f"{model} {name}: rel {max_rel:.2e}"
        assert max_abs <= 1e-4, f"{model} {name}: abs {max_abs:.2e}"


@pytest.mark.parametrize("model", MODELS)
def test_each_rank_holds_a_third_of_1152_rows_the_padding_zero(results: dict, model: str) -> None:
    out = results[model]
    assert out["local_rows"] == [384]
    assert out["rows_real_and_zero_padding"]
    assert out["hf_load_equals_checkpoint_load"]


@pytest.mark.parametrize("model", MODELS)
def test_tp3_gathers_saves_and_exports_the_hf_files_bit_for_bit(results: dict, model: str) -> None:
    out = results[model]
    assert out["gathered_bit_exact"]
    assert out["recorded_tp3"] == [384, 1152]
    assert out["tp1_rows"] == 1024  # the TP3 checkpoint's extra rows dropped at TP1
    assert out["tp3_checkpoint_loads_at_tp1_exactly"]
    assert out["export_bit_exact"]


def test_verify_command_passes_at_tp3(results: dict) -> None:
    cli = results["cli"]
    assert cli["status"] == 0, cli["printed"]
    assert "verify TP3PP1" in cli["printed"] and "OK: all within tolerance" in cli["printed"]
