"""Requests that need a GPU on SGLang get what a CPU can give, or a clear 400: /weights_checker
with SGLang's own checksum functions (from the pinned wheel) over transformers' model, an NCCL
weight-update group, /post_process_weights."""

from __future__ import annotations

import ast
import hashlib

import httpx
import pytest
import torch

from oprd_mega.rollout import weight_checker
from oprd_mega.rollout.embedded_server import EmbeddedServer, ServerConfig

from .sglang_source import sglang_function
from .test_control_surface import IO_STRUCT, class_fields, source_tree

WEIGHT_CHECKER = "sglang/srt/utils/weight_checker.py"


@pytest.fixture
def srv(tiny_model_dir):
    with EmbeddedServer(ServerConfig(str(tiny_model_dir), port=0)) as server:
        yield server


def sglang_checksums(model: torch.nn.Module) -> tuple[dict[str, str], str, str]:
    """Per-tensor, per-rank and per-engine checksums of ``model`` as SGLang computes them on a
    CPU, with its own ``tensor_hash`` and ``overall_checksum``."""
    tensor_hash = sglang_function(
        "sglang/srt/managers/mm_utils.py",
        "tensor_hash",
        {"hashlib": hashlib, "torch": torch, "flatten_nested_list": None, "gpu_tensor_hash": None},
    )
    overall = sglang_function(WEIGHT_CHECKER, "overall_checksum", {"hashlib": hashlib})
    tree = source_tree(WEIGHT_CHECKER)
    patterns = next(
        ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign)
        and getattr(node.targets[0], "id", "") == "_NON_PERSISTENT_BUFFER_PATTERNS"
    )
    named = [*model.named_parameters(), *model.named_buffers()]
    checksums = {
        name: f"{tensor_hash(t):016x}" for name, t in named if not any(p in name for p in patterns)
    }
    per_rank = overall(checksums)
    return checksums, per_rank, hashlib.sha256(per_rank.encode()).hexdigest()


def test_checksums_are_sglangs_over_the_served_weights(
    srv, reference_model, other_model_dir, other_model
):
    answer = httpx.post(srv.url + "/weights_checker", json={"action": "checksum"}, timeout=60)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    checksums, per_rank, per_engine = sglang_checksums(reference_model)
    assert body["success"] is True and body["message"] == "Success."
    (rank,) = body["ranks"]
    assert rank["checksums"] == checksums and len(checksums) > 5
    assert rank["per_gpu_checksum"] == per_rank and body["per_engine_checksum"] == per_engine
    io_struct = source_tree(IO_STRUCT)
    assert set(rank) == class_fields(io_struct, "ChecksumInfo")
    assert set(rank["parallelism_info"][0]) == class_fields(io_struct, "ParallelismInfo")
    # GET with no body is SGLang's default action; after an update, the new weights' sums.
    assert httpx.get(srv.url + "/weights_checker", timeout=60).json() == body
    update = {"model_path": str(other_model_dir), "weight_version": "v2"}
    assert httpx.post(srv.url + "/update_weights_from_disk", json=update, timeout=60).is_success
    after = httpx.post(srv.url + "/weights_checker", json={}, timeout=60).json()
    assert after["ranks"][0]["checksums"] == sglang_checksums(other_model)[0]
    skipped = httpx.post(
        srv.url + "/weights_checker", json={"skip_tensor_list": ["mlp"]}, timeout=60
    ).json()
    assert skipped["ranks"][0]["checksums"] == {
        n: c for n, c in after["ranks"][0]["checksums"].items() if "mlp" not in n
    }


def test_snapshot_compare_and_reset(srv):
    def check(body, status=200):
        answer = httpx.post(srv.url + "/weights_checker", json=body, timeout=60)
        assert answer.status_code == status, answer.text
        return answer.json()

    assert check({"action": "compare"}, 400)["message"].endswith("needs action snapshot first")
    check({"action": "snapshot"})
    assert check({"action": "compare"}) == {"success": True, "message": "Success."}
    check({"action": "snapshot"})
    check({"action": "reset_tensors", "skip_tensor_list": ["layers.1"]})
    failed = check({"action": "compare"}, 400)
    assert failed["success"] is False and "differ from the snapshot" in failed["message"]
    assert "model.layers.0." in failed["message"] and "model.layers.1." not in failed["message"]
    assert check({"selector": "draft"}) == {"success": True, "message": "Success."}


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"action": "fingerprint"}, "action must be one of checksum, snapshot"),
        ({"selector": "both"}, "selector must be one of target, draft, all"),
        ({"action": 3}, "field action must be a string"),
        ({"skip_tensor_list": "mlp"}, "field skip_tensor_list must be a list of strings"),
    ],
)
def test_bad_weights_checker_requests_are_400_naming_the_field(srv, body, needle):
    answer = httpx.post(srv.url + "/weights_checker", json=body, timeout=30)
    assert answer.status_code == 400 and needle in answer.text


def test_nccl_group_is_400_naming_gloo(srv):
    body = {
        "master_address": "127.0.0.1",
        "master_port": 29999,
        "rank_offset": 1,
        "world_size": 2,
        "group_name": "g",
        "backend": "nccl",  # what a GPU trainer sends
    }
    answer = httpx.post(srv.url + "/init_weights_update_group", json=body, timeout=30)
    assert answer.status_code == 400
    assert answer.json()["success"] is False
    assert "backend 'nccl'" in answer.json()["message"] and "'gloo'" in answer.json()["message"]


def test_post_process_weights_is_answered(srv):
    for body in ({}, {"restore_weights_before_load": True, "post_process_quantization": False}):
        answer = httpx.post(srv.url + "/post_process_weights", json=body, timeout=30)
        assert answer.status_code == 200 and answer.json()["success"] is True
    bad = httpx.post(
        srv.url + "/post_process_weights", json={"post_process_quantization": "yes"}, timeout=30
    )
    assert bad.status_code == 400 and "field post_process_quantization" in bad.text


def test_checksum_functions_match_on_bfloat16():
    tensor = torch.linspace(-3, 3, 37).to(torch.bfloat16).reshape(37, 1)
    want = hashlib.sha256(tensor.view(torch.int16).numpy().tobytes()).digest()[:8].hex()
    assert weight_checker.tensor_checksum(tensor) == want
