"""``oprd-mega prune``: depth pruning against independent references.

The pruned directory's forward equals transformers' own source model with the dropped blocks
taken out of its ``ModuleList``; Block Influence equals ``1 - mean cos`` computed in float64
from ``output_hidden_states``; the kept-layer record pairs each student layer with its source
layer in training; bad input is one line, exit status 2, and nothing written. The tiny random
model runs everywhere; SmolLM2-135M-Instruct (``tests/packaged_model.py``) where its package
can be fetched.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from oprd_mega.config.against_models import check_models
from oprd_mega.convert.prune import block_influence, main, most_important
from oprd_mega.errors import ConfigError
from oprd_mega.models.hf_config import LAYER_MAP_KEY, LayerMap, load_hf_config, parse_hf_config
from tests.config.helpers import minimal
from tests.packaged_model import smollm2_dir
from tools.tiny_hf import make_tiny_model_dir

CALIBRATION = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 12 * 7?"}],
    "Explain in one sentence why the sky is blue.",
    "List three prime numbers.",
    "Translate 'good morning' into Spanish.",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("prune") / "teacher", seed=3, layers=4)


@pytest.fixture(scope="module")
def calibration(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("calibration") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in CALIBRATION))
    return path


def surgery(model_dir: Path, keep: list[int]) -> torch.nn.Module:
    """The reference: transformers' source model with only the kept blocks in its ModuleList."""
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    model.model.layers = torch.nn.ModuleList([model.model.layers[i] for i in keep])
    model.config.num_hidden_layers = len(keep)
    return model


def reference_influence(model_dir: Path, prompts: list[list[int]]) -> list[float]:
    """1 - mean cos(hidden_states[i], hidden_states[i + 1]) in float64, from transformers'
    ``output_hidden_states`` (the final norm replaced by identity, so the last entry is the
    last block's raw output)."""
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float64).eval()
    model.model.norm = torch.nn.Identity()
    total, count = None, 0
    with torch.no_grad():
        for ids in prompts:
            states = model(torch.tensor([ids]), output_hidden_states=True, use_cache=False)
            states = states.hidden_states
            cos = torch.stack(
                [
                    torch.nn.functional.cosine_similarity(states[i][0], states[i + 1][0], dim=-1)
                    for i in range(len(states) - 1)
                ]
            ).sum(dim=1)
            total = cos if total is None else total + cos
            count += len(ids)
    return (1 - total / count).tolist()


