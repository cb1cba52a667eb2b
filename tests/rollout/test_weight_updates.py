"""Weight updates the embedded server checks before use, SGLang's tensor payload, memory release.

Every refused update must leave the old weights serving (greedy output equal to transformers'
on the old model) and the old weight version reported.
"""

from __future__ import annotations

import base64
import io
import pickle
import re
import shutil
import sys
from multiprocessing.reduction import ForkingPickler

import httpx
import pytest
import torch
import torch.multiprocessing
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from oprd_mega.rollout.embedded_server import EmbeddedServer, ServerConfig

from .greedy_reference import transformers_greedy
from .sglang_source import (
    sglang_flattened_tensor_bucket,
    sglang_multiprocessing_serializer,
    tensor_bucket_modules,
)

PROMPT, TOKENS = [3, 9, 27, 81, 200], 8


@pytest.fixture(scope="module")
def greedy_ids(tiny_model_dir, other_model_dir):
    old = transformers_greedy(tiny_model_dir, PROMPT, TOKENS)
    new = transformers_greedy(other_model_dir, PROMPT, TOKENS)
    assert old != new  # the tests can tell the two models apart
    return {"old": old, "new": new}


@pytest.fixture(scope="module")
def new_state(other_model_dir):
    return AutoModelForCausalLM.from_pretrained(str(other_model_dir)).state_dict()


@pytest.fixture
def srv(tiny_model_dir):
    config = ServerConfig(str(tiny_model_dir), port=0, enable_memory_saver=True)
    with EmbeddedServer(config) as server:
        yield server


@pytest.fixture
def file_system_sharing():
    previous = torch.multiprocessing.get_sharing_strategy()
    torch.multiprocessing.set_sharing_strategy("file_system")
    yield
    torch.multiprocessing.set_sharing_strategy(previous)


def post(srv, path, body, status=200):
    response = httpx.post(srv.url + path, json=body, timeout=120)
    assert response.status_code == status, response.text
    return response.json()


def greedy(srv, status=200):
    body = {
        "input_ids": PROMPT,
        "sampling_params": {"max_new_tokens": TOKENS, "temperature": 0, "ignore_eos": True},
    }
    return post(srv, "/generate", body, status)


def assert_serves(srv, ids, version):
    answer = greedy(srv)
    assert answer["output_ids"] == ids
    assert answer["meta_info"]["weight_version"] == version


def sglang_payload(named_tensors, **fields):
    """The body SGLang's HTTP engine client posts (http_server_engine.py), made by SGLang's own
    MultiprocessingSerializer from the pinned wheel; one entry per TP rank (here 1)."""
    serializer = sglang_multiprocessing_serializer()
    return {
        "serialized_named_tensors": [serializer.serialize(named_tensors, output_str=True)],
        "load_format": None,
        "flush_cache": True,
        **fields,
    }


def test_update_from_tensor_with_sglangs_payload(srv, new_state, greedy_ids, file_system_sharing):
    body = sglang_payload(list(new_state.items()), weight_version="v-tensor")
    assert post(srv, "/update_weights_from_tensor", body) == {
        "success": True,
        "message": "Success",
    }
    assert_serves(srv, greedy_ids["new"], "v-tensor")


def test_update_from_tensor_accepts_a_subset_and_inline_tensors(srv, new_state):
    name = "model.layers.1.mlp.up_proj.weight"
    inline = base64.b64encode(pickle.dumps([(name, new_state[name])])).decode()
    body = {"serialized_named_tensors": [inline], "weight_version": "v-one"}
    post(srv, "/update_weights_from_tensor", body)
    assert torch.equal(dict(srv.engine.model.named_parameters())[name], new_state[name])
    assert srv.engine.weight_version == "v-one"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"serialized_named_tensors": "x"}, "serialized_named_tensors must be a non-empty list"),
        (
            {"serialized_named_tensors": ["%%"]},
            r"serialized_named_tensors\[0\] is not valid base64",
        ),
        (
            {"serialized_named_tensors": [base64.b64encode(b"junk").decode()]},
            r"serialized_named_tensors\[0\] cannot be read",
        ),
        (
            {"serialized_named_tensors": [""], "load_format": "flattened_bucket"},
            r"serialized_named_tensors\[0\] must be a base64 string|cannot be read",
        ),
        (
            {"serialized_named_tensors": ["eA=="], "load_format": "safetensors"},
            "load_format 'safetensors' is not supported",
        ),
    ],
)
def test_update_from_tensor_rejects_malformed_payloads(srv, greedy_ids, body, message):
    answer = post(srv, "/update_weights_from_tensor", body, status=400)
    assert answer["success"] is False
    assert re.search(message, answer["message"])
    assert_serves(srv, greedy_ids["old"], "default")


@pytest.fixture
def sglang_bucket(monkeypatch):
    """SGLang's FlattenedTensorBucket from the pinned wheel, picklable under its own name."""
    for name, module in tensor_bucket_modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    return sglang_flattened_tensor_bucket()


