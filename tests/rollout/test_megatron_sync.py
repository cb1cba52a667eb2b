"""Trainer side of the weight sync: gather a live Megatron model, sync it, check it.

One torchrun launch (4 gloo processes, ``workers/megatron_sync_worker.py``) does the work; the
tests check its results:

- the gather at TP2xPP2, TP2 (DP2) and PP2 (DP2) reproduces every tensor of the original HF
  checkpoint bit-exactly (Llama and Qwen3, tied and untied), on the requested destination rank
  (including one in the second data-parallel replica), and nothing on the others; the model's
  vocabulary is padded (1000 -> 1024 rows) and the padding rows never reach the servers;
- end to end at TP2xPP2: weights perturbed in Megatron and synced through the disk and the
  distributed paths make an embedded server's greedy log-probs equal transformers' on the same
  perturbation applied directly to the HF weights; a skipped sync fails the check on every rank.
"""

import json
from pathlib import Path

import pytest

from tests.torchrun_utils import run_torchrun

WORKER = Path(__file__).parent / "workers" / "megatron_sync_worker.py"
LAYOUTS = ["TP2PP2", "TP2PP1", "TP1PP2"]
MODELS = ["llama-untied", "llama-tied", "qwen3-untied", "qwen3-tied"]
# 3 layers x 9 (Llama) or 11 (Qwen3) tensors + embedding + final norm (+ lm_head untied)
EXPECTED_COUNT = {"llama-untied": 30, "llama-tied": 29, "qwen3-untied": 36, "qwen3-tied": 35}
WORLD = 4


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    work = tmp_path_factory.mktemp("megatron-sync")
    run_torchrun(WORKER, str(work), nproc=WORLD, timeout=300)
    data = json.loads((work / "results.json").read_text())
    print(json.dumps({"timings": data["timings"], "e2e": data["e2e"][0]}, indent=1))
    return data


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("model", MODELS)
def test_gather_reproduces_the_hf_checkpoint_bit_exactly(results, layout, model):
    parts = results[f"{layout} {model}"]
    dst = next(p["dst"] for p in parts if "dst" in p)
    for rank, part in enumerate(parts):
        if rank == dst:
            assert part["names_equal"], part
            assert part["bad"] == []
            assert part["count"] == EXPECTED_COUNT[model]
            # the model holds 1024 vocabulary rows; the servers get the HF-shaped 1000
            assert part["padded_vocab"] == 1024
        else:
            assert part == {"nonempty_on_non_dst": False}


def test_gather_went_to_ranks_of_both_replicas_and_stages(results):
    dsts = {results[f"{layout} {m}"][0].get("dst") for layout in LAYOUTS for m in MODELS}
    dsts |= {p.get("dst") for layout in LAYOUTS for m in MODELS for p in results[f"{layout} {m}"]}
    assert {0, 3} <= dsts


@pytest.mark.parametrize("layout", LAYOUTS)
def test_unknown_megatron_parameter_is_refused_on_every_rank(results, layout):
    messages = results[f"{layout} include-all"]
    assert len(set(messages)) == 1
    assert "oprd_projection.weight" in messages[0] and "include=" in messages[0]


def test_disk_sync_gives_the_server_exactly_the_perturbed_weights(results):
    disk = results["e2e"][0]["disk"]
    assert disk["weights"]["names_equal"] and disk["weights"]["bad"] == []
    assert disk["max_diff"] <= 2e-4
    tensors, nbytes, buckets, _ = disk["report"]
    assert tensors == EXPECTED_COUNT["qwen3-tied"] and buckets > 1 and nbytes > 0


def test_distributed_sync_gives_the_server_the_perturbed_weights(results):
    out = results["e2e"][0]["distributed"]
    assert out["max_diff"] <= 2e-4
    assert out["report"][0] == EXPECTED_COUNT["qwen3-tied"] and out["report"][2] > 1


def test_skipped_sync_is_caught_on_every_rank_and_a_real_sync_recovers(results):
    parts = results["e2e"]
    assert all(p["skipped_errors"] == parts[0]["skipped_errors"] for p in parts)
    stale, probe = parts[0]["skipped_errors"]
    assert "stale weights" in stale and "'v2'" in stale
    assert "differ from the trainer's" in probe and "'v3'" in probe
    assert all(p["resynced"] for p in parts)
