"""One OPRD / OPD step under Megatron at nine student layouts (and six where the teacher has its
own), against a float64 transformers oracle.

One torchrun launch (4 gloo processes, Megatron start-up dominates) runs every case at its
layouts (52 by default, the full matrix of 87 with ``-m slow``); the tests read its results.
Student: Llama, 4 layers, hidden 32; teacher: Llama, 6 layers, hidden 48 (a hidden-32 one for
identity). Tapped student layers 1-3 pair with teacher layers 1, 3, 4 (phi), so the teacher is
truncated at 4 layers; at PP2 the student holds layers 1-2 | 3-4 and the truncated teacher
1-2 | 3-4: layer 2's target crosses from stage 1 to stage 0. Four processes give TP1PP1 = DP4
(one sample per rank), TP2 and TP2+SP = DP2, PP2 = DP2, TP2xPP2 = DP1 (two microbatches of
two), CP2 = DP2, CP2 x TP2+SP = DP1 and CP2 x PP2 = DP1 (context parallelism: each rank
holds two of the four load-balanced chunks of every sequence, packed ones too): loss, gradients
and parameters after one AdamW step must not depend on the split.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.real_shapes import REAL_SHAPED
from tests.torchrun_utils import run_torchrun

WORKER = Path(__file__).parent / "workers" / "step_worker.py"
# The one launch runs every layout (slower beside other work on the 2 cores):
# pytest's limit sits above the launch's own 1,200 s, so a slow launch fails with its output.
pytestmark = pytest.mark.timeout(1500)
# [tp, pp, sp] or [tp, pp, sp, {options}]: cp, teacher ([tp, pp] of its own), split (by hand)
CP2, CP2_TP2 = [1, 1, False, {"cp": 2}], [2, 1, True, {"cp": 2}]
CP2_PP2 = [1, 2, False, {"cp": 2}]
ALL = [
    *[[1, 1, False], [2, 1, False], [2, 1, True], [1, 2, False], [2, 2, False]],
    *[CP2, CP2_TP2, CP2_PP2],
]
SOME = [[1, 1, False], [2, 1, True], [2, 2, False]]
# The teacher on its own layout (parallel.teacher: [tp, pp]): student TP2 = DP2 with teacher
# TP1 = DP4, student PP2 = DP2 with teacher TP2 = DP2, student TP2+SP with teacher TP1. With
# OPD the teacher's head is re-split at the student's TP (1 -> 2, 2 -> 1) on its last stage.
OWN_TEACHER = [[2, 1, False, {"teacher": [1, 1]}], [1, 2, False, {"teacher": [2, 1]}]]
OWN_TEACHER_SP = [2, 1, True, {"teacher": [1, 1]}]
NAMES = {"TP1PP1", "TP2PP1", "TP2PP1+SP", "TP1PP2", "TP2PP2"}
NAMES |= {"TP1PP1CP2", "TP2PP1CP2+SP", "TP1PP2CP2"}
NAMES |= {"TP2PP1/teacher-TP1PP1", "TP1PP2/teacher-TP2PP1", "TP2PP1+SP/teacher-TP1PP1"}
# A teacher wider than the student's layout or pipelined on its own: student TP2 x PP2 (DP1)
# with the teacher at TP4 (it has 4 KV heads), student TP2 with the teacher at PP2 x DP2,
# student DP4 with the teacher at TP2 x PP2.
OWN_TEACHER_WIDE = [
    [2, 2, False, {"teacher": [4, 1]}],
    [2, 1, False, {"teacher": [1, 2]}],
    [1, 1, False, {"teacher": [2, 2]}],
]
NAMES |= {"TP2PP2/teacher-TP4PP1", "TP2PP1/teacher-TP1PP2", "TP1PP1/teacher-TP2PP2"}
# Context parallelism with the teacher on its own layout (it runs whole sequences; each CP rank
# keeps its chunks' rows): student CP2 x TP2+SP (DP1) with teacher TP1 x DP4, student CP2 x DP2
# with teacher TP2 x DP2.
CP2_TP2_OWN = [2, 1, True, {"cp": 2, "teacher": [1, 1]}]
CP2_OWN = [1, 1, False, {"cp": 2, "teacher": [2, 1]}]
NAMES |= {"TP2PP1CP2+SP/teacher-TP1PP1", "TP1PP1CP2/teacher-TP2PP1"}
BASE = {"layers": [1, 2, 3], "per_layer": True, "normalize": False, "last_k": 5}
# OPRD plus OPD top-k (k=5, mu=10), the combined objective
COMBINED_TOPK = {
    "method": "combined",
    "opd": "topk",
    "top_k": 5,
    "mu": 10.0,
    "projection": "full",
    "normalize": True,
}
CASES = [
    {
        **BASE,
        "name": "full-plain",
        "method": "oprd",
        "projection": "full",
        "layouts": ALL + OWN_TEACHER + [CP2_TP2_OWN],
    },
    {
        **BASE,
        "name": "full-plain-overlap",
        "method": "oprd",
        "projection": "full",
        "overlap_teacher": True,
        "layouts": [[1, 1, False], [2, 1, True]],
    },
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
        "layouts": [*SOME, OWN_TEACHER_SP],
    },
    {
        **BASE,
        "name": "bridge-mlp",
        "method": "oprd",
        "projection": "bridge",
        "student_map": "mlp",
        "normalize": True,
        "layouts": SOME,
    },
    {
        **BASE,
        "name": "opd-top1",
        "method": "opd-top1",
        "opd": "top1",
        "projection": "full",
        "layouts": ALL + OWN_TEACHER,
    },
    {
        **BASE,
        "name": "opd-topk",
        "method": "opd-topk",
        "opd": "topk",
        "top_k": 5,
        "projection": "full",
        "layouts": ALL + OWN_TEACHER,
    },
    {
        **BASE,
        "name": "combined",
        **COMBINED_TOPK,
        "layouts": SOME + OWN_TEACHER,
    },
    {
        **BASE,
        "name": "combined-packed",
        **COMBINED_TOPK,
        "packed": True,
        "layouts": [*ALL, CP2_OWN],
    },
]
# Real-shaped pairs (tests/real_shapes.py: source ratios, tied embeddings and RoPE fields, 3 layers,
# so PP2 splits 2 + 1): Llama-3 RoPE student with a YaRN Qwen2.5 teacher; Qwen3 (QK-norm) student
# with an untied DeepSeek-R1-Distill-Qwen teacher (QKV bias).
REAL_PAIRS = {
    "real-llama3.2-from-qwen2.5-yarn": ("llama-3.2-1b", "qwen2.5-1.5b-yarn"),
    "real-qwen3-from-r1-distill": ("qwen3-1.7b", "deepseek-r1-distill-qwen-1.5b"),
}
CASES += [
    {
        **BASE,
        "name": name,
        "method": "oprd",
        "projection": "full",
        "normalize": True,
        "student": student,
        "teacher": teacher,
        "layouts": [[1, 1, False], [2, 1, False], [1, 2, False], [2, 2, False]],
    }
    for name, (student, teacher) in REAL_PAIRS.items()
]
# Four pipeline stages (DP1): a 5-layer student and a 7-layer teacher, tapped at student
# layers 1-4 -> teacher 1, 3, 4, 6, so the teacher runs 6 layers. Automatic splits: student
# 2|1|1|1, teacher 2|1|1|2; set by hand: student 1|1|1|2, teacher 1|1|1|3.
PP4_SPLITS = {"student": {"first": 1, "last": 2}, "teacher": {"last": 3}}
PP4_NAMES = {"TP1PP4", "TP1PP4 split"}
CASES.append(
    {
        **BASE,
        "name": "pp4-uneven",
        "method": "oprd",
        "projection": "full",
        "normalize": True,
        "layers": [1, 2, 3, 4],
        "student": "student5",
        "teacher": "teacher7",
        "layouts": [[1, 4, False], [1, 4, False, {"split": PP4_SPLITS}]],
    }
)
SMALL = {"num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 117}
CASES.append(
    {
        **BASE,
        "name": "teacher-own-wide",
        "method": "oprd",
        "projection": "full",
        "normalize": True,
        "teacher": "teacher-kv4",
        "layouts": [[1, 1, False], *OWN_TEACHER_WIDE],
    }
)
# Two teachers of different widths and depths, routed per sample (one sample to each, one to
# both, one to none): "wide" (6 layers, hidden 48) taps student layers 1-3, "deep" (5 layers,
# hidden 40, loss weight 0.5) layers 2 and 4, each through its own full map. "deep" runs on its
# own layout where the layout names one (TP2 under the student's DP4, TP1 under TP2+SP, TP2
# under PP2), on the student's otherwise; "wide" always on the student's.
TWO_TEACHERS = {
    "teachers": [
        {"name": "wide", "model": "teacher", "layers": [1, 2, 3], "projection": "full"},
        {
            "name": "deep",
            "model": "teacher40",
            "layers": [2, 4],
            "projection": "full",
            "weight": 0.5,
            "own": True,
        },
    ],
    "routes": [["wide"], ["deep"], ["wide", "deep"], []],
    "projection": "full",
}
TWO_TEACHER_LAYOUTS = [
    [1, 1, False],
    [1, 1, False, {"teacher": [2, 1]}],
    [2, 1, True],
    [2, 1, True, {"teacher": [1, 1]}],
    [1, 2, False],
    [1, 2, False, {"teacher": [2, 1]}],
]
NAMES |= {"TP1PP1/teacher-TP2PP1"}
CASES += [
    {
        **BASE,
        **TWO_TEACHERS,
        "name": "two-teachers",
        "method": "oprd",
        "normalize": True,
        "layouts": TWO_TEACHER_LAYOUTS,
    },
    {
        **BASE,
        **COMBINED_TOPK,
        **TWO_TEACHERS,
        "name": "two-teachers-combined",
        "layouts": TWO_TEACHER_LAYOUTS,
    },
    {  # OPD top-1 alone: each teacher's own head on its own samples' response tokens
        **BASE,
        **TWO_TEACHERS,
        "name": "two-teachers-opd-top1",
        "method": "opd-top1",
        "opd": "top1",
        "layouts": TWO_TEACHER_LAYOUTS,
    },
    {  # distillation.overlap_teacher: each teacher on the student's layout one microbatch ahead
        # on its routed microbatches ("deep" on its own layout runs first where it has one)
        **BASE,
        **TWO_TEACHERS,
        "name": "two-teachers-overlap",
        "method": "oprd",
        "normalize": True,
        "overlap_teacher": True,
        "layouts": TWO_TEACHER_LAYOUTS[:4],
    },
]
# Activation recompute and overlapped gradient reduction: the same oracle. Full 'uniform' in
# chunks of 2 puts tapped layers 1 and 3 inside a checkpointed chunk (not its output).
CASES += [
    {
        **BASE,
        "name": "recompute-full-uniform-overlap",
        "method": "oprd",
        "projection": "full",
        "recompute": {"granularity": "full", "method": "uniform", "num_layers": 2},
        "overlap_grad_reduce": True,
        "layouts": [[2, 1, False], [2, 2, False]],
    },
    {
        **BASE,
        "name": "recompute-full-block",
        "method": "oprd",
        "projection": "full",
        "normalize": True,
        "recompute": {"granularity": "full", "method": "block", "num_layers": 1},
        "layouts": [[1, 1, False], [1, 2, False]],
    },
    {
        **BASE,
        "name": "recompute-selective-overlap",
        **COMBINED_TOPK,
        "recompute": {"granularity": "selective", "modules": ["core_attn", "mlp"]},
        "overlap_grad_reduce": True,
        "layouts": [[2, 1, True], [1, 2, False]],
    },
    {
        **BASE,
        "name": "distributed-optimizer-overlap",
        "method": "oprd",
        "projection": "full",
        "distributed_optimizer": True,
        "overlap_grad_reduce": True,
        "overlap_param_gather": True,
        "layouts": [[1, 1, False], [2, 1, False]],
    },
]
# Core-attention runs per layer and microbatch: 2 where recompute reruns it.
ATTENTION_RUNS = {
    "recompute-full-uniform-overlap": {"TP2PP1": 2.0, "TP2PP2": 2.0},
    "recompute-full-block": {"TP1PP2": 1.5, "TP1PP1": 1.25},  # 1 of 2 (1 of 4) layers
    "recompute-selective-overlap": {"TP2PP1+SP": 2.0, "TP1PP2": 2.0},
}
MODELS = {name: REAL_SHAPED[name] for pair in REAL_PAIRS.values() for name in pair}
MODELS["student5"] = {
    "family": "llama",
    "tied": False,
    "config": {
        **SMALL,
        "num_hidden_layers": 5,
        "hidden_size": 32,
        "head_dim": 8,
        "intermediate_size": 64,
    },
}
MODELS["teacher7"] = {
    "family": "llama",
    "tied": False,
    "config": {
        **SMALL,
        "num_hidden_layers": 7,
        "hidden_size": 48,
        "head_dim": 12,
        "intermediate_size": 96,
    },
}
MODELS["teacher40"] = {
    "family": "llama",
    "tied": False,
    "config": {
        **SMALL,
        "num_hidden_layers": 5,
        "hidden_size": 40,
        "head_dim": 10,
        "intermediate_size": 80,
    },
}
MODELS["teacher-kv4"] = {
    "family": "llama",
    "tied": False,
    "config": {
        **SMALL,
        "num_key_value_heads": 4,
        "num_hidden_layers": 6,
        "hidden_size": 48,
        "head_dim": 12,
        "intermediate_size": 96,
    },
}
LR = 1e-3
# float32 Megatron vs float64 oracle. Gradients: relative to the largest gradient entry.
# Parameters after AdamW: the first step moves each entry by about lr * g / (|g| + eps), so a
# gradient error e shows as up to lr * e / eps (eps = 1e-6) on entries whose gradient is ~0.
GRAD_REL, PARAM_ABS, LOSS_REL = 2e-5, 2e-2 * LR, 1e-5
# The default run: every layout for the main case, one to five for the others (52 layouts in
# one launch); the full matrix (87) runs with ``-m slow``.
FAST_LAYOUTS = {
    "full-plain": ALL + OWN_TEACHER + [CP2_TP2_OWN],
    "full-plain-overlap": [[1, 1, False], [2, 1, True]],
    "shared-normalized": [[1, 1, False], [2, 2, False]],
    "identity-all": [[2, 1, True]],
    "bridge": [[1, 1, False], [2, 1, True], OWN_TEACHER_SP],
    "bridge-mlp": [[1, 2, False], [2, 1, True]],
    "opd-top1": [[1, 1, False], [2, 2, False], CP2, OWN_TEACHER[0]],
    "opd-topk": [[1, 1, False], [2, 1, True], OWN_TEACHER[1]],
    "combined": [[2, 2, False], *OWN_TEACHER],
    "combined-packed": [[1, 1, False], [2, 1, True], [1, 2, False], CP2, CP2_TP2, CP2_OWN],
    "real-llama3.2-from-qwen2.5-yarn": [[1, 1, False], [2, 2, False]],
    "real-qwen3-from-r1-distill": [[2, 1, False], [1, 2, False]],
    "pp4-uneven": [[1, 4, False], [1, 4, False, {"split": PP4_SPLITS}]],
    "teacher-own-wide": [[1, 1, False], *OWN_TEACHER_WIDE],
    "recompute-full-uniform-overlap": [[2, 1, False]],
    "recompute-full-block": [[1, 2, False]],
    "recompute-selective-overlap": [[2, 1, True], [1, 2, False]],
    "distributed-optimizer-overlap": [[2, 1, False]],
    "two-teachers": [TWO_TEACHER_LAYOUTS[i] for i in (0, 1, 3, 5)],
    "two-teachers-combined": [TWO_TEACHER_LAYOUTS[i] for i in (0, 3, 5)],
    "two-teachers-opd-top1": [TWO_TEACHER_LAYOUTS[i] for i in (0, 3)],
    "two-teachers-overlap": [TWO_TEACHER_LAYOUTS[i] for i in (2, 3)],
}
SUITES = {
    "fast": [{**case, "layouts": FAST_LAYOUTS[case["name"]]} for case in CASES],
    "full": CASES,
}


@pytest.fixture(scope="module", params=["fast", pytest.param("full", marks=pytest.mark.slow)])
def suite(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """(cases, results) of one launch."""
    cases = SUITES[request.param]
    work = tmp_path_factory.mktemp(f"step-{request.param}")
    plan = {"cases": cases, "models": MODELS}
    run_torchrun(WORKER, str(work), json.dumps(plan), nproc=4, timeout=1200)
    data = json.loads((work / "results.json").read_text())
    print(json.dumps(data, indent=1))  # measured differences, for the record (pytest -s)
    return cases, data


def test_loss_grads_and_adamw_step_match_float64_oracle_at_every_layout(suite) -> None:
    cases, results = suite
    for case in cases:
        out = results[case["name"]]
        ref = out["ref"]
        assert len(out["layouts"]) == len(case["layouts"])
        assert set(out["layouts"]) <= NAMES | PP4_NAMES
        for layout, got in out["layouts"].items():
            where = f"{case['name']} {layout}"
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


def test_two_routed_teachers_each_match_the_oracle_and_checkpoint_their_maps(suite) -> None:
    """Each teacher's own loss (over the samples routed to it) equals the oracle's, both
    teachers' maps are optimised, and a torch_dist round trip at PP2 restores both (the
    loss, gradient and AdamW checks above cover the combined objective)."""
    _, results = suite
    for case in (
        "two-teachers",
        "two-teachers-combined",
        "two-teachers-opd-top1",
        "two-teachers-overlap",
    ):
        ref = results[case]["ref"]["teacher_loss"]
        assert set(ref) == {"wide", "deep"} and ref["wide"] != pytest.approx(ref["deep"])
        for layout, got in results[case]["layouts"].items():
            for name, value in ref.items():
                assert got["teacher_loss"][name] == pytest.approx(value, rel=LOSS_REL), (
                    case,
                    layout,
                    name,
                )
            # samples 0 and 2 (wide), 1 and 2 (deep): last_k = 5 positions, 4 in sample 1
            assert got["teacher_supervised"] == {"wide": 10, "deep": 9}, (case, layout)
            # the global batch's tokens supervised by any teacher (sample 3 by none), and each
            # teacher's microbatches, summed over the data-parallel ranks
            assert got["supervised"] == 14, (case, layout)
            routed = got["teacher_microbatches"]
            assert routed["wide"] >= 2 and routed["deep"] >= 2, (case, layout)
            if case == "two-teachers-opd-top1":
                continue  # no representation loss: no maps
            assert got["projection_in_optimizer"] == 1, (case, layout)
            assert got["checked_tensors"] >= 16, (case, layout)
            if "PP2" in layout:
                assert got["checkpoint_restores_projection"] == 1, (case, layout)


def test_every_layout_equals_tp1pp1(suite) -> None:
    """TP1PP1 runs first where a case has it: the layouts after it compare with its export."""
    cases, results = suite
    for case in cases:
        assert [1, 1, False] not in case["layouts"][1:], case["name"]
    compared = set()
    for case in cases:
        layouts = results[case["name"]]["layouts"]
        if "TP1PP1" not in layouts:
            continue
        for layout, got in layouts.items():
            if layout == "TP1PP1":
                continue
            scale = got["ref_grad_scale"]
            assert got["base_grad_abs"] <= GRAD_REL * scale, (case["name"], layout)
            assert got["base_proj_grad_abs"] <= GRAD_REL * scale, (case["name"], layout)
            assert got["base_param_abs"] <= PARAM_ABS, (case["name"], layout)
            compared.add(layout)
    assert compared == NAMES - {"TP1PP1"}


def test_four_stages_hold_the_automatic_and_the_hand_set_splits(suite) -> None:
    """The layers each stage built (global numbers), as Megatron placed them; the oracle test
    above checked the step at both."""
    _, results = suite
    layouts = results["pp4-uneven"]["layouts"]
    assert layouts["TP1PP4"]["stage_layers"] == {
        "student": [[1, 2], [3], [4], [5]],
        "teacher": [[1, 2], [3], [4], [5, 6]],
    }
    assert layouts["TP1PP4 split"]["stage_layers"] == {
        "student": [[1], [2], [3], [4, 5]],
        "teacher": [[1], [2], [3], [4, 5, 6]],
    }
    for got in layouts.values():  # torch_dist save + load at the uneven split
        assert got["checkpoint_restores_projection"] == 1


def test_truncated_teacher_keeps_only_supervised_rows_without_head(suite) -> None:
    _, results = suite
    for case in ("full-plain", "identity-all", "bridge"):
        for layout, got in results[case]["layouts"].items():
            assert got["teacher_has_output_layer"] == 0, (case, layout)
            assert got["teacher_has_final_norm"] == 0, (case, layout)
            assert got["teacher_rows_bad"] == 0, (case, layout)
            assert got["teacher_target_abs"] <= 1e-5, (case, layout)
    dtypes = results["full-plain"]["layouts"]["TP1PP1"]["teacher_target_dtypes"]
    assert dtypes == ["torch.bfloat16", "torch.float32"]  # bf16 by default, float32 on request
    assert results["bridge"]["layouts"]["TP1PP1"]["teacher_target_dtypes"] == ["torch.float32"]


def test_teacher_on_its_own_layout_computes_in_its_own_groups(suite) -> None:
    """parallel.teacher: the teacher's model holds its own TP/PP groups (the loss, gradient and
    AdamW checks above hold for these layouts too); the student's layout holds the rest."""
    cases, results = suite
    seen = 0
    for case in cases:
        for layout, got in results[case["name"]]["layouts"].items():
            student, _, teacher = layout.partition("/teacher-")
            sizes = teacher or student.removesuffix("+SP")
            assert got["teacher_groups"] == [int(sizes[2]), int(sizes[5])], (case, layout)
            seen += bool(teacher)
    own = [
        layout
        for case in cases
        for layout in case["layouts"]
        if isinstance(layout[-1], dict) and "teacher" in layout[-1]
    ]
    assert seen == len(own) >= 12