def bucket_payload(bucket_class, named_tensors, **fields):
    """What slime's update_weights_from_tensor posts: SGLang's bucket of the tensors, its
    MultiprocessingSerializer, load_format flattened_bucket."""
    bucket = bucket_class(named_tensors=named_tensors)
    data = {"flattened_tensor": bucket.get_flattened_tensor(), "metadata": bucket.get_metadata()}
    serializer = sglang_multiprocessing_serializer()
    return {
        "serialized_named_tensors": [serializer.serialize(data, output_str=True)],
        "load_format": "flattened_bucket",
        "flush_cache": True,
        **fields,
    }


def test_update_from_flattened_bucket_as_slime_sends_it(
    srv, new_state, greedy_ids, file_system_sharing, sglang_bucket
):
    named = list(new_state.items())
    half = len(named) // 2  # two requests, as slime sends one bucket per dtype group
    post(srv, "/update_weights_from_tensor", bucket_payload(sglang_bucket, named[:half]))
    assert srv.engine.weight_version == "default"
    body = bucket_payload(sglang_bucket, named[half:], weight_version="v-bucket")
    assert post(srv, "/update_weights_from_tensor", body) == {"success": True, "message": "Success"}
    assert_serves(srv, greedy_ids["new"], "v-bucket")
    served = dict(srv.engine.model.named_parameters(remove_duplicate=False))
    assert all(torch.equal(served[n], t) for n, t in named if n in served)


def test_a_damaged_flattened_bucket_is_400_and_leaves_the_old_weights(
    srv, new_state, greedy_ids, file_system_sharing, sglang_bucket
):
    bucket = sglang_bucket(named_tensors=list(new_state.items()))
    metadata = bucket.get_metadata()
    name = metadata[2].name
    metadata[2].end_idx += 4  # one float more than its shape holds
    data = {"flattened_tensor": bucket.get_flattened_tensor(), "metadata": metadata}
    serialized = sglang_multiprocessing_serializer().serialize(data, output_str=True)
    body = {"serialized_named_tensors": [serialized], "load_format": "flattened_bucket"}
    answer = post(srv, "/update_weights_from_tensor", body, status=400)
    assert answer["success"] is False and f"tensor {name}: bytes [" in answer["message"]
    assert_serves(srv, greedy_ids["old"], "default")
    body["serialized_named_tensors"] = [
        sglang_multiprocessing_serializer().serialize(list(new_state.items()), output_str=True)
    ]  # a plain list sent as a bucket
    answer = post(srv, "/update_weights_from_tensor", body, status=400)
    assert "a dict of flattened_tensor and metadata" in answer["message"]


def test_a_cuda_ipc_bucket_is_400_saying_why(srv, greedy_ids):
    class CudaHandle:  # pickles as torch's CUDA IPC rebuild, as a GPU trainer's bucket does
        def __reduce__(self):
            return (torch.multiprocessing.reductions.rebuild_cuda_tensor, ())

    buffer = io.BytesIO()
    ForkingPickler(buffer).dump({"flattened_tensor": CudaHandle(), "metadata": []})
    body = {
        "serialized_named_tensors": [base64.b64encode(buffer.getvalue()).decode()],
        "load_format": "flattened_bucket",
    }
    answer = post(srv, "/update_weights_from_tensor", body, status=400)
    assert "CUDA IPC handles, which a CPU server cannot open" in answer["message"]
    assert_serves(srv, greedy_ids["old"], "default")


def test_file_descriptor_sharing_gets_a_clear_400(srv, new_state, greedy_ids):
    """torch's default strategy shares by file descriptor: unreachable from another process."""
    previous = torch.multiprocessing.get_sharing_strategy()
    torch.multiprocessing.set_sharing_strategy("file_descriptor")
    try:
        body = sglang_payload(list(new_state.items()), weight_version="v-fd")
    finally:
        torch.multiprocessing.set_sharing_strategy(previous)
    answer = post(srv, "/update_weights_from_tensor", body, status=400)
    assert "set_sharing_strategy('file_system')" in answer["message"]
    assert_serves(srv, greedy_ids["old"], "default")


def test_a_pickled_callable_is_refused(srv):
    class Payload:
        def __reduce__(self):
            return (print, ("executed",))

    buffer = io.BytesIO()
    ForkingPickler(buffer).dump([("x", Payload())])
    body = {"serialized_named_tensors": [base64.b64encode(buffer.getvalue()).decode()]}
    answer = post(srv, "/update_weights_from_tensor", body, status=400)
    assert "builtins.print, which is not allowed" in answer["message"]


