"""Prompt datasets from JSONL and Parquet, with the chat template or raw, and their errors."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from oprd_mega.data.prompts import PromptDataError, load_prompts
from tools.tiny_hf import make_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_chat_template_matches_tokenizer(tmp_path, tokenizer):
    rows = [
        {"prompt": "the quick brown fox", "label": "a"},
        {"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "dog"}]},
    ]
    prompts = load_prompts(write_jsonl(tmp_path / "p.jsonl", rows), tokenizer)
    assert [p.index for p in prompts] == [0, 1]
    want = tokenizer.encode(
        "<|user|>the quick brown fox<|end|><|assistant|>", add_special_tokens=False
    )
    assert list(prompts[0].prompt_ids) == want
    assert prompts[0].extra == {"label": "a"}
    text = tokenizer.decode(list(prompts[1].prompt_ids))
    assert text == "<|system|>be brief<|end|><|user|>dog<|end|><|assistant|>"


def test_parquet_raw_and_system_prompt(tmp_path, tokenizer):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"question": ["lazy dog", "fox"], "answer": ["1", "2"]}), path)
    raw = load_prompts(path, tokenizer, prompt_key="question", chat_template=False)
    assert [list(p.prompt_ids) for p in raw] == [
        tokenizer.encode("lazy dog"),
        tokenizer.encode("fox"),
    ]
    assert raw[1].extra == {"answer": "2"}
    chat = load_prompts(path, tokenizer, prompt_key="question", system_prompt="hi")
    assert tokenizer.decode(list(chat[0].prompt_ids)).startswith(
        "<|system|>hi<|end|><|user|>lazy dog"
    )


def test_errors_name_file_row_and_column(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, {"text": "b"}])
    with pytest.raises(PromptDataError, match=r"p\.jsonl row 1: no column 'prompt'.*\['text'\]"):
        load_prompts(path, tokenizer)
    long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "x " * 50}, {"prompt": "dog"}])
    with pytest.raises(
        PromptDataError,
        match=r"long\.jsonl row 0: prompt has \d+ tokens, more than max_prompt_length=10",
    ):
        load_prompts(long, tokenizer, max_prompt_length=10)
    kept = load_prompts(long, tokenizer, max_prompt_length=10, on_too_long="skip")
    assert [p.index for p in kept] == [1]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{oops\n')
    with pytest.raises(PromptDataError, match=r"bad\.jsonl:2: invalid JSON"):
        load_prompts(bad, tokenizer)
    with pytest.raises(PromptDataError, match="does not exist"):
        load_prompts(tmp_path / "missing.jsonl", tokenizer)
    with pytest.raises(PromptDataError, match=r"unknown prompt file type '\.csv'"):
        (tmp_path / "p.csv").write_text("prompt\n")
        load_prompts(tmp_path / "p.csv", tokenizer)
    weird = write_jsonl(tmp_path / "w.jsonl", [{"prompt": [{"content": "no role"}]}])
    with pytest.raises(PromptDataError, match=r"w\.jsonl row 0: a chat prompt must be"):
        load_prompts(weird, tokenizer)
