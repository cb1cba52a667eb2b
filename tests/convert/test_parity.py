"""Convert tiny HF models, load them into Megatron at several layouts, compare with transformers.

One torchrun launch (4 gloo processes) does all the work (Megatron start-up dominates); the
tests below check its results: round trip bit-exact, every layer's hidden state and the logits
within float32 tolerance at TP1PP1, TP2, TP2+SP, PP2, TP2xPP2 and PP4, re-layout, mapping shards and
the truncated teacher; a 5-layer model at PP4 (automatic and hand-set uneven splits).
"""

import json
from pathlib import Path

import pytest
import torch

from oprd_mega.convert.verify import TOLERANCE
from tests.real_shapes import CI_REAL_SHAPED, PP4_LAYOUTS, parity_plan, pp4_plan
from tests.torchrun_utils import run_torchrun

WORKER = Path(__file__).parent / "workers" / "parity_worker.py"
ALL_LAYOUTS = [[1, 1, False], [2, 1, False], [2, 1, True], [1, 2, False], [2, 2, False]]
LAYOUT_NAMES = ["TP1PP1", "TP2PP1", "TP2PP1+SP", "TP1PP2", "TP2PP2"]
PLAN = [
    {"family": "llama", "tied": False, "layouts": ALL_LAYOUTS, "extra": False},
    {"family": "qwen2", "tied": True, "layouts": ALL_LAYOUTS, "extra": True},
    {"family": "qwen3", "tied": False, "layouts": ALL_LAYOUTS, "extra": True},
    {"family": "qwen3", "tied": True, "layouts": [[2, 2, False]], "extra": False},
    {"family": "llama", "tied": True, "layouts": [[2, 1, False]], "dtype": "bfloat16"},
    # vocabulary 517: padded to 640 rows, split over TP2 (and 1000 -> 1024 in the items above)
    {
        "name": "llama-vocab517-untied",
        "family": "llama",
        "tied": False,
        "layouts": [[1, 1, False], [2, 1, False]],
        "config": {"vocab_size": 517},
        "padding": True,
    },
    {
        "name": "qwen2-vocab517-tied",
        "family": "qwen2",
        "tied": True,
        "layouts": [[2, 1, False]],
        "config": {"vocab_size": 517},
        "padding": True,
    },
    *parity_plan(CI_REAL_SHAPED),  # Llama-3 and YaRN RoPE, real attention ratios, 3 layers
    *pp4_plan(),  # 5 layers on 4 stages: the automatic 2|1|1|1 and a hand-set 1|1|1|2
]
MODELS = [
    p.get("name", f"{p['family']}-{'tied' if p['tied'] else 'untied'}")
    + (f"-{p['dtype']}" if "dtype" in p else "")
    for p in PLAN
]
FP32_TOL = TOLERANCE[torch.float32]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    work = tmp_path_factory.mktemp("parity")
    run_torchrun(WORKER, str(work), json.dumps(PLAN), nproc=4, timeout=600)
    data = json.loads((work / "results.json").read_text())
    print(json.dumps(data, indent=1))  # the measured differences, for the record (pytest -s)
    return data


@pytest.mark.parametrize("model", MODELS)
def test_mcore_to_hf_reproduces_every_tensor_bit_exactly(results: dict, model: str) -> None:
    out = results[model]
    assert out["roundtrip_names_equal"]
    assert out["roundtrip_bad"] == []
    assert out["roundtrip_count"] >= 3 * 9 + 2
    assert out["config_json_equal"]  # the RoPE scaling fields survive the round trip


