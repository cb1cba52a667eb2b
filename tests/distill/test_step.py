"""One OPRD / OPD step under Megatron at six layouts, against a float64 transformers oracle.

One torchrun launch (4 gloo processes, Megatron start-up dominates) runs every case at every
layout; the tests below read its results. Student: Llama, 4 layers, hidden 32; teacher: Llama,
6 layers, hidden 48 (a hidden-32 one for identity). Tapped student layers 1-3 pair with teacher
layers 1, 3, 4 (phi), so the teacher is truncated at 4 layers; at PP2 the student holds layers
1-2 | 3-4 and the truncated teacher 1-2 | 3-4: layer 2's target crosses from stage 1 to stage 0.
Four processes give TP1PP1 = DP4 (one sample per rank), TP2 and TP2+SP = DP2, PP2 = DP2,
TP2xPP2 = DP1 (two microbatches of two): loss, gradients and parameters after one AdamW step
must not depend on the split.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.torchrun_utils import run_torchrun

WORKER = Path(__file__).parent / "workers" / "step_worker.py"
ALL = [[1, 1, False], [2, 1, False], [2, 1, True], [1, 2, False], [2, 2, False]]
SOME = [[1, 1, False], [2, 1, True], [2, 2, False]]
NAMES = {"TP1PP1", "TP2PP1", "TP2PP1+SP", "TP1PP2", "TP2PP2"}
BASE = {"layers": [1, 2, 3], "per_layer": True, "normalize": False, "last_k": 5}
CASES = [
    {**BASE, "name": "full-plain", "method": "oprd", "projection": "full", "layouts": ALL},
    {
        **BASE,
        "name": "shared-normalized",
        "method": "oprd",
        "projection": "full",
        "per_layer": False,
        "normalize": True,
        "layouts": ALL,
    },
    {
        **BASE,
        "name": "identity-all",
        "method": "oprd",
        "projection": "identity",
        "teacher": "teacher32",
        "layers": [1, 2, 3, 4],
        "layouts": SOME,
    },
    {
        **BASE,
        "name": "bridge",
        "method": "oprd",
        "projection": "bridge",
        "normalize": True,
        "layouts": SOME,
    },
    {
        **BASE,
        "name": "opd-top1",
        "method": "opd-top1",
        "opd": "top1",
        "projection": "full",
        "layouts": ALL,
    },
    {
        **BASE,
        "name": "opd-topk",
        "method": "opd-topk",
        "opd": "topk",
        "top_k": 5,
        "projection": "full",
        "layouts": ALL,
    },
    {
        **BASE,
        "name": "combined",
        "method": "combined",
        "opd": "topk",
        "top_k": 5,
        "mu": 10.0,
        "projection": "full",
        "normalize": True,
        "layouts": SOME,
    },
]
LR = 1e-3
# float32 Megatron vs float64 oracle. Gradients: relative to the largest gradient entry.
# Parameters after AdamW: the first step moves each entry by about lr * g / (|g| + eps), so a
# gradient error e shows as up to lr * e / eps (eps = 1e-6) on entries whose gradient is ~0.
GRAD_REL, PARAM_ABS, LOSS_REL = 2e-5, 2e-2 * LR, 1e-5


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    work = tmp_path_factory.mktemp("step")
    run_torchrun(WORKER, str(work), json.dumps({"cases": CASES}), nproc=4, timeout=900)
    data = json.loads((work / "results.json").read_text())
    print(json.dumps(data, indent=1))  # measured differences, for the record (pytest -s)
    return data


@pytest.mark.parametrize("case", [c["name"] for c in CASES])
def test_loss_grads_and_adamw_step_match_float64_oracle_at_every_layout(
    results: dict, case: str
) -> None:
    out = results[case]
    ref = out["ref"]
    expected = next(c for c in CASES if c["name"] == case)
    assert len(out["layouts"]) == len(expected["layouts"])
    assert set(out["layouts"]) <= NAMES
    for layout, got in out["layouts"].items():
        where = f"{case} {layout}"
        assert got["loss"] == pytest.approx(ref["loss"], rel=LOSS_REL, abs=1e-7), where
        assert got["oprd"] == pytest.approx(ref["oprd"], rel=LOSS_REL, abs=1e-7), where
        assert got["opd"] == pytest.approx(ref["opd"], rel=LOSS_REL, abs=1e-7), where
        for layer, value in ref["layer_loss"].items():
            assert got["layer_loss"][layer] == pytest.approx(value, rel=LOSS_REL), where
        assert got["checked_tensors"] >= 14, where
        assert got["ref_grad_abs"] <= GRAD_REL * got["ref_grad_scale"], where
        assert got["ref_proj_grad_abs"] <= GRAD_REL * got["ref_grad_scale"], where
        assert got["ref_param_abs"] <= PARAM_ABS, where
        assert got["ref_proj_param_abs"] <= PARAM_ABS, where


@pytest.mark.parametrize("case", [c["name"] for c in CASES])
def test_every_layout_equals_tp1pp1(results: dict, case: str) -> None:
    for layout, got in results[case]["layouts"].items():
        if layout == "TP1PP1":
            continue
        scale = got["ref_grad_scale"]
        assert got["base_grad_abs"] <= GRAD_REL * scale, (case, layout)
        assert got["base_proj_grad_abs"] <= GRAD_REL * scale, (case, layout)
        assert got["base_param_abs"] <= PARAM_ABS, (case, layout)


@pytest.mark.parametrize("case", ["full-plain", "identity-all", "bridge"])
def test_truncated_teacher_keeps_only_supervised_rows_without_head(
    results: dict, case: str
) -> None:
    for layout, got in results[case]["layouts"].items():
        assert got["teacher_has_output_layer"] == 0, layout
        assert got["teacher_has_final_norm"] == 0, layout
        assert got["teacher_rows_bad"] == 0, layout
        assert got["teacher_target_abs"] <= 1e-5, layout
    dtypes = results["full-plain"]["layouts"]["TP1PP1"]["teacher_target_dtypes"]
    assert dtypes == ["torch.bfloat16", "torch.float32"]  # bf16 by default, float32 on request
    assert results["bridge"]["layouts"]["TP1PP1"]["teacher_target_dtypes"] == ["torch.float32"]


def test_student_never_runs_its_output_layer(results: dict) -> None:
    for case in CASES:
        for layout, got in results[case["name"]]["layouts"].items():
            assert got["student_head_calls"] == 0, (case["name"], layout)
