"""The embedded server's control surface (abort, pause/continue, loads, server info) and its
request checks, against SGLang 0.5.23's own source from the pinned wheel and transformers."""

from __future__ import annotations

import ast
import json
import math
import os
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import httpx
import pytest
import torch

from oprd_mega.rollout.embedded_server import BODY_FIELDS, EmbeddedServer, ServerConfig
from oprd_mega.rollout.engine import PAUSE_MODES

from .sglang_schema import fetch_member, load_schema
from .test_embedded_server import reference_logprobs

IO_STRUCT = "sglang/srt/managers/io_struct.py"
LOAD_SNAPSHOT = "sglang/srt/managers/load_snapshot.py"
SERVER_ARGS_FIELDS = [
    f"sglang/srt/arg_groups/fields/{name}.py"
    for name in (
        "device", "disagg", "exec_", "lora", "memory", "mm", "model", "observability",
        "parallel", "schedule", "serving", "spec",
    )
]  # fmt: skip
# The SGLang request class behind each POST endpoint (sglang/srt/entrypoints/http_server.py).
REQUEST_CLASSES = {
    "/generate": "GenerateReqInput",
    "/abort_request": "AbortReq",
    "/pause_generation": "PauseGenerationReqInput",
    "/continue_generation": "ContinueGenerationReqInput",
    "/update_weights_from_disk": "UpdateWeightFromDiskReqInput",
    "/init_weights_update_group": "InitWeightsUpdateGroupReqInput",
    "/update_weights_from_distributed": "UpdateWeightsFromDistributedReqInput",
    "/destroy_weights_update_group": "DestroyWeightsUpdateGroupReqInput",
    "/update_weight_version": "UpdateWeightVersionReqInput",
    "/weights_checker": "CheckWeightsReqInput",
}
LONG = 200  # max_new_tokens of a request that is still decoding when the test acts on it
STEP_S = 0.02  # the least time of one forward in the paced servers below


def _skip_without_wheel(load: Callable):
    try:
        return load()
    except (subprocess.SubprocessError, OSError) as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"cannot fetch the sglang wheel: {exc}")


@pytest.fixture(scope="module")
def schema():
    return _skip_without_wheel(load_schema)


def source_tree(member: str) -> ast.Module:
    return ast.parse(_skip_without_wheel(lambda: fetch_member(member)).read_text())


def class_fields(tree: ast.Module, name: str) -> set[str]:
    """Annotated field names of class ``name`` and of its bases defined in the same module."""
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    node = classes[name]
    fields = {
        s.target.id
        for s in node.body
        if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)
    }
    for base in node.bases:
        if isinstance(base, ast.Name) and base.id in classes:
            fields |= class_fields(tree, base.id)
    return fields


def field_annotation(tree: ast.Module, cls: str, field: str) -> ast.expr:
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
    return next(
        s.annotation
        for s in node.body
        if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name) and s.target.id == field
    )


# ----- helpers -----


def post(url: str, path: str, body, status: int = 200):
    response = httpx.post(url + path, json=body, timeout=120)
    assert response.status_code == status, response.text
    return response


def start(url: str, body: dict) -> Future:
    """POST /generate in the background; the future resolves to the JSON answer."""
    pool = ThreadPoolExecutor(1)
    future = pool.submit(lambda: post(url, "/generate", body).json())
    pool.shutdown(wait=False)
    return future


def loads(url: str) -> dict:
    return httpx.get(url + "/v1/loads?include=core", timeout=30).json()["loads"][0]