@pytest.mark.parametrize("damage", ["nan", "inf", "shape", "dtype"])
def test_update_from_tensor_checks_every_tensor(
    srv, new_state, greedy_ids, file_system_sharing, damage
):
    tensors = {n: t.clone() for n, t in new_state.items()}
    name = "model.layers.0.self_attn.v_proj.weight"
    if damage in ("nan", "inf"):
        tensors[name].view(-1)[3] = float(damage)
        message = f"tensor {name} has 1 non-finite value"
    elif damage == "shape":
        tensors[name] = tensors[name][:-1]
        message = f"tensor {name} has shape"
    else:
        tensors[name] = tensors[name].to(torch.int32)
        message = f"tensor {name} has dtype torch.int32"
    body = sglang_payload(list(tensors.items()), weight_version="v-bad")
    answer = post(srv, "/update_weights_from_tensor", body, status=400)
    assert message in answer["message"]
    assert_serves(srv, greedy_ids["old"], "default")


@pytest.mark.parametrize("damage", ["missing", "nan", "truncated"])
def test_update_from_disk_needs_every_finite_tensor(
    srv, tmp_path, other_model_dir, greedy_ids, damage
):
    target = tmp_path / "weights"
    shutil.copytree(other_model_dir, target)
    [file] = target.glob("*.safetensors")
    tensors = load_file(str(file))
    name = "model.layers.1.self_attn.o_proj.weight"
    if damage == "missing":
        del tensors[name]
        message = f"1 of the model's tensors are missing, e.g. {name}"
    elif damage == "nan":
        tensors[name][0, 0] = float("nan")
        message = f"tensor {name} has 1 non-finite value"
    else:
        message = f"{file}: not a readable safetensors file"
    save_file(tensors, str(file), metadata={"format": "pt"})
    if damage == "truncated":  # a copy cut short: 400 naming the file, never a 500
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    body = {"model_path": str(target), "weight_version": "v-disk"}
    answer = post(srv, "/update_weights_from_disk", body, status=400)
    assert answer["success"] is False and message in answer["message"]
    assert_serves(srv, greedy_ids["old"], "default")
    post(srv, "/update_weights_from_disk", {"model_path": str(other_model_dir)})
    assert_serves(srv, greedy_ids["new"], "default")


def test_release_and_resume_memory(srv, greedy_ids, new_state, file_system_sharing):
    post(srv, "/release_memory_occupation", {})
    assert all(p.numel() == 0 for p in srv.engine.model.parameters())  # the memory is given up
    refused = greedy(srv, status=503)
    assert "memory is released (cuda_graph, kv_cache, weights)" in refused["error"]["message"]
    assert "/resume_memory_occupation" in refused["error"]["message"]
    body = sglang_payload(list(new_state.items()), weight_version="v-released")
    answer = post(srv, "/update_weights_from_tensor", body, status=400)
    assert "weights are released" in answer["message"]
    post(srv, "/resume_memory_occupation", {"tags": ["weights", "kv_cache", "cuda_graph"]})
    assert_serves(srv, greedy_ids["old"], "default")  # restored exactly

    post(srv, "/release_memory_occupation", {"tags": ["kv_cache"]})
    greedy(srv, status=503)
    post(srv, "/resume_memory_occupation", {"tags": ["kv_cache"]})
    # slime's colocated order: release, train, resume, then push the new weights.
    post(srv, "/release_memory_occupation", {"tags": ["weights", "kv_cache"]})
    post(srv, "/resume_memory_occupation", {"tags": ["weights", "kv_cache"]})
    post(srv, "/update_weights_from_tensor", {**body, "weight_version": "v-after"})
    assert_serves(srv, greedy_ids["new"], "v-after")


def test_memory_tags_are_checked(srv):
    answer = post(srv, "/release_memory_occupation", {"tags": ["gpu"]}, status=400)
    assert "tags: unknown memory tag 'gpu'" in answer["error"]["message"]
    answer = post(srv, "/resume_memory_occupation", {"tags": "weights"}, status=400)
    assert "tags must be a list of strings" in answer["error"]["message"]


_RELEASE_THEN_DIE = """
import os, signal, sys
from oprd_mega.rollout.engine import GenerationEngine
engine = GenerationEngine(sys.argv[1], memory_saver=True)
engine.release_memory(["weights"])
print(engine._spilled_weights.parent, flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # no cleanup runs
"""


def test_a_killed_servers_released_weights_are_removed_by_the_next(
    tiny_model_dir, tmp_path, monkeypatch
):
    import os
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    from oprd_mega.rollout.engine import GenerationEngine

    done = subprocess.run(
        [sys.executable, "-c", _RELEASE_THEN_DIE, str(tiny_model_dir)],
        capture_output=True, text=True, timeout=240,
        env={**os.environ, "TMPDIR": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""},
    )  # fmt: skip
    assert done.returncode == -9, done.stderr[-2000:]
    left = Path(done.stdout.strip())
    assert left.parent == tmp_path and (left / "weights.safetensors").is_file()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    GenerationEngine(tiny_model_dir)  # the next server on this host
    assert not left.exists()