def chat_ids(model_dir: Path) -> list[list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    out = []
    for prompt in CALIBRATION:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        out.append(tokenizer.encode(text, add_special_tokens=False))
    return out


def prune_cli(*argv: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    status = main(list(argv))
    return status, capsys.readouterr().err.strip()


def assert_same_forward(pruned: Path, reference: torch.nn.Module, tokens: list[int]) -> None:
    model = AutoModelForCausalLM.from_pretrained(str(pruned), dtype=torch.float32).eval()
    with torch.no_grad():
        got = model(torch.tensor([tokens]), use_cache=False).logits
        want = reference(torch.tensor([tokens]), use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_keep_writes_the_source_without_the_dropped_blocks(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "student"
    status, err = prune_cli("--model", str(tiny), "--out", str(out), "--keep", "3,0,2",
                            capsys=capsys)  # fmt: skip
    assert status == 0, err
    assert_same_forward(out, surgery(tiny, [0, 2, 3]), chat_ids(tiny)[0])
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 3
    record = config[LAYER_MAP_KEY]
    assert (record["source_layers"], record["source_num_layers"], record["method"]) == (
        [1, 3, 4],
        4,
        "keep",
    )
    assert load_hf_config(out).layer_map == LayerMap((1, 3, 4), 4)
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    prompt = [{"role": "user", "content": "hi"}]
    assert tokenizer.apply_chat_template(prompt, tokenize=False) == AutoTokenizer.from_pretrained(
        str(tiny)
    ).apply_chat_template(prompt, tokenize=False)


def test_training_pairs_each_student_layer_with_its_source_layer(tiny: Path, tmp_path) -> None:
    out = tmp_path / "student"
    assert main(["--model", str(tiny), "--out", str(out), "--keep", "0,2,3"]) == 0
    student, teacher = load_hf_config(out), load_hf_config(tiny)
    assert check_models(minimal(), student, teacher) == [(1, 1), (2, 3), (3, 4)]
    assert check_models(minimal("distillation.layers=last"), student, teacher) == [(3, 4)]
    # the uniform map of a 3-layer student over 4 teacher layers would pair 2 with 3 and
    # 3 with 4 too; [1, 2, 4] tells the record apart from it
    other = tmp_path / "other"
    assert main(["--model", str(tiny), "--out", str(other), "--keep", "0,1,3"]) == 0
    assert check_models(minimal(), load_hf_config(other), teacher) == [(1, 1), (2, 2), (3, 4)]
    # a teacher of another depth is not the source: the uniform map
    deeper = make_tiny_model_dir(tmp_path / "deeper", layers=7)
    assert check_models(minimal(), load_hf_config(other), load_hf_config(deeper)) == [
        (1, 1),
        (2, 4),
        (3, 7),
    ]


@pytest.mark.parametrize(
    ("keep", "message"),
    [
        ("", "give a comma-separated list"),
        ("0,,2", "give a comma-separated list"),
        ("0,a", "is not a list of integers"),
        ("0,4", "[4] outside 0..3"),
        ("-1,2", "[-1] outside 0..3"),
        ("1,2,1", "[1] named more than once"),
    ],
)
def test_bad_keep_is_one_line_and_writes_nothing(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], keep: str, message: str
) -> None:
    status, err = prune_cli("--model", str(tiny), "--out", str(tmp_path / "s"), f"--keep={keep}",
                            capsys=capsys)  # fmt: skip
    assert status == 2
    assert err.startswith(f"oprd-mega prune: error: --keep {keep!r}: ") and message in err
    assert len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_a_model_without_tokenizer_or_chat_template_is_refused_by_name(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy2(tiny / name, bare / name)
    status, err = prune_cli("--model", str(bare), "--out", str(tmp_path / "s"), "--keep", "0",
                            capsys=capsys)  # fmt: skip
    assert status == 2 and len(err.splitlines()) == 1
    assert err.startswith(f"oprd-mega prune: error: --model {bare}: no tokenizer files")
    # a tokenizer without a chat template: the flag that supplies one is named
    untemplated = tmp_path / "untemplated"
    shutil.copytree(tiny, untemplated)
    (untemplated / "chat_template.jinja").unlink(missing_ok=True)
    config_file = untemplated / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.pop("chat_template", None)
    config_file.write_text(json.dumps(config))
    status, err = prune_cli("--model", str(untemplated), "--out", str(tmp_path / "s"),
                            "--keep", "0", capsys=capsys)  # fmt: skip
    assert status == 2 and len(err.splitlines()) == 1
    assert "the tokenizer has no chat template; pass one with --chat-template FILE" in err
    status, err = prune_cli("--model", str(untemplated), "--out", str(tmp_path / "s"),
                            "--keep", "0", "--chat-template", str(tmp_path / "none.jinja"),
                            capsys=capsys)  # fmt: skip
    assert status == 2 and err.endswith("--chat-template " + str(tmp_path / "none.jinja") +
                                        ": no such file")  # fmt: skip
    assert not (tmp_path / "s").exists()
    template = tmp_path / "template.jinja"
    template.write_text((tiny / "chat_template.jinja").read_text())
    status, err = prune_cli("--model", str(untemplated), "--out", str(tmp_path / "s"),
                            "--keep", "0", "--chat-template", str(template),
                            capsys=capsys)  # fmt: skip
    assert status == 0, err
    assert (tmp_path / "s" / "chat_template.jinja").read_text() == template.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "bare",
        "s",
        "template.jinja",
        "untemplated",
    ]  # no temporary folder left behind


def test_an_existing_target_and_missing_calibration_are_refused(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, err = prune_cli("--model", str(tiny), "--out", str(tmp_path), "--keep", "0",
                            capsys=capsys)  # fmt: skip
    assert status == 2 and "already exists" in err
    status, err = prune_cli("--model", str(tiny), "--out", str(tmp_path / "s"),
                            "--num-layers", "2", capsys=capsys)  # fmt: skip
    assert status == 2 and err.endswith("--num-layers needs --calibration prompts to score the "
                                        "blocks")  # fmt: skip


def test_block_influence_equals_the_float64_reference_and_picks_the_top_blocks(
    tiny: Path, calibration: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompts = chat_ids(tiny)
    model = AutoModelForCausalLM.from_pretrained(str(tiny), dtype=torch.float32).eval()
    got = block_influence(model, prompts)
    want = reference_influence(tiny, prompts)
    assert got == pytest.approx(want, abs=1e-5)
    keep = most_important(want, 2)
    assert keep == sorted(sorted(range(4), key=lambda i: -want[i])[:2])
    out = tmp_path / "s"
    status, err = prune_cli("--model", str(tiny), "--out", str(out), "--num-layers", "2",
                            "--calibration", str(calibration), capsys=capsys)  # fmt: skip
    assert status == 0, err
    record = json.loads((out / "config.json").read_text())[LAYER_MAP_KEY]
    assert record["source_layers"] == [i + 1 for i in keep]
    assert record["method"] == "block-influence" and "2403.03853" in record["reference"]
    assert record["block_influence"] == pytest.approx(want, abs=1e-5)
    assert_same_forward(out, surgery(tiny, keep), prompts[1])


def test_the_real_instruct_model_pruned_to_half_its_depth(
    calibration: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """SmolLM2-135M-Instruct, 30 blocks -> the 15 with the highest Block Influence on chat
    prompts: scores as the float64 reference, the student equal to the surgery, a working chat
    template, and the layer record training reads."""
    source = smollm2_dir()
    prompts = chat_ids(source)
    want = reference_influence(source, prompts)
    out = tmp_path / "smol-15"
    status, err = prune_cli("--model", str(source), "--out", str(out), "--num-layers", "15",
                            "--calibration", str(calibration), capsys=capsys)  # fmt: skip
    assert status == 0, err
    record = json.loads((out / "config.json").read_text())[LAYER_MAP_KEY]
    assert record["block_influence"] == pytest.approx(want, abs=1e-4)
    keep = [n - 1 for n in record["source_layers"]]
    assert keep == most_important(want, 15)
    assert 0 in keep  # ShortGPT's finding holds here too: the first block is never redundant
    assert_same_forward(out, surgery(source, keep), prompts[0])
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>assistant\n")
    student, teacher = load_hf_config(out), load_hf_config(source)
    pairs = check_models(minimal(), student, teacher)
    assert pairs == [(n + 1, k + 1) for n, k in enumerate(keep)]


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ([1, 2], "oprd_layer_map must be an object"),
        ({"source_layers": [1, 2, 3], "source_num_layers": 0}, "source_num_layers must be a"),
        ({"source_layers": [1, 2], "source_num_layers": 4}, "must list 3 ascending layer"),
        ({"source_layers": [1, 3, 2], "source_num_layers": 4}, "must list 3 ascending layer"),
        ({"source_layers": [1, 2, 5], "source_num_layers": 4}, "numbers in 1..4"),
    ],
)
def test_a_damaged_layer_record_is_refused_naming_the_key(
    tiny: Path, tmp_path: Path, record: object, message: str
) -> None:
    config = json.loads((tiny / "config.json").read_text())
    config.update(num_hidden_layers=3, **{LAYER_MAP_KEY: record})
    with pytest.raises(ConfigError, match="oprd_layer_map") as info:
        parse_hf_config(config)
    assert message in str(info.value)
