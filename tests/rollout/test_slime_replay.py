"""slime's rollout, replayed against the embedded server: the request payloads slime sends and
the response fields it reads, written out as test data from slime's source (THUDM/slime at
624b824a898ab0ec1fcb4d373004c7f3852bf515), checked against transformers' own model.

- slime/rollout/sglang_rollout.py: ``GenerateState.sampling_params`` (with ``custom_params``
  when top_p < 1), ``generate``'s payload (``input_ids``, ``sampling_params``,
  ``return_logprob``), per-sample ``sampling_seed`` under deterministic inference, and partial
  rollouts (an aborted sample is sent again with its tokens so far as ``input_ids`` and
  ``max_new_tokens`` reduced by its response length);
- slime/utils/types.py ``Sample._apply_meta_info``: ``meta_info.output_token_logprobs``
  ([logprob, token_id, ...]), ``finish_reason.type`` (length/abort/stop), ``weight_version``,
  ``cached_tokens``, ``prompt_tokens``, ``completion_tokens``, and ``text``;
- slime/backends/sglang_utils/server_control.py: /abort_request {"abort_all": true}, then
  /v1/loads?include=core until no request runs or waits;
- slime/backends/sglang_utils/sglang_engine.py and external.py: /server_info (tp_size, dp_size,
  pp_size, ep_size), /pause_generation and /continue_generation with ``json={}`` and
  raise_for_status around every weight update.
"""

from __future__ import annotations

import sys

import httpx
import pytest

from oprd_mega.rollout.embedded_server import EmbeddedServer, ServerConfig

from .test_control_surface import model_logprobs, paced, schema, start, wait_until  # noqa: F401

PROMPT = [5, 6, 7, 8]
ROLLOUT_SEED = 42  # slime's --rollout-seed default
N_SAMPLES = 2


def slime_sampling_params(max_new_tokens: int, top_p: float = 0.9) -> dict:
    """GenerateState.sampling_params with slime's argument defaults and --rollout-top-p 0.9."""
    params = {
        "temperature": 1.0,
        "top_p": top_p,
        "top_k": -1,
        "max_new_tokens": max_new_tokens,
        "stop": None,
        "stop_token_ids": None,
        "skip_special_tokens": False,
        "no_stop_trim": True,
        "spaces_between_special_tokens": False,
    }
    if top_p != 1.0:
        params["custom_params"] = {"return_top_p_token_ids": True}
    return params


def slime_post(url: str, path: str, payload: dict) -> dict:
    response = httpx.post(url + path, json=payload, timeout=120)
    response.raise_for_status()
    return response.json() if response.content else {}


def read_like_slime(output: dict) -> tuple[list[int], list[float], str]:
    """The fields Sample.append_response_tokens/_apply_meta_info take from an answer."""
    meta = output["meta_info"]
    tokens = [item[1] for item in meta["output_token_logprobs"]]
    logprobs = [item[0] for item in meta["output_token_logprobs"]]
    for key in ("cached_tokens", "prompt_tokens", "completion_tokens"):
        assert isinstance(meta[key], int), key
    assert isinstance(meta["weight_version"], str) and isinstance(output["text"], str)
    return tokens, logprobs, meta["finish_reason"]["type"]


def requests_on(url: str) -> int:
    """What server_control counts from /v1/loads?include=core: running plus waiting."""
    answer = httpx.get(url + "/v1/loads?include=core", timeout=30)
    answer.raise_for_status()
    return sum(
        load.get("num_running_reqs", 0) + load.get("num_waiting_reqs", 0)
        for load in answer.json()["loads"]
    )


@pytest.fixture
def slime_server(tiny_model_dir):
    with EmbeddedServer(ServerConfig(str(tiny_model_dir), port=0, seed=9)) as srv:
        yield paced(srv)


def test_slime_rollout_runs_against_the_embedded_server(
    slime_server,
    other_model_dir,
    reference_model,
    schema,  # noqa: F811  (the fixture imported above)
):
    url = slime_server.url
    # Engine discovery (external.py): /server_info first, parallel sizes from it.
    info = httpx.get(url + "/server_info", timeout=30)
    info.raise_for_status()
    for key in ("tp_size", "dp_size", "pp_size", "ep_size"):
        assert int(info.json()[key]) == 1
    # SGLangEngine._init_external asserts enable_memory_saver == args.offload_rollout (False
    # by default): a server started without --enable-memory-saver must say False.
    assert info.json()["enable_memory_saver"] is False

    # One group under deterministic inference: sample i is seeded rollout_seed + i.
    samples = []
    for i in range(N_SAMPLES):
        params = dict(slime_sampling_params(8), sampling_seed=ROLLOUT_SEED + i)
        payload = {"sampling_params": params, "return_logprob": True, "input_ids": PROMPT}
        schema.GenerateRequest.from_json_value(payload)
        output = slime_post(url, "/generate", payload)
        schema.GenerateResponse.from_json_value(output)
        tokens, logprobs, finish = read_like_slime(output)
        assert finish == "length" and tokens == output["output_ids"] and len(tokens) == 8
        want, _ = model_logprobs(reference_model, PROMPT, tokens)
        assert logprobs == pytest.approx(want, abs=2e-4)
        again = slime_post(url, "/generate", payload)
        assert again["output_ids"] == tokens  # the seed reproduces the sample
        samples.append(tokens)
    assert samples[0] != samples[1]

    # Partial rollout: abort mid-flight (abort_servers_until_idle), then send the sample again.
    total = 40
    payload = {"sampling_params": slime_sampling_params(total), "return_logprob": True}
    first = start(url, dict(payload, input_ids=PROMPT))
    wait_until(lambda: slime_server.engine.load()["num_used_tokens"] >= len(PROMPT) + 2)
    slime_post(url, "/abort_request", {"abort_all": True})
    wait_until(lambda: requests_on(url) == 0, 15)
    partial, partial_logprobs, finish = read_like_slime(first.result(timeout=60))
    assert finish == "abort" and 2 <= len(partial) < total
    resumed_params = dict(payload["sampling_params"], max_new_tokens=total - len(partial))
    resumed = {"sampling_params": resumed_params, "return_logprob": True}
    output = slime_post(url, "/generate", dict(resumed, input_ids=PROMPT + partial))
    rest, rest_logprobs, finish = read_like_slime(output)
    # Unseeded with slime's defaults (no ignore_eos): the end of sequence may come first.
    assert len(partial) + len(rest) <= total
    if finish == "length":
        assert len(partial) + len(rest) == total
    else:
        assert finish == "stop" and rest[-1] in slime_server.engine.eos_ids
    want, _ = model_logprobs(reference_model, PROMPT, partial + rest)
    assert partial_logprobs + rest_logprobs == pytest.approx(want, abs=2e-4)

    # A weight update as slime's update_weight_from_disk does it: pause, update, continue.
    slime_post(url, "/pause_generation", {})
    update = {"model_path": str(other_model_dir), "weight_version": "2"}
    assert slime_post(url, "/update_weights_from_disk", update)["success"] is True
    slime_post(url, "/continue_generation", {})
    payload = {"sampling_params": slime_sampling_params(4), "return_logprob": True}
    output = slime_post(url, "/generate", dict(payload, input_ids=PROMPT))
    assert output["meta_info"]["weight_version"] == "2"


