"""Streaming /generate in SGLang 0.5.23's format, checked against SGLang's own source from the
pinned wheel (the SSE framing of http_server.py, the chunk keys of tokenizer_manager.py, the
schema module) and against transformers' model and tokenizer."""

from __future__ import annotations

import ast
import json

import httpx
import pytest
from transformers import AutoTokenizer

from oprd_mega.rollout.embedded_server import (
    SSE_DONE,
    SSE_END,
    SSE_PREFIX,
    EmbeddedServer,
    ServerConfig,
)

from .greedy_reference import model_greedy
from .sglang_schema import load_schema
from .test_control_surface import (
    _skip_without_wheel,
    class_fields,
    loads,
    paced,
    source_tree,
    wait_until,
)
from .test_embedded_server import reference_logprobs

HTTP_SERVER = "sglang/srt/entrypoints/http_server.py"
TOKENIZER_MANAGER = "sglang/srt/managers/tokenizer_manager.py"
SCHEMA_MEMBER = "sglang/api/v1/api_types.py"


@pytest.fixture(scope="module")
def schema():
    return _skip_without_wheel(load_schema)


@pytest.fixture
def fresh_server(tiny_model_dir):
    with EmbeddedServer(ServerConfig(str(tiny_model_dir), port=0, seed=5)) as srv:
        yield paced(srv)


def read_stream(url: str, body: dict) -> tuple[bytes, list[dict]]:
    """The raw body of a streamed /generate and its JSON objects, [DONE] left out."""
    with httpx.stream("POST", url + "/generate", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream"
        raw = b"".join(response.iter_bytes())
    events = raw.split(SSE_END)
    assert events[-1] == b"" and events[-2] + SSE_END == SSE_DONE  # the stream ends with [DONE]
    chunks = []
    for event in events[:-2]:
        assert event.startswith(SSE_PREFIX), event[:40]
        chunks.append(json.loads(event[len(SSE_PREFIX) :]))
    return raw, chunks


def function_node(tree: ast.Module, name: str) -> ast.AST:
    return next(
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name == name
    )


def test_sse_framing_is_sglangs():
    node = function_node(source_tree(HTTP_SERVER), "stream_results")
    constants = {n.value for n in ast.walk(node) if isinstance(n, ast.Constant)}
    assert {SSE_PREFIX, SSE_END, SSE_DONE} <= constants


def streamed_chunk_keys() -> list[set[str]]:
    """The key sets of the dicts SGLang's tokenizer manager streams per generate output."""
    node = function_node(source_tree(TOKENIZER_MANAGER), "_handle_batch_output")
    return [
        {k.value for k in d.keys if isinstance(k, ast.Constant)}
        for d in ast.walk(node)
        if isinstance(d, ast.Dict)
        and any(isinstance(k, ast.Constant) and k.value == "output_ids" for k in d.keys)
    ]


def test_a_greedy_stream_is_cumulative_and_ends_with_the_answer(
    fresh_server, schema, reference_model, tiny_model_dir
):
    server = fresh_server  # paced: tokens come slower than the test reads them
    tokens, prompt = 8, [5, 6, 7]
    body = {
        "input_ids": prompt,
        "sampling_params": {"max_new_tokens": tokens, "temperature": 0, "ignore_eos": True},
        "return_logprob": True,
        "stream": True,
    }
    schema.GenerateRequest.from_json_value(body)
    _, chunks = read_stream(server.url, body)
    assert len(chunks) >= 2  # tokens that come faster than they are read are coalesced
    meta_fields = class_fields(source_tree(SCHEMA_MEMBER), "GenerateMetaInfo")
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    for k, chunk in enumerate(chunks):
        schema.GenerateResponse.from_json_value(chunk)
        assert set(chunk) in streamed_chunk_keys()  # text, output_ids, meta_info
        meta = chunk["meta_info"]
        assert set(meta) <= meta_fields, set(meta) - meta_fields
        assert len(chunk["output_ids"]) == meta["completion_tokens"]
        assert chunk["text"] == tokenizer.decode(chunk["output_ids"], skip_special_tokens=True)
        assert [e[1] for e in meta["output_token_logprobs"]] == chunk["output_ids"]
        if k + 1 < len(chunks):  # cumulative: each chunk extends the one before
            assert meta["finish_reason"] is None and "e2e_latency" not in meta
            following = chunks[k + 1]["output_ids"]
            assert len(following) > len(chunk["output_ids"])
            assert following[: len(chunk["output_ids"])] == chunk["output_ids"]
    final = chunks[-1]
    assert final["meta_info"]["finish_reason"] == {"type": "length", "length": tokens}
    assert final["output_ids"] == model_greedy(reference_model, prompt, tokens)
    got = [e[0] for e in final["meta_info"]["output_token_logprobs"]]
    want = reference_logprobs(reference_model, prompt, final["output_ids"])
    assert got == pytest.approx(want, abs=2e-4)
    plain = httpx.post(server.url + "/generate", json=dict(body, stream=False), timeout=60).json()
    assert plain["output_ids"] == final["output_ids"] and plain["text"] == final["text"]


def test_a_batch_stream_names_each_sequence_by_index(server, schema):
    body = {
        "input_ids": [[5, 6, 7], [9, 10]],
        "sampling_params": {"max_new_tokens": 4, "n": 2, "ignore_eos": True, "sampling_seed": 3},
        "stream": True,
    }
    _, chunks = read_stream(server.url, body)
    by_index: dict[int, list[dict]] = {}
    for chunk in chunks:
        schema.GenerateResponse.from_json_value(chunk)
        by_index.setdefault(chunk["index"], []).append(chunk)
    assert sorted(by_index) == [0, 1, 2, 3]
    plain = httpx.post(server.url + "/generate", json=dict(body, stream=False), timeout=60).json()
    for index, sequence in by_index.items():
        lengths = [len(c["output_ids"]) for c in sequence]
        assert lengths == sorted(set(lengths)) and lengths[-1] == 4
        assert sequence[-1]["meta_info"]["finish_reason"] == {"type": "length", "length": 4}
        assert sequence[-1]["output_ids"] == plain[index]["output_ids"]  # seeded: the same


def test_a_client_leaving_a_stream_aborts_it(fresh_server):
    body = {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 400}, "stream": True}
    with httpx.stream("POST", fresh_server.url + "/generate", json=body, timeout=60) as response:
        first = next(response.iter_bytes())
        assert first.startswith(SSE_PREFIX)
    wait_until(lambda: loads(fresh_server.url)["num_running_reqs"] == 0, 15)
    assert fresh_server.engine.stats["tokens"] < 400