def wait_until(condition: Callable[[], bool], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def wait_generated(srv: EmbeddedServer, prompt_len: int, tokens: int) -> None:
    """Wait until the running sequences hold ``prompt_len + tokens`` tokens (prompt and output)."""
    wait_until(lambda: srv.engine.load()["num_used_tokens"] >= prompt_len + tokens)


def paced(srv: EmbeddedServer) -> EmbeddedServer:
    """Make every forward of the server's model take at least STEP_S, so that a test can act
    while a request is decoding, whatever the machine's speed (the results are unchanged)."""
    forward = srv.engine.model.forward

    def slow_forward(*args, **kwargs):
        time.sleep(STEP_S)
        return forward(*args, **kwargs)

    srv.engine.model.forward = slow_forward
    return srv


def long_body(rid: str, max_new_tokens: int = LONG, **params) -> dict:
    return {
        "rid": rid,
        "input_ids": [5, 6, 7],
        "sampling_params": {"max_new_tokens": max_new_tokens, "ignore_eos": True, **params},
        "return_logprob": True,
    }


def model_logprobs(model, prompt: list[int], output: list[int]) -> tuple[list[float], list[int]]:
    """Each output token's log-prob and the argmax at its position, from one full forward."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + output])).logits[0].double()
    rows = torch.log_softmax(logits, dim=-1)[len(prompt) - 1 : len(prompt) + len(output) - 1]
    return [float(rows[i, t]) for i, t in enumerate(output)], rows.argmax(-1).tolist()


@pytest.fixture
def fresh_server(tiny_model_dir):
    with EmbeddedServer(ServerConfig(str(tiny_model_dir), port=0, seed=5)) as srv:
        yield paced(srv)


@pytest.fixture
def one_slot_server(tiny_model_dir):
    """A paced server that decodes one sequence at a time, so a second one waits."""
    with EmbeddedServer(ServerConfig(str(tiny_model_dir), port=0, seed=5, max_batch_size=1)) as srv:
        yield paced(srv)


# ----- /abort_request -----


def test_abort_all_ends_running_and_queued_requests_keeping_their_tokens(
    one_slot_server, reference_model, schema
):
    url = one_slot_server.url
    running = start(url, long_body("a", sampling_seed=3))
    wait_generated(one_slot_server, 3, 2)
    queued = start(url, long_body("b"))  # waits: the one batch slot is taken
    wait_until(lambda: loads(url)["num_waiting_reqs"] == 1)
    body = {"abort_all": True}
    schema.AbortRequest.from_json_value(body)
    response = post(url, "/abort_request", body)
    assert response.content == b""  # SGLang answers a bare 200
    a, b = running.result(timeout=60), queued.result(timeout=60)
    for answer in (a, b):
        decoded = schema.GenerateResponse.from_json_value(answer)
        assert isinstance(decoded.meta_info.finish_reason, schema.FinishAbort)
        assert answer["meta_info"]["finish_reason"]["type"] == "abort"
    assert a["meta_info"]["id"] == "a" and b["meta_info"]["id"] == "b"
    assert 2 <= len(a["output_ids"]) < LONG
    assert a["meta_info"]["completion_tokens"] == len(a["output_ids"])
    got = [entry[0] for entry in a["meta_info"]["output_token_logprobs"]]
    want = reference_logprobs(reference_model, [5, 6, 7], a["output_ids"])
    assert got == pytest.approx(want, abs=2e-4)
    assert b["output_ids"] == [] and b["meta_info"]["completion_tokens"] == 0
    assert loads(url)["num_running_reqs"] == loads(url)["num_waiting_reqs"] == 0


def test_abort_by_rid_matches_its_samples_only(fresh_server, schema):
    url = fresh_server.url
    group = start(url, dict(long_body("grp"), sampling_params={"max_new_tokens": LONG, "n": 2}))
    wait_generated(fresh_server, 6, 2)  # two sequences of 3 prompt tokens
    post(url, "/abort_request", {"rid": "nothing"})  # no such request: no effect
    post(url, "/abort_request", {"rid": ""})  # SGLang ignores an empty rid without abort_all
    other = start(url, long_body("keep", max_new_tokens=40))
    wait_until(lambda: fresh_server.engine.load()["num_running_reqs"] == 3)  # joined the batch
    post(url, "/abort_request", {"rid": "grp"})  # SGLang names n samples rid_k; prefix match
    answers = group.result(timeout=60)
    assert [a["meta_info"]["id"] for a in answers] == ["grp_0", "grp_1"]
    assert all(a["meta_info"]["finish_reason"]["type"] == "abort" for a in answers)
    kept = other.result(timeout=60)
    assert kept["meta_info"]["finish_reason"] == {"type": "length", "length": 40}
    schema.GenerateResponse.from_json_value(kept)


# ----- /pause_generation and /continue_generation -----


def test_pause_modes_are_sglangs():
    tree = source_tree(IO_STRUCT)
    annotation = field_annotation(tree, "PauseGenerationReqInput", "mode")
    assert isinstance(annotation, ast.Subscript) and ast.unparse(annotation.value) == "Literal"
    assert set(PAUSE_MODES) == {e.value for e in annotation.slice.elts}


def test_pause_abort_mode_aborts_and_holds_new_requests(fresh_server):
    url = fresh_server.url
    running = start(url, long_body("a"))
    wait_generated(fresh_server, 3, 1)
    answer = post(url, "/pause_generation", {}).json()  # slime posts {}: mode abort
    assert answer == {"message": "Generation paused successfully.", "status": "ok"}
    assert running.result(timeout=60)["meta_info"]["finish_reason"]["type"] == "abort"
    later = start(url, long_body("b", max_new_tokens=3))
    time.sleep(0.3)
    assert not later.done()
    assert loads(url)["num_waiting_reqs"] == 1 and loads(url)["num_running_reqs"] == 0
    answer = post(url, "/continue_generation", {}).json()
    assert answer == {"message": "Generation continued successfully.", "status": "ok"}
    assert later.result(timeout=60)["meta_info"]["finish_reason"] == {"type": "length", "length": 3}


def test_pause_retract_resumes_with_the_new_weights(
    fresh_server, other_model_dir, reference_model, other_model
):
    url, total = fresh_server.url, 24
    running = start(url, long_body("a", max_new_tokens=total, temperature=0))
    wait_generated(fresh_server, 3, 3)
    post(url, "/pause_generation", {"mode": "retract"})
    load = loads(url)
    assert load["num_running_reqs"] == 0 and load["num_waiting_reqs"] == 1
    # A weight update while paused happens at once, the retracted request still waiting.
    update = {"model_path": str(other_model_dir), "weight_version": "v2"}
    assert post(url, "/update_weights_from_disk", update).json()["success"] is True
    assert not running.done()
    post(url, "/continue_generation", {})
    answer = running.result(timeout=120)
    ids = answer["output_ids"]
    assert answer["meta_info"]["finish_reason"] == {"type": "length", "length": total}
    assert answer["meta_info"]["weight_version"] == "v2"
    got = [entry[0] for entry in answer["meta_info"]["output_token_logprobs"]]
    old_lp, old_argmax = model_logprobs(reference_model, [5, 6, 7], ids)
    new_lp, new_argmax = model_logprobs(other_model, [5, 6, 7], ids)
    # The tokens before the retract come from the old weights, all after it from the new ones.
    split = next(k for k in range(total) if abs(got[k] - old_lp[k]) > 1e-4)
    assert 3 <= split < total
    assert ids[:split] == old_argmax[:split] and ids[split:] == new_argmax[split:]
    assert got[split:] == pytest.approx(new_lp[split:], abs=2e-4)


def test_pause_in_place_holds_the_sequence_and_lets_an_update_through(
    fresh_server, other_model_dir, reference_model
):
    url, total = fresh_server.url, 24
    running = start(url, long_body("a", max_new_tokens=total, temperature=0))
    wait_generated(fresh_server, 3, 3)
    post(url, "/pause_generation", {"mode": "in_place"})  # returns once the loop is held
    held = loads(url)
    time.sleep(0.3)
    assert loads(url)["num_used_tokens"] == held["num_used_tokens"]  # no step while paused
    assert held["num_running_reqs"] == 1
    update = {"model_path": str(other_model_dir), "weight_version": "v2"}
    assert post(url, "/update_weights_from_disk", update).json()["success"] is True
    assert not running.done()
    post(url, "/continue_generation", {})
    answer = running.result(timeout=120)
    assert answer["meta_info"]["finish_reason"] == {"type": "length", "length": total}
    generated_before = held["num_used_tokens"] - 3
    _, old_argmax = model_logprobs(reference_model, [5, 6, 7], answer["output_ids"])
    prefix = answer["output_ids"][:generated_before]
    assert prefix == old_argmax[:generated_before]


def test_update_without_pause_waits_for_in_flight_decoding(
    fresh_server, other_model_dir, reference_model
):
    url = fresh_server.url
    running = start(url, long_body("a", max_new_tokens=12, temperature=0))
    wait_generated(fresh_server, 3, 1)
    update = {"model_path": str(other_model_dir), "weight_version": "v2"}
    assert post(url, "/update_weights_from_disk", update).json()["success"] is True
    answer = running.result(timeout=60)
    assert answer["meta_info"]["finish_reason"] == {"type": "length", "length": 12}
    assert answer["meta_info"]["weight_version"] == "default"
    got = [entry[0] for entry in answer["meta_info"]["output_token_logprobs"]]
    want, _ = model_logprobs(reference_model, [5, 6, 7], answer["output_ids"])
    assert got == pytest.approx(want, abs=2e-4)


def test_update_with_abort_all_requests_ends_in_flight_decoding(fresh_server, other_model_dir):
    url = fresh_server.url
    running = start(url, long_body("a"))
    wait_generated(fresh_server, 3, 1)
    update = {
        "model_path": str(other_model_dir),
        "weight_version": "v2",
        "abort_all_requests": True,
    }
    assert post(url, "/update_weights_from_disk", update).json()["success"] is True
    answer = running.result(timeout=60)
    assert answer["meta_info"]["finish_reason"]["type"] == "abort"
    assert answer["meta_info"]["weight_version"] == "default"  # ended before the update
    assert len(answer["output_ids"]) < LONG


# ----- /server_info, /get_server_info, /v1/loads -----


def test_server_info_reports_sglangs_server_arguments(server, schema):
    info = httpx.get(server.url + "/server_info").json()
    assert info.keys() == httpx.get(server.url + "/get_server_info").json().keys()
    schema.GetServerInfoResponse.from_json_value(info)
    server_args: set[str] = set()
    for member in SERVER_ARGS_FIELDS:
        tree = source_tree(member)
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                server_args |= class_fields(tree, node.name)
    ours = set(server.server_args())
    assert ours <= server_args, ours - server_args
    for key in ("tp_size", "dp_size", "pp_size", "ep_size"):
        assert info[key] == 1
    assert info["enable_memory_saver"] is False  # not started with --enable-memory-saver
    assert info["random_seed"] == 1234 and info["max_running_requests"] == 32
    assert info["context_length"] == info["max_context_length"] == 512


def test_memory_saver_is_reported_and_only_it_frees_memory(tiny_model_dir, reference_model):
    body = {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 4, "temperature": 0}}
    for saver in (False, True):
        config = ServerConfig(str(tiny_model_dir), port=0, enable_memory_saver=saver)
        with EmbeddedServer(config) as srv:
            assert httpx.get(srv.url + "/server_info").json()["enable_memory_saver"] is saver
            post(srv.url, "/release_memory_occupation", {})
            freed = all(p.numel() == 0 for p in srv.engine.model.parameters())
            assert freed is saver
            if not saver:  # as SGLang without the saver: nothing freed, generation goes on
                answer = post(srv.url, "/generate", body).json()
                _, argmax = model_logprobs(reference_model, [5, 6, 7], answer["output_ids"])
                assert answer["output_ids"] == argmax
            post(srv.url, "/resume_memory_occupation", {})
            assert all(p.numel() > 0 for p in srv.engine.model.parameters())


def test_loads_answer_sglangs_fields(server):
    snapshot_fields = class_fields(source_tree(LOAD_SNAPSHOT), "LoadSnapshot")
    answer = httpx.get(server.url + "/v1/loads?include=core").json()
    assert {"timestamp", "version", "accelerator", "num_accelerators", "loads"} <= answer.keys()
    assert set(answer["loads"][0]) <= snapshot_fields, set(answer["loads"][0]) - snapshot_fields
    bad = httpx.get(server.url + "/v1/loads?include=core,gpu")
    assert bad.status_code == 400 and "include" in bad.json()["error"]["message"]
    text = httpx.get(server.url + "/v1/loads?format=prometheus").text
    assert 'sglang_num_running_reqs{dp_rank="0"} 0' in text


# ----- malformed bodies (every POST endpoint) -----


def test_body_fields_are_sglangs():
    tree = source_tree(IO_STRUCT)
    assert set(REQUEST_CLASSES) == set(BODY_FIELDS)
    for path, fields in BODY_FIELDS.items():
        theirs = class_fields(tree, REQUEST_CLASSES[path])
        assert set(fields) <= theirs, (path, set(fields) - theirs)


def _wrong_value(spec: str):
    return 12.5 if "object" not in spec else "text"


def _valid_value(spec: str):
    kind = spec.rstrip("!").split("|")[0]
    return {"str": "x", "int": 1, "bool": True, "str_list": ["x"], "int_lists": [[1]]}[kind]


CASES = [(path, name) for path, fields in BODY_FIELDS.items() for name in fields]


@pytest.mark.parametrize(("path", "field"), CASES, ids=[f"{p}:{f}" for p, f in CASES])
def test_malformed_field_is_400_naming_it(server, path, field):
    fields = BODY_FIELDS[path]
    body = {n: _valid_value(s) for n, s in fields.items() if s.endswith("!")}
    body[field] = _wrong_value(fields[field])
    response = httpx.post(server.url + path, json=body, timeout=30)
    assert response.status_code == 400, response.text
    assert f"field {field} must be" in response.text and path in response.text


@pytest.mark.parametrize("path", sorted(BODY_FIELDS))
def test_non_object_or_incomplete_body_is_400(server, path):
    response = httpx.post(server.url + path, json=[1, 2], timeout=30)
    assert response.status_code == 400 and "JSON object" in response.text
    response = httpx.post(server.url + path, content=b"{not json", timeout=30)
    assert response.status_code == 400 and "not valid JSON" in response.text
    required = [n for n, s in BODY_FIELDS[path].items() if s.endswith("!")]
    if required:
        response = httpx.post(server.url + path, json={}, timeout=30)
        assert response.status_code == 400 and f"field {required[0]} is required" in response.text


def test_pause_with_an_unknown_mode_is_400(server):
    response = httpx.post(server.url + "/pause_generation", json={"mode": "sleep"}, timeout=30)
    assert response.status_code == 400 and "mode must be one of" in response.text


# ----- bounds and non-finite values (#18 item 6), custom_params -----


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"input_ids": [1], "sampling_params": {"n": 20000}}, "sampling_params.n must be in"),
        ({"input_ids": [[1]] * 40, "sampling_params": {"n": 200}}, "more than 4096 sequences"),
        ({"input_ids": [1], "sampling_params": {"temperature": math.nan}}, "temperature"),
        ({"input_ids": [1], "sampling_params": {"temperature": math.inf}}, "temperature"),
        ({"input_ids": [1], "sampling_params": {"top_p": math.nan}}, "top_p"),
        ({"input_ids": [1], "sampling_params": {"min_p": -math.inf}}, "min_p"),
        ({"input_ids": [1], "return_logprob": True, "top_logprobs_num": 10**9}, "top_logprobs"),
        ({"input_ids": [1], "return_logprob": True, "top_logprobs_num": -1}, "top_logprobs"),
        ({"input_ids": [1], "logprob_start_len": -5}, "logprob_start_len"),
        ({"input_ids": [1], "sampling_params": {"custom_params": "x"}}, "custom_params"),
        ({"input_ids": [[1], [2]], "rid": ["a"]}, "rid has 1 entries for 2 prompts"),
    ],
)
def test_out_of_bounds_requests_are_400(server, body, needle):
    started = time.monotonic()
    response = httpx.post(server.url + "/generate", content=json.dumps(body), timeout=30)
    assert response.status_code == 400, response.text
    assert needle in response.json()["error"]["message"]
    assert time.monotonic() - started < 10  # refused, not generated


def test_custom_params_are_accepted_and_ignored(server):
    params = {"max_new_tokens": 6, "top_p": 0.9, "sampling_seed": 4}
    plain = post(server.url, "/generate", {"input_ids": [5, 6], "sampling_params": params})
    params["custom_params"] = {"return_top_p_token_ids": True}  # what slime sends
    custom = post(server.url, "/generate", {"input_ids": [5, 6], "sampling_params": params})
    assert custom.json()["output_ids"] == plain.json()["output_ids"]


# ----- a client that goes away, a request that times out -----


def test_disconnected_client_cancels_its_work(fresh_server):
    url = fresh_server.url
    body = {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 400, "n": 4}}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/generate", json=body, timeout=httpx.Timeout(30, read=1.0))
    wait_until(lambda: loads(url)["num_running_reqs"] + loads(url)["num_waiting_reqs"] == 0, 15)
    assert fresh_server.engine.stats["tokens"] < 4 * 400
    quick = post(url, "/generate", long_body("next", max_new_tokens=2)).json()
    assert len(quick["output_ids"]) == 2


def test_request_timeout_aborts_the_sequences(tiny_model_dir):
    config = ServerConfig(str(tiny_model_dir), port=0, request_timeout_s=0.5)
    with EmbeddedServer(config) as srv:
        paced(srv)
        response = httpx.post(srv.url + "/generate", json=long_body("t"), timeout=60)
        assert response.status_code == 500 and "request_timeout_s" in response.text
        wait_until(lambda: loads(srv.url)["num_running_reqs"] == 0, 15)
        assert srv.engine.stats["tokens"] < LONG


def test_server_config_bounds_are_checked(tiny_model_dir):
    for field in ("max_batch_size", "max_n", "max_request_sequences"):
        with pytest.raises(ValueError, match=f"ServerConfig.{field} must be >= 1"):
            ServerConfig(str(tiny_model_dir), **{field: 0})