def test_overlapped_teacher_runs_one_microbatch_ahead(suite) -> None:
    """distillation.overlap_teacher: the teacher's microbatch i+1 starts after the student's
    forward of i (without it every teacher forward comes first); the oracle checks above hold."""
    _, results = suite
    layouts = results["full-plain-overlap"]["layouts"]
    assert layouts["TP1PP1"]["call_order"] == "ts"  # DP4: one microbatch per rank
    assert layouts["TP2PP1+SP"]["call_order"] == "tsts"  # DP2: two
    assert results["full-plain"]["layouts"]["TP2PP1"]["call_order"] == "ttss"
    # Two routed teachers (t: "wide", u: "deep"); rank 0 holds microbatch 0 (routed to wide)
    # and 1 (to deep). Each teacher runs ahead on its own microbatches: deep's starts after the
    # student's forward of 0. On its own layout deep runs first (a collective over the world),
    # wide still ahead; without overlap both teachers run before the student.
    two = results["two-teachers-overlap"]["layouts"]
    assert two["TP2PP1+SP"]["call_order"] == "tsus"
    assert two["TP2PP1+SP/teacher-TP1PP1"]["call_order"] == "utss"
    assert results["two-teachers"]["layouts"]["TP2PP1+SP/teacher-TP1PP1"]["call_order"] == "tuss"


