"""Requests the client sends and answers the embedded server gives, checked with SGLang's schema."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess

import httpx
import msgspec
import pytest

from oprd_mega.rollout.client import RolloutClient
from oprd_mega.rollout.sampling import SGLANG_SAMPLING_KEYS

from .sglang_schema import load_schema


@pytest.fixture(scope="module")
def schema():
    try:
        return load_schema()
    except (subprocess.SubprocessError, OSError) as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"cannot fetch the sglang wheel for its schema: {exc}")


class Recorder(httpx.AsyncBaseTransport):
    """Passes requests on to a real transport and keeps every request body."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.bodies: list[tuple[str, dict]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        content = await request.aread()
        if content:
            self.bodies.append((request.url.path, json.loads(content)))
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


SAMPLING_VARIANTS = [
    {"max_new_tokens": 4},
    {"max_new_tokens": 4, "temperature": 0.0},
    {"max_new_tokens": 4, "temperature": 0.8, "top_p": 0.9, "top_k": 20, "min_p": 0.05},
    {"max_new_tokens": 4, "n": 3, "stop_token_ids": [1], "stop": ["xyz"], "ignore_eos": True},
    {"max_new_tokens": 4, "min_new_tokens": 2, "sampling_seed": 11, "skip_special_tokens": False},
]


def struct_fields(cls) -> set[str]:
    return {f.name for f in msgspec.structs.fields(cls)}


def test_our_sampling_keys_are_sglangs(schema):
    assert struct_fields(schema.SamplingParams) == set(SGLANG_SAMPLING_KEYS)
    with pytest.raises(schema.JsonContractError, match="top_q"):
        schema.GenerateRequest.from_json_value({"input_ids": [1], "sampling_params": {"top_q": 1}})


def test_client_requests_validate(schema, server):
    recorder = Recorder()

    async def main():
        async with RolloutClient([server.url], transport=recorder) as client:
            for params in SAMPLING_VARIANTS:
                await client.generate([5, 6, 7], params)
                await client.generate([5, 6, 7], params, return_logprob=False)

    asyncio.run(main())
    generate_bodies = [body for path, body in recorder.bodies if path == "/generate"]
    assert len(generate_bodies) == 2 * len(SAMPLING_VARIANTS)
    for body in generate_bodies:
        decoded = schema.GenerateRequest.from_json_value(body)
        assert decoded.input_ids == [5, 6, 7]
        assert set(body) <= struct_fields(schema.GenerateRequest)
        # Nothing we send is dropped or changed by SGLang's decoder.
        encoded = decoded.sampling_params.to_json_value()
        for key, value in body["sampling_params"].items():
            assert encoded[key] == value, key


def check_same_after_roundtrip(ours: dict, cls, schema_module) -> None:
    """Every key we send exists in the schema and survives decode + encode unchanged."""
    decoded = cls.from_json_value(ours)
    encoded = decoded.to_json_value()
    assert set(ours) <= struct_fields(cls), set(ours) - struct_fields(cls)
    for key, value in ours.items():
        assert key in encoded, key
        if isinstance(value, float):
            assert encoded[key] == pytest.approx(value)
        elif key != "meta_info":
            assert encoded[key] == value, key


def check_response(schema, answer: dict) -> None:
    check_same_after_roundtrip(answer, schema.GenerateResponse, schema)
    meta = answer["meta_info"]
    check_same_after_roundtrip(meta, schema.GenerateMetaInfo, schema)
    decoded = schema.GenerateMetaInfo.from_json_value(meta)
    assert isinstance(decoded.finish_reason, schema.FinishStop | schema.FinishLength)
    for entry in decoded.output_token_logprobs or []:
        assert isinstance(entry, schema.LogprobEntry) and entry.logprob <= 0