@pytest.mark.parametrize("model", MODELS)
def test_every_layer_and_logits_match_transformers(results: dict, model: str) -> None:
    plan = next(p for p in PLAN if MODELS[PLAN.index(p)] == model)
    layouts = results[model]["layouts"]
    known = [*zip(ALL_LAYOUTS, LAYOUT_NAMES, strict=True), *PP4_LAYOUTS]
    names = {str(layout): name for layout, name in known}
    expected = [names[str(layout)] for layout in plan["layouts"]]
    assert sorted(layouts) == sorted(expected)
    dtype = getattr(torch, plan.get("dtype", "float32"))
    # float32: the documented verify tolerance and an absolute bound; bfloat16: the tolerance.
    max_abs_allowed = 1e-4 if dtype == torch.float32 else float("inf")
    depth = plan.get("config", {}).get("num_hidden_layers", 3)
    expected_keys = {f"layer {n}" for n in range(1, depth + 1)} | {"final_norm", "logits"}
    for layout, diffs in layouts.items():
        assert set(diffs) == expected_keys, (layout, sorted(diffs))
        for name, (max_abs, max_rel) in diffs.items():
            assert max_rel <= TOLERANCE[dtype], f"{model} {layout} {name}: rel {max_rel:.2e}"
            assert max_abs <= max_abs_allowed, f"{model} {layout} {name}: abs {max_abs:.2e}"


@pytest.mark.parametrize("model", ["qwen2-tied", "qwen3-untied"])
def test_mapping_tp_pp_shards_equal_megatron_resharding(results: dict, model: str) -> None:
    assert results[model]["mapping_shards_equal"]


@pytest.mark.parametrize("model", ["qwen2-tied", "qwen3-untied"])
def test_checkpoint_saved_at_tp2pp2_loads_at_tp2_with_identical_outputs(
    results: dict, model: str
) -> None:
    assert results[model]["relayout_identical"]


@pytest.mark.parametrize("model", ["qwen2-tied", "qwen3-untied"])
def test_truncated_teacher_matches_hf_layer_without_head(results: dict, model: str) -> None:
    out = results[model]
    assert not out["teacher_has_head"]
    assert out["teacher_keys"] == ["layer 1", "layer 2"]
    assert out["teacher_layer2"][1] <= FP32_TOL


@pytest.mark.parametrize("model", ["llama-vocab517-untied", "qwen2-vocab517-tied"])
def test_odd_vocabulary_is_stored_padded_with_zero_rows_and_the_size_recorded(
    results: dict, model: str
) -> None:
    """517 tokens: 640 rows in the checkpoint (embedding and untied output layer), the 123
    padding rows zero, the size recorded; the round trip and verify above see 517 rows; a
    model built with a padding of 64 (576 rows, at TP2) loads it: the real rows, zero padding."""
    padding = results[model]["padding"]
    expected_rows = {"embedding.word_embeddings.weight": [640, True]}
    if "untied" in model:
        expected_rows["output_layer.weight"] = [640, True]
    assert padding["rows"] == expected_rows
    assert padding["stored"][0] == 640 and padding["recorded"] == 640
    assert padding["repadded"]


def test_init_distributed_refuses_to_switch_layout_silently(results: dict) -> None:
    assert results["layout_switch_refused"]


@pytest.mark.parametrize("model", [p["name"] for p in pp4_plan()])
def test_four_stages_hold_the_automatic_and_the_hand_set_splits(results: dict, model: str) -> None:
    """What each of the 4 stages built (global layer numbers), as Megatron placed the layers:
    5 layers split automatically 2|1|1|1, by hand (first 1, last 2) 1|1|1|2; verify above
    compared every layer of both with transformers."""
    assert results[model]["stage_layers"] == {
        "TP1PP4": [[1, 2], [3], [4], [5]],
        "TP1PP4 {first: 1, last: 2}": [[1], [2], [3], [4, 5]],
    }


def test_at_a_hand_set_split_gathered_weights_and_saved_checkpoints_are_exact(
    results: dict,
) -> None:
    """At PP4 with first 1, last 2: the HF tensors gathered from the four stages (weight sync,
    export) equal the original files bit for bit; a checkpoint saved there loads at TP2 with
    exactly the converted checkpoint's weights."""
    (item,) = pp4_plan()
    assert results[item["name"]]["split_checks"] == {
        "gathered_bit_exact": True,
        "saved_at_split_loads_at_tp2": True,
    }
