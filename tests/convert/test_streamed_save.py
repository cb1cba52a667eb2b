"""``hf_to_mcore`` writes one layer at a time yet produces the checkpoint a built model would.

One torchrun launch (2 gloo processes: every rank calls the converter, rank 0 writes) converts
tiny models both ways, streamed and through ``save_mcore_checkpoint`` of a built model; a plain
subprocess measures the streamed conversion's memory on a model of large layers.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.torchrun_utils import run_torchrun
from tools.tiny_hf_models import make_tiny_model

WORKERS = Path(__file__).parent / "workers"
PLAN = [{"family": "qwen2", "tied": True}, {"family": "qwen3", "tied": False}]
MODELS = [f"{p['family']}-{'tied' if p['tied'] else 'untied'}" for p in PLAN]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    work = tmp_path_factory.mktemp("stream")
    run_torchrun(WORKERS / "stream_worker.py", str(work), json.dumps(PLAN), nproc=2, timeout=300)
    return json.loads((work / "results.json").read_text())


@pytest.mark.parametrize("model", MODELS)
def test_same_entries_as_a_save_of_the_built_model(results: dict, model: str) -> None:
    out = results[model]
    assert out["storage_new"] == out["storage_old"]  # tensors and Megatron's _extra_state objects
    assert out["tensors_new"] == out["tensors_old"]
    assert any(v == ["BytesStorageMetadata"] for v in out["storage_new"].values())
    tied = "-tied" in model
    assert ("output_layer.weight" in out["tensors_new"]) is not tied


@pytest.mark.parametrize("model", MODELS)
def test_every_tensor_reads_back_bit_equal(results: dict, model: str) -> None:
    out = results[model]
    assert out["read_names_equal"]
    assert out["read_bad"] == []
    assert out["strict_load_equal"]


@pytest.mark.parametrize("model", MODELS)
def test_same_files_written_once_by_rank0(results: dict, model: str) -> None:
    out = results[model]
    assert out["files_new"] == out["files_old"]  # .metadata, common.pt, metadata.json, hf/...
    assert out["common_equal"] and out["format_equal"]
    assert out["data_files_new"] and all(f.startswith("__0_") for f in out["data_files_new"])
    assert out["left_in_parent"] == []


def test_a_failed_read_on_rank0_stops_every_rank_and_leaves_nothing(results: dict) -> None:
    out = results["failing_read"]
    assert out["errors"][0] == "OSError: disk on fire"
    assert out["errors"][1].startswith("RemoteError: rank 0 failed to read layer 1")
    assert not out["target_exists"]
    assert out["left_in_parent"] == []


# Memory: 8 layers of 24 MiB (float32) and a 1 MiB embedding, 195 MiB in all. The former path
# (``memory_worker.py --built-model``: build, load, save the model) grew by 245-326 MiB.
BIG_LAYERS = {
    "hidden_size": 1024,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "intermediate_size": 704,
    "vocab_size": 256,
    "num_hidden_layers": 8,
}
LAYER_MIB = (4 * 1024 * 1024 + 3 * 1024 * 704 + 2 * 1024) * 4 / 2**20


def test_conversion_memory_stays_around_one_layer(tmp_path: Path) -> None:
    hf = make_tiny_model("llama", tmp_path / "hf", **BIG_LAYERS)
    result = subprocess.run(
        [sys.executable, str(WORKERS / "memory_worker.py"), str(hf), str(tmp_path / "mcore")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONFAULTHANDLER": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    growth = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"layer {LAYER_MIB:.1f} MiB, peak growth {growth}")  # pytest -s shows the numbers
    # A built model alone would be 8 layers; the streamed conversion holds one layer's tensors
    # (anonymous memory) plus, in all resident memory, the pages of the HF file it is reading.
    assert growth["anon_mib"] < 3 * LAYER_MIB
    assert growth["rss_mib"] < 3 * LAYER_MIB
    assert growth["anon_mib"] > 0.5 * LAYER_MIB  # the sampler did see a layer go by