def test_an_aborted_stream_ends_with_its_partial_tokens(fresh_server):
    body = {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 400}, "stream": True}
    with httpx.stream("POST", fresh_server.url + "/generate", json=body, timeout=60) as response:
        parts = response.iter_bytes()
        next(parts)
        httpx.post(fresh_server.url + "/abort_request", json={"abort_all": True}, timeout=30)
        raw = b"".join(parts)
    last = json.loads(raw.split(SSE_END)[-3].removeprefix(SSE_PREFIX))
    assert last["meta_info"]["finish_reason"]["type"] == "abort"
    assert 1 <= len(last["output_ids"]) < 400
    assert raw.endswith(SSE_DONE)


def test_stream_interval_spaces_the_chunks(fresh_server):
    body = {
        "input_ids": [5, 6, 7],
        "sampling_params": {"max_new_tokens": 10, "ignore_eos": True, "stream_interval": 4},
        "stream": True,
    }
    _, chunks = read_stream(fresh_server.url, body)
    lengths = [len(c["output_ids"]) for c in chunks]
    assert lengths[-1] == 10 and set(lengths[:-1]) <= {4, 8}  # never between two intervals
    bad = dict(body, sampling_params={"stream_interval": 0})
    response = httpx.post(fresh_server.url + "/generate", json=bad, timeout=30)
    assert response.status_code == 400 and "sampling_params.stream_interval" in response.text


def test_stream_requests_are_checked_before_streaming(server):
    response = httpx.post(
        server.url + "/generate", json={"input_ids": [], "stream": True}, timeout=30
    )
    assert response.status_code == 400 and "input_ids" in response.text


def test_the_server_under_test_is_the_embedded_one(server):
    assert isinstance(server, EmbeddedServer)