def test_slimes_four_failing_calls_now_work(
    tiny_model_dir,
    other_model_dir,
    other_model,
    reference_model,
    schema,  # noqa: F811
    monkeypatch,
):
    """The calls of issue 25 that failed against the server: attach with slime's defaults
    (checked above), health_generate while rollouts decode (slime's 30 s health timeout),
    a streamed /generate read as SGLang's SSE (`data: {...}` lines, then `data: [DONE]`), and
    /update_weights_from_tensor with load_format flattened_bucket (one bucket per dtype)."""
    import json
    import time

    import torch

    from .sglang_source import (
        sglang_flattened_tensor_bucket,
        sglang_multiprocessing_serializer,
        tensor_bucket_modules,
    )

    with EmbeddedServer(ServerConfig(str(tiny_model_dir), port=0, seed=9)) as srv:
        url = paced(srv).url
        # Health while two rollouts decode: answered within a step or two, not after them.
        payload = {"sampling_params": slime_sampling_params(300), "return_logprob": True}
        rollouts = [start(url, dict(payload, input_ids=PROMPT)) for _ in range(2)]
        wait_until(lambda: srv.engine.load()["num_running_reqs"] == 2)
        began = time.monotonic()
        httpx.get(url + "/health_generate", timeout=30).raise_for_status()
        assert time.monotonic() - began < 5
        slime_post(url, "/abort_request", {"abort_all": True})
        for rollout in rollouts:
            assert read_like_slime(rollout.result(timeout=60))[2] == "abort"

        # A streamed rollout: the last object before [DONE] is the answer slime reads.
        payload = dict(payload, input_ids=PROMPT, stream=True)
        payload["sampling_params"] = dict(slime_sampling_params(6), sampling_seed=ROLLOUT_SEED)
        schema.GenerateRequest.from_json_value(payload)
        last = None
        with httpx.stream("POST", url + "/generate", json=payload, timeout=60) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if line.startswith("data:") and line[5:].strip() != "[DONE]":
                    last = json.loads(line[5:])
        tokens, logprobs, finish = read_like_slime(last)
        assert finish in ("length", "stop")
        want, _ = model_logprobs(reference_model, PROMPT, tokens)
        assert logprobs == pytest.approx(want, abs=2e-4)
        unstreamed = slime_post(url, "/generate", dict(payload, stream=False))
        assert unstreamed["output_ids"] == tokens  # same seed, same sample

        # update_weights_from_tensor as slime sends it: pause, a bucket per dtype, continue.
        for name, module in tensor_bucket_modules().items():
            monkeypatch.setitem(sys.modules, name, module)
        bucket_class = sglang_flattened_tensor_bucket()
        previous = torch.multiprocessing.get_sharing_strategy()
        torch.multiprocessing.set_sharing_strategy("file_system")
        try:
            bucket = bucket_class(named_tensors=list(other_model.state_dict().items()))
            data = {
                "flattened_tensor": bucket.get_flattened_tensor(),
                "metadata": bucket.get_metadata(),
            }
            serialized = sglang_multiprocessing_serializer().serialize(data, output_str=True)
        finally:
            torch.multiprocessing.set_sharing_strategy(previous)
        slime_post(url, "/pause_generation", {})
        update = {
            "serialized_named_tensors": [serialized],
            "load_format": "flattened_bucket",
            "flush_cache": False,
            "weight_version": "3",
        }
        assert slime_post(url, "/update_weights_from_tensor", update)["success"] is True
        slime_post(url, "/continue_generation", {})
        greedy = {"max_new_tokens": 5, "temperature": 0, "ignore_eos": True}
        output = slime_post(url, "/generate", {"input_ids": PROMPT, "sampling_params": greedy})
        assert output["meta_info"]["weight_version"] == "3"
        _, new_argmax = model_logprobs(other_model, PROMPT, output["output_ids"])
        assert output["output_ids"] == new_argmax
