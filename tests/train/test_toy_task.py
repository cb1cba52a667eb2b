"""tools/make_toy_task.py: the quickstart's tokenizer, problems, split and a tiny build."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from oprd_mega.models.hf_config import load_hf_config
from tools import make_toy_task as toy

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return toy.make_char_tokenizer()


def test_tokenizer_encodes_prompts_with_bos(tokenizer: PreTrainedTokenizerFast) -> None:
    ids = tokenizer.encode("07+45=", add_special_tokens=True)
    assert ids == [tokenizer.bos_token_id, 0, 7, 10, 4, 5, 11]
    assert tokenizer.encode("07+45=", add_special_tokens=False) == ids[1:]
    assert tokenizer.convert_ids_to_tokens(ids) == ["<s>", "0", "7", "+", "4", "5", "="]


def test_tokenizer_decodes_answers_without_spaces(tokenizer: PreTrainedTokenizerFast) -> None:
    ids = tokenizer.convert_tokens_to_ids(["2", "5", "0"])
    assert tokenizer.decode(ids) == "250"
    with_eos = [*ids, tokenizer.eos_token_id, tokenizer.pad_token_id]
    assert tokenizer.decode(with_eos, skip_special_tokens=True).strip() == "250"


def test_tokenizer_vocabulary_and_special_ids(tokenizer: PreTrainedTokenizerFast) -> None:
    assert len(tokenizer) == toy.VOCAB_SIZE == 16  # 15 used tokens and <unk>: even for TP2
    assert tokenizer.get_vocab() == toy.VOCAB
    specials = (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token)
    assert specials == ("<s>", "</s>", "<pad>")
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (12, 13, 14)
    assert [tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)] == list(range(10))


def test_saved_tokenizer_loads_with_auto_tokenizer(
    tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.encode("99+99=", add_special_tokens=True) == [12, 9, 9, 10, 9, 9, 11]
    assert loaded.decode([8, 9, 1, 13], skip_special_tokens=True) == "891"
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (12, 13, 14)


@pytest.mark.parametrize(
    ("a", "b", "prompt", "answer"),
    [
        (7, 45, "07+45=", "250"),
        (99, 99, "99+99=", "891"),
        (0, 0, "00+00=", "000"),
        (12, 30, "12+30=", "240"),
        (50, 50, "50+50=", "001"),
    ],
)
def test_problem_format(a: int, b: int, prompt: str, answer: str) -> None:
    assert toy.problem(a, b) == (prompt, answer)


def test_problem_rejects_out_of_range_operands() -> None:
    with pytest.raises(ValueError, match="0..99"):
        toy.problem(100, 1)


def test_encode_examples_matches_the_tokenizer(tokenizer: PreTrainedTokenizerFast) -> None:
    records = toy.problem_records([(7, 45), (99, 99)])
    rows = toy.encode_examples(records).tolist()
    for row, record in zip(rows, records, strict=True):
        expected = tokenizer.encode(record["prompt"] + record["answer"], add_special_tokens=True)
        assert row == [*expected, tokenizer.eos_token_id]


def test_split_is_disjoint_complete_and_seeded() -> None:
    train, held = toy.split_problems(seed=0, heldout=500)
    assert len(held) == 500 and len(train) == 9500
    assert not set(train) & set(held)
    assert set(train) | set(held) == {(a, b) for a in range(100) for b in range(100)}
    assert toy.split_problems(seed=0, heldout=500) == (train, held)
    assert toy.split_problems(seed=1, heldout=500)[1] != held


def test_tiny_build_loads_and_reruns_idempotently(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "quickstart"
    args = ["--out", str(out), "--student-steps", "2", "--teacher-steps", "3", "--heldout", "20"]
    args += ["--batch-size", "8", "--seed", "3"]
    assert toy.main(args) == 0

    train = [json.loads(line) for line in (out / "data/train.jsonl").read_text().splitlines()]
    held = [json.loads(line) for line in (out / "data/heldout.jsonl").read_text().splitlines()]
    assert len(train) == 9980 and len(held) == 20
    assert set(held[0]) == {"prompt", "answer"}
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    report = json.loads((out / "models/accuracy.json").read_text())
    assert report["num_problems"] == 20 and report["teacher"]["steps"] == 3
    assert 0.0 <= report["student"]["accuracy"] <= 1.0

    for name in ("student", "teacher"):
        path = out / "models" / name
        for file in toy.MODEL_FILES:
            assert (path / file).is_file(), f"{name}/{file}"
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path)
        assert model.config.vocab_size == 16 and model.config.eos_token_id == 13
        assert next(model.parameters()).dtype.is_floating_point
        assert tokenizer.encode(held[0]["prompt"])[0] == model.config.bos_token_id
        assert load_hf_config(path).num_layers == 4  # the trainer's config check accepts it
    assert not list((out / "models").glob(".*")), "temporary directories left behind"

    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    start = time.monotonic()
    rerun = subprocess.run(
        [sys.executable, "tools/make_toy_task.py", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert time.monotonic() - start < 15  # no torch import, no training
    assert "already complete" in rerun.stdout
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamps

    options = toy.parse_args(args)[1]
    assert toy.is_complete(out, options)
    assert not toy.is_complete(out, toy.Options(seed=4))
    (out / "models/student/model.safetensors").unlink()
    assert not toy.is_complete(out, options)


def test_narrow_build_adds_a_narrow_student_without_rebuilding(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "quickstart"
    base = ["--out", str(out), "--student-steps", "2", "--teacher-steps", "3", "--heldout", "20"]
    base += ["--batch-size", "8", "--seed", "3"]
    assert toy.main(base) == 0
    assert not (out / toy.NARROW_MANIFEST).exists()  # the default build does not pay for it
    base_stamps = {p: p.stat().st_mtime_ns for p in (out / "models").rglob("*") if p.is_file()}

    args = [*base, "--narrow", "--narrow-hidden", "32", "--narrow-steps", "2"]
    assert toy.main(args) == 0
    for path, stamp in base_stamps.items():  # the default build was reused, not redone
        if path.name != "accuracy.json":
            assert path.stat().st_mtime_ns == stamp, path
    path = out / "models" / toy.NARROW_NAME
    for file in toy.MODEL_FILES:
        assert (path / file).is_file(), file
    model = AutoModelForCausalLM.from_pretrained(path)
    hf = load_hf_config(path)
    assert (hf.hidden_size, hf.num_layers, hf.intermediate_size, hf.head_dim) == (32, 4, 128, 8)
    assert model.config.num_attention_heads == 4 and model.config.vocab_size == 16
    report = json.loads((out / "models/accuracy.json").read_text())
    assert report[toy.NARROW_NAME]["steps"] == 2 and report[toy.NARROW_NAME]["hidden"] == 32
    assert {"student", "teacher"} <= set(report)
    assert not list((out / "models").glob(".*")), "temporary directories left behind"

    _, options, narrow, _, _ = toy.parse_args(args)
    assert narrow == toy.NarrowOptions(hidden=32, steps=2)
    assert toy.is_complete(out, options) and toy.is_narrow_complete(out, options, narrow)
    assert not toy.is_narrow_complete(out, options, toy.NarrowOptions(hidden=32, steps=3))
    assert toy.parse_args(base)[2] is None

    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    rerun = subprocess.run(
        [sys.executable, "tools/make_toy_task.py", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "narrow student already complete" in rerun.stdout
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamps

    (out / "models" / toy.NARROW_NAME / "model.safetensors").unlink()
    assert toy.is_complete(out, options) and not toy.is_narrow_complete(out, options, narrow)


def test_fwd_problem_format() -> None:
    assert toy.fwd_problem(7, 45) == ("07+45==", "052")
    assert toy.fwd_problem(99, 99) == ("99+99==", "198")
    assert toy.fwd_problem(50, 50) == ("50+50==", "100")
    assert len(toy.fwd_problem(0, 0)[0]) == toy.SECOND_PROMPT_LENGTH


def test_second_task_adds_data_and_a_teacher_without_rebuilding(tmp_path: Path) -> None:
    out = tmp_path / "quickstart"
    base = ["--out", str(out), "--student-steps", "2", "--teacher-steps", "3", "--heldout", "20"]
    base += ["--batch-size", "8", "--seed", "3"]
    assert toy.main(base) == 0
    assert not (out / toy.SECOND_MANIFEST).exists()  # the default build does not pay for it
    base_stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}

    args = [*base, "--second-task", "--second-steps", "2"]
    assert toy.main(args) == 0
    for path, stamp in base_stamps.items():  # the default build was reused, not redone
        if path.name != "accuracy.json":
            assert path.stat().st_mtime_ns == stamp, path
    for file in toy.MODEL_FILES:
        assert (out / "models" / toy.SECOND_NAME / file).is_file(), file
    mixed = [json.loads(line) for line in (out / "data/multi_train.jsonl").read_text().splitlines()]
    train = [json.loads(line) for line in (out / "data/train.jsonl").read_text().splitlines()]
    assert len(mixed) == 2 * len(train) == 2 * 9980
    assert mixed[0] == {**train[0], "task": "add"}
    assert mixed[1]["task"] == "fwd" and mixed[1]["prompt"] == train[0]["prompt"] + "="
    held = (out / "data/fwd_heldout.jsonl").read_text().splitlines()
    assert len(held) == 20
    report = json.loads((out / "models/accuracy.json").read_text())
    assert set(report["two_tasks"]["accuracy"]) == {"student", "teacher", toy.SECOND_NAME}
    assert {"student", "teacher"} <= set(report)

    _, options, _, _, parsed = toy.parse_args(args)
    second = toy.SecondOptions(steps=parsed.second_steps)
    assert toy.is_second_complete(out, options, second)
    assert not toy.is_second_complete(out, options, toy.SecondOptions(steps=3))
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert toy.main(args) == 0  # reused
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamps
    with pytest.raises(SystemExit):
        toy.parse_args(["--second-steps", "5"])


def test_narrow_options_need_narrow_and_a_valid_width() -> None:
    assert toy.parse_args(["--narrow"])[2] == toy.NarrowOptions()
    with pytest.raises(SystemExit):
        toy.parse_args(["--narrow-steps", "5"])
    with pytest.raises(SystemExit):
        toy.parse_args(["--narrow", "--narrow-hidden", "60"])  # head_dim 15: odd


def test_first_word_records_answer_the_question_they_ask() -> None:
    records = toy.first_word_records(seed=3, count=300)
    lists = set()
    for record in records:
        example_q, example_a, question = record["prompt"]
        assert [example_q["role"], example_a["role"], question["role"]] == [
            "user",
            "assistant",
            "user",
        ]
        assert example_q["content"] == "Which word comes first in this list: sun, cat, box?"
        assert example_a["content"] == "sun"
        # an independent reading of the question: the words between the colon and the '?'
        head, _, tail = question["content"].partition(": ")
        assert head == "Which word comes first in this list"
        assert tail.endswith("?")
        words = tail[:-1].split(", ")
        assert len(words) == len(set(words)) == 3
        assert all(word.isalpha() and word.islower() for word in words)
        assert set(words) <= set(toy.WORDS)
        assert record["answer"] == words[0]
        lists.add(tuple(words))
    assert len(lists) == len(records)  # no list twice
    assert len({record["answer"] for record in records}) > 100  # the answers vary
    assert toy.first_word_records(seed=3, count=300) == records
    assert toy.first_word_records(seed=4, count=300) != records


def test_chat_task_files_split_without_overlap(tmp_path: Path) -> None:
    assert toy.main(["--chat-task", "first-word", "--out", str(tmp_path), "--heldout", "20",
                     "--train-prompts", "50"]) == 0  # fmt: skip
    read = lambda name: [
        json.loads(line) for line in (tmp_path / "data" / name).read_text().splitlines()
    ]
    heldout, train = read("heldout.jsonl"), read("train.jsonl")
    assert (len(heldout), len(train)) == (20, 50)
    assert heldout + train == toy.first_word_records(seed=0, count=70)
    key = lambda record: record["prompt"][-1]["content"]
    assert not {key(r) for r in heldout} & {key(r) for r in train}
    assert not (tmp_path / "models").exists()  # prompt files only
    with pytest.raises(ValueError, match="unknown chat task"):
        toy.build_chat_task(tmp_path, "nope", 0, 1, 1)
