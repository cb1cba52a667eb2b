"""Checks that read the model directories: shapes against the layout, shared tokenizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from oprd_mega.config import ConfigError
from oprd_mega.config.model_files import check_model_files, check_tokenizers, model_args
from oprd_mega.models.shapes import PipelineSplit
from tests.config.helpers import minimal
from tools.tiny_hf import make_tiny_model_dir, make_tokenizer


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    make_tiny_model_dir(root / "student", seed=0, layers=2, hidden=64)
    make_tiny_model_dir(root / "teacher", seed=1, layers=3, hidden=64)
    return root


def _config(root: Path, teacher: str = "teacher", *overrides: str):
    return minimal(f"student.path={root / 'student'}", f"teacher.path={root / teacher}", *overrides)


def test_same_tokenizer_passes_and_pairs_are_returned(models: Path) -> None:
    (pairs,) = check_model_files(_config(models))
    assert pairs and all(1 <= s <= 2 and 1 <= t <= 3 for s, t in pairs)


def test_another_tokenizer_names_both_paths_and_the_first_differing_token(
    models: Path, tmp_path: Path
) -> None:
    other = tmp_path / "teacher"
    shutil.copytree(models / "teacher", other)
    tokenizer = make_tokenizer()
    tokenizer.add_tokens(["<think>"], special_tokens=True)  # a fine-tune's extra token
    tokenizer.save_pretrained(other)
    vocab = json.loads((other / "tokenizer.json").read_text())["model"]["vocab"]
    swapped = sorted(vocab, key=vocab.get)[10:12]  # two ordinary tokens trade ids
    data = json.loads((other / "tokenizer.json").read_text())
    data["model"]["vocab"][swapped[0]], data["model"]["vocab"][swapped[1]] = (
        vocab[swapped[1]],
        vocab[swapped[0]],
    )
    (other / "tokenizer.json").write_text(json.dumps(data))
    config = minimal(f"student.path={models / 'student'}", f"teacher.path={other}")
    with pytest.raises(ConfigError) as info:
        check_tokenizers(config)
    text = str(info.value)
    assert f"student.path = {str(models / 'student')!r}" in text
    assert f"teacher.path = {str(other)!r}" in text
    assert f"token id 10 is {swapped[0]!r} in the student and {swapped[1]!r} in the teacher" in (
        text
    )


def test_a_teacher_without_tokenizer_files_reads_the_students(models: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(models / "teacher" / name, bare / name)
    check_tokenizers(minimal(f"student.path={models / 'student'}", f"teacher.path={bare}"))


def test_a_layout_that_does_not_fit_fails_naming_the_key(models: Path) -> None:
    with pytest.raises(ConfigError, match=r"parallel\.tp = 3: must divide the student's"):
        check_model_files(_config(models, "teacher", "parallel.tp=3"))


def test_each_models_pipeline_split_reaches_what_is_built(models: Path) -> None:
    """The sections' splits are applied to the models read from config.json (what the trainer
    builds) and checked there: a 2-layer student fits {first: 1} at pp 2, {first: 2} not."""
    config = _config(models, "teacher", "parallel.pp=2", "student.pipeline_split={first: 1}")
    assert model_args(config.student).pipeline_split == PipelineSplit(first=1)
    assert model_args(config.teacher).pipeline_split is None
    check_model_files(config)
    bad = _config(models, "teacher", "parallel.pp=2", "student.pipeline_split={first: 2}")
    with pytest.raises(ConfigError, match=r"student\.pipeline_split = \{first: 2\}: the student"):
        check_model_files(bad)


def test_an_unreadable_model_config_names_the_key(models: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(models / "teacher", broken)
    (broken / "config.json").write_text('{"model_type": "mistral"}')
    with pytest.raises(ConfigError, match=r"teacher\.path = .*model_type='mistral'"):
        check_model_files(minimal(f"student.path={models / 'student'}", f"teacher.path={broken}"))
