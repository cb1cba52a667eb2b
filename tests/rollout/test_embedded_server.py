"""The embedded server against transformers' own forward and generate on the same weights."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

PROMPTS = [[5, 6, 7], [40, 41, 42, 43, 44, 45, 46], [100], [7, 8, 9, 10, 11]]


def post(server, path, body, status=200):
    response = httpx.post(server.url + path, json=body, timeout=60)
    assert response.status_code == status, response.text
    return response.json()


def reference_logprobs(model, prompt, output, temperature=1.0):
    """log_softmax(logits / T) of each output token under one full, unpadded forward."""
    ids = torch.tensor([prompt + output])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    logprobs = torch.log_softmax(logits / temperature, dim=-1)
    positions = range(len(prompt) - 1, len(prompt) + len(output) - 1)
    return [float(logprobs[p, t]) for p, t in zip(positions, output, strict=True)]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_transformers_forward(server, reference_model, temperature):
    body = {
        "input_ids": PROMPTS,
        "sampling_params": {"max_new_tokens": 12, "temperature": temperature, "ignore_eos": True},
        "return_logprob": True,
    }
    outputs = post(server, "/generate", body)
    assert isinstance(outputs, list) and len(outputs) == len(PROMPTS)
    for prompt, out in zip(PROMPTS, outputs, strict=True):
        ids = out["output_ids"]
        assert len(ids) == 12
        assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 12}
        got = [entry[0] for entry in out["meta_info"]["output_token_logprobs"]]
        assert [entry[1] for entry in out["meta_info"]["output_token_logprobs"]] == ids
        want = reference_logprobs(reference_model, prompt, ids, temperature)
        assert got == pytest.approx(want, abs=2e-4)
        assert out["meta_info"]["prompt_tokens"] == len(prompt)
        assert out["meta_info"]["completion_tokens"] == 12


def test_rows_finishing_at_different_steps_keep_exact_logprobs(server, reference_model):
    # Per-prompt lengths: finished rows leave the batch (and the KV cache) while others go on.
    body = {
        "input_ids": PROMPTS,
        "sampling_params": [
            {"max_new_tokens": m, "ignore_eos": True, "temperature": t}
            for m, t in zip([2, 9, 5, 12], [1.0, 0.0, 0.9, 1.0], strict=True)
        ],
        "return_logprob": True,
    }
    outputs = post(server, "/generate", body)
    for prompt, out, m, t in zip(
        PROMPTS, outputs, [2, 9, 5, 12], [1.0, 0.0, 0.9, 1.0], strict=True
    ):
        assert len(out["output_ids"]) == m
        got = [entry[0] for entry in out["meta_info"]["output_token_logprobs"]]
        want = reference_logprobs(reference_model, prompt, out["output_ids"], t or 1.0)
        assert got == pytest.approx(want, abs=2e-4)


def test_greedy_equals_transformers_generate(server, reference_model):
    for prompt in PROMPTS:
        out = post(
            server,
            "/generate",
            {"input_ids": prompt, "sampling_params": {"max_new_tokens": 10, "temperature": 0}},
        )
        with torch.no_grad():
            ref = reference_model.generate(
                torch.tensor([prompt]), max_new_tokens=10, do_sample=False, pad_token_id=0
            )[0, len(prompt) :].tolist()
        # transformers stops at EOS too: compare up to its length.
        assert out["output_ids"] == ref


def test_n_samples_and_seed(server):
    body = {
        "input_ids": PROMPTS[0],
        "sampling_params": {"max_new_tokens": 8, "n": 4, "ignore_eos": True},
        "return_logprob": True,
    }
    outputs = post(server, "/generate", body)
    assert len(outputs) == 4
    assert [o["index"] for o in outputs] == [0, 1, 2, 3]
    assert len({tuple(o["output_ids"]) for o in outputs}) > 1
    seeded = dict(body, sampling_params=dict(body["sampling_params"], sampling_seed=7))
    first = [o["output_ids"] for o in post(server, "/generate", seeded)]
    second = [o["output_ids"] for o in post(server, "/generate", seeded)]
    assert first == second


def test_stop_token_ids_and_stop_strings(server, reference_model):
    greedy = {"max_new_tokens": 10, "temperature": 0, "ignore_eos": True}
    full = post(server, "/generate", {"input_ids": PROMPTS[1], "sampling_params": greedy})
    ids = full["output_ids"]
    stop_at = next(k for k in range(2, len(ids)) if ids[k] not in ids[:k])
    params = dict(greedy, stop_token_ids=[ids[stop_at]])
    out = post(server, "/generate", {"input_ids": PROMPTS[1], "sampling_params": params})
    assert out["output_ids"] == ids[: stop_at + 1]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": ids[stop_at]}
    # min_new_tokens keeps the stop token from ending the sequence early.
    params = dict(greedy, stop_token_ids=[ids[stop_at]], min_new_tokens=stop_at + 2)
    out = post(server, "/generate", {"input_ids": PROMPTS[1], "sampling_params": params})
    assert len(out["output_ids"]) > stop_at + 1
    # A stop string: the text is trimmed before it, the ids end at the token completing it.
    text = full["text"]
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    if stop.strip():
        params = dict(greedy, stop=[stop])
        out = post(server, "/generate", {"input_ids": PROMPTS[1], "sampling_params": params})
        assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
        assert stop not in out["text"] and text.startswith(out["text"])


def test_top_k_and_top_p_restrict_the_support(server, reference_model):
    prompt = PROMPTS[0]
    with torch.no_grad():
        logits = reference_model(input_ids=torch.tensor([prompt])).logits[0, -1]
    top2 = set(torch.topk(logits, 2).indices.tolist())
    body = {"input_ids": prompt, "sampling_params": {"max_new_tokens": 1, "top_k": 2, "n": 24}}
    firsts = {o["output_ids"][0] for o in post(server, "/generate", body)}
    assert firsts <= top2
    body["sampling_params"] = {"max_new_tokens": 1, "top_p": 1e-6, "n": 8}
    argmax = int(torch.argmax(logits))
    assert {o["output_ids"][0] for o in post(server, "/generate", body)} == {argmax}
    body["sampling_params"] = {"max_new_tokens": 1, "min_p": 1.0, "n": 8}
    assert {o["output_ids"][0] for o in post(server, "/generate", body)} == {argmax}


def test_concurrent_requests_are_batched_and_agree(server):
    body = {"sampling_params": {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}}
    alone = [post(server, "/generate", dict(body, input_ids=p))["output_ids"] for p in PROMPTS]

    def stats():
        return httpx.get(server.url + "/get_server_info").json()["internal_states"][0]

    before = stats()
    with ThreadPoolExecutor(16) as pool:
        results = list(
            pool.map(
                lambda i: post(server, "/generate", dict(body, input_ids=PROMPTS[i % 4])), range(16)
            )
        )
    after = stats()
    for i, out in enumerate(results):
        assert out["output_ids"] == alone[i % 4]
    assert after["sequences"] - before["sequences"] == 16
    # 16 single-sequence requests prefilled in fewer than 16 batches: some shared a batch.
    assert after["batches"] - before["batches"] < 16


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"input_ids": [1, 2], "sampling_params": {"max_new_token": 3}}, "max_new_token"),
        ({"input_ids": [1, 2], "sampling_params": {"top_p": 0}}, "top_p"),
        ({"input_ids": [1, 2], "sampling_params": {"temperature": "hot"}}, "temperature"),
        ({"input_ids": [1, 2], "sampling_params": {"frequency_penalty": 0.5}}, "frequency_penalty"),
        ({"input_ids": []}, "input_ids"),
        ({"sampling_params": {}}, "input_ids or text"),
        ({"input_ids": [1], "stream": "yes"}, "field stream must be true or false"),
        ({"input_ids": [1, 99999]}, "token id 99999 outside"),
        ({"input_ids": list(range(1, 200)) * 3}, "does not fit the context length 512"),
    ],
)
def test_bad_requests_are_400_naming_the_field(server, body, needle):
    response = httpx.post(server.url + "/generate", json=body, timeout=30)
    assert response.status_code == 400
    assert needle in response.json()["error"]["message"]


def test_text_prompt_and_control_endpoints(server):
    out = post(server, "/generate", {"text": "the quick", "sampling_params": {"max_new_tokens": 3}})
    assert len(out["output_ids"]) <= 3
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/health_generate", timeout=30).status_code == 200
    assert httpx.post(server.url + "/flush_cache").status_code == 200
    info = httpx.get(server.url + "/get_model_info").json()
    assert info["is_generation"] is True and info["weight_version"]


def test_update_weights_from_disk(tiny_model_dir, other_model_dir):
    from transformers import AutoModelForCausalLM

    from oprd_mega.rollout.embedded_server import EmbeddedServer, ServerConfig

    other = AutoModelForCausalLM.from_pretrained(str(other_model_dir), dtype=torch.float32).eval()
    body = {
        "input_ids": PROMPTS[1],
        "sampling_params": {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True},
        "return_logprob": True,
    }
    with EmbeddedServer(ServerConfig(str(tiny_model_dir), port=0)) as srv:
        bad = httpx.post(
            srv.url + "/update_weights_from_disk", json={"model_path": "/nonexistent/dir"}
        )
        assert bad.status_code == 400 and bad.json()["success"] is False
        assert "/nonexistent/dir" in bad.json()["message"]
        answer = post(
            srv,
            "/update_weights_from_disk",
            {"model_path": str(other_model_dir), "weight_version": "v7"},
        )
        assert answer["success"] is True
        out = post(srv, "/generate", body)
        assert out["meta_info"]["weight_version"] == "v7"
        assert httpx.get(srv.url + "/get_model_info").json()["weight_version"] == "v7"
        got = [e[0] for e in out["meta_info"]["output_token_logprobs"]]
        assert got == pytest.approx(
            reference_logprobs(other, PROMPTS[1], out["output_ids"]), abs=2e-4
        )


def test_unseeded_servers_sample_different_streams(tiny_model_dir):
    from oprd_mega.rollout.embedded_server import EmbeddedServer, ServerConfig

    body = {"input_ids": PROMPTS[0], "sampling_params": {"max_new_tokens": 8, "n": 4}}
    answers = []
    for _ in range(2):
        with EmbeddedServer(ServerConfig(str(tiny_model_dir), port=0)) as srv:
            answers.append([o["output_ids"] for o in post(srv, "/generate", body)])
    assert answers[0] != answers[1]


def test_a_server_whose_stop_hangs_still_exits_after_sigterm(tiny_model_dir):
    """Its launcher may be gone (the parent-death signal), so nobody would SIGKILL it: after
    SIGTERM the server process ends within its exit grace even when stopping hangs."""
    import signal
    import subprocess
    import sys
    import textwrap
    import time

    from oprd_mega.rollout.embedded_server import EXIT_GRACE_S
    from tests.torchrun_utils import free_port

    port = free_port()
    script = textwrap.dedent(
        f"""
        import time
        from oprd_mega.rollout import embedded_server as es
        es.EmbeddedServer.stop = lambda self: time.sleep(3600)  # a stop that never returns
        es.serve_forever(es.ServerConfig({str(tiny_model_dir)!r}, host="127.0.0.1", port={port}))
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            pytest.fail("the server never answered /health")
        proc.send_signal(signal.SIGTERM)
        start = time.monotonic()
        proc.wait(timeout=EXIT_GRACE_S + 20)
        took = time.monotonic() - start
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM
    assert EXIT_GRACE_S - 1 <= took <= EXIT_GRACE_S + 10
    assert "exiting" in proc.stderr.read()