def test_student_never_runs_its_output_layer(suite) -> None:
    cases, results = suite
    for case in cases:
        for layout, got in results[case["name"]]["layouts"].items():
            assert got["student_head_calls"] == 0, (case["name"], layout)


def test_weight_sync_probe_gives_full_sequence_logits_at_every_layout(suite) -> None:
    """The probe's Megatron forward (context-parallel chunks gathered back in order) against
    the float64 oracle's logits of the same sequence."""
    cases, results = suite
    for case in cases:
        for layout, got in results[case["name"]]["layouts"].items():
            assert got["probe_logits_abs"] <= 1e-4, (case["name"], layout)


def test_full_projection_is_optimised_and_checkpointed(suite) -> None:
    _, results = suite
    checkpointed = 0
    for case in ("full-plain", "shared-normalized", "combined"):
        for layout, got in results[case]["layouts"].items():
            assert got["projection_in_optimizer"] == 1, (case, layout)
            if "PP2" in layout:  # torch_dist save + load restores every stage's maps
                assert got["checkpoint_restores_projection"] == 1, (case, layout)
                checkpointed += 1
    assert checkpointed >= 3


def test_recompute_reruns_and_overlap_dispatches_during_backward(suite) -> None:
    """The parity above holds while Megatron really recomputes and really overlaps."""
    cases, results = suite
    checked = 0
    for case in cases:
        for layout, got in results[case["name"]]["layouts"].items():
            want = ATTENTION_RUNS.get(case["name"], {}).get(layout, 1.0)
            assert got["attention_runs_per_layer"] == want, (case["name"], layout)
            checked += want != 1.0
            if not case.get("overlap_grad_reduce"):
                continue
            if case["method"] == "oprd":  # the unused output layer holds the last stage back
                assert got["late"] >= 1, (case["name"], layout)
            else:  # every backbone parameter has a gradient: reduced during backward
                assert got["early"] >= 1, (case["name"], layout)
    assert checked >= 3