@pytest.mark.parametrize(
    "body",
    [
        {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 3}},
        {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 3}, "return_logprob": True},
        {
            "input_ids": [[5, 6, 7], [9, 10]],
            "sampling_params": {"max_new_tokens": 3, "n": 2},
            "return_logprob": True,
            "logprob_start_len": 0,
            "top_logprobs_num": 2,
            "return_text_in_logprobs": True,
        },
        {
            "text": "the quick",
            "sampling_params": {"max_new_tokens": 5, "stop_token_ids": [7, 8, 9]},
        },
        {"input_ids": [5], "sampling_params": {"max_new_tokens": 0}},
    ],
)
def test_server_answers_validate(schema, server, body):
    schema.GenerateRequest.from_json_value(body)  # the test's own request is valid SGLang
    response = httpx.post(server.url + "/generate", json=body, timeout=60)
    assert response.status_code == 200, response.text
    answer = response.json()
    for item in answer if isinstance(answer, list) else [answer]:
        check_response(schema, item)


def test_stop_finish_reason_validates(schema, server):
    body = {"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 6, "temperature": 0}}
    first = httpx.post(server.url + "/generate", json=body, timeout=60).json()
    body["sampling_params"]["stop_token_ids"] = [first["output_ids"][0]]
    answer = httpx.post(server.url + "/generate", json=body, timeout=60).json()
    check_response(schema, answer)
    decoded = schema.GenerateMetaInfo.from_json_value(answer["meta_info"])
    assert isinstance(decoded.finish_reason, schema.FinishStop)
    assert decoded.finish_reason.matched == first["output_ids"][0]


def test_info_endpoints_validate(schema, server):
    info = httpx.get(server.url + "/get_model_info").json()
    check_same_after_roundtrip(info, schema.GetModelInfoResponse, schema)
    schema.GetServerInfoResponse.from_json_value(httpx.get(server.url + "/get_server_info").json())


@pytest.mark.parametrize(
    ("temperature", "top_k"),
    [(1.0, 0), (1.0, -1), (1.0, 1), (1.0, 20), (1.0, -2), (0.0, 0), (0.5, 0), (1e-7, 0)],
)
def test_top_k_is_accepted_exactly_where_sglangs_own_sampling_params_accept_it(
    schema, temperature: float, top_k: int
) -> None:
    """SGLang's ``SamplingParams`` from the pinned wheel, run as it is: 0 is refused (issue: the
    config once took ``top_k: 0``), except under a greedy temperature."""
    import logging
    import math
    import re
    from typing import Optional, Union

    from oprd_mega.rollout.sampling import SamplingParamsError, parse_sampling_params

    from .sglang_source import sglang_function

    member = "sglang/srt/sampling/sampling_params.py"
    namespace = {
        "msgspec": msgspec, "math": math, "logging": logging, "re": re,
        "logger": logging.getLogger("sglang_pinned"),
        "Dict": dict, "List": list, "Optional": Optional, "Set": set, "Union": Union,
        "TOP_K_ALL": 1 << 30, "_SAMPLING_EPS": 1e-6, "MAX_STOP_COUNT": 32,
        "MAX_STOP_REGEX_LEN": 256, "MAX_STOP_REGEX_COUNT": 32,
        "REQUEST_REASONING_END_TOKEN_IDS_KEY": "__sglang_reasoning_end_token_ids",
        "MAX_REQUEST_REASONING_END_TOKEN_IDS": 32,
        "REQUEST_REASONING_IN_GRAMMAR_KEY": "__sglang_reasoning_in_grammar",
        "CustomParamValue": object, "WatermarkRequestConfig": object,
        "normalize_watermark_request": lambda watermark: watermark,
    }  # fmt: skip
    for helper in ("get_request_reasoning_end_token_ids", "get_request_reasoning_in_grammar"):
        namespace[helper] = sglang_function(member, helper, namespace)
    sglang_params = sglang_function(member, "SamplingParams", namespace)
    try:
        sglang_params(temperature=temperature, top_k=top_k).verify(vocab_size=32)
        sglang_accepts = True
    except ValueError as exc:
        sglang_accepts = False
        assert "top_k" in str(exc)
    try:
        parse_sampling_params({"temperature": temperature, "top_k": top_k})
        ours_accepts = True
    except SamplingParamsError as exc:
        ours_accepts = False
        assert "sampling_params.top_k" in str(exc)
    assert ours_accepts == sglang_accepts
