"""Bad inputs to the converters: clear errors naming the field/file, nothing written.

All of these fail during validation, before any process group or Megatron model exists.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from oprd_mega.convert.convert import hf_to_mcore, mcore_to_hf
from oprd_mega.convert.hf_io import CheckpointError
from oprd_mega.models.hf_config import ConfigError
from tools.tiny_hf_models import make_tiny_model


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return make_tiny_model("llama", tmp_path_factory.mktemp("src") / "hf")


def broken_copy(source: Path, tmp_path: Path, *, config=None, tensors=None) -> Path:
    target = tmp_path / "broken"
    shutil.copytree(source, target)
    if config is not None:
        data = json.loads((target / "config.json").read_text())
        config(data)
        (target / "config.json").write_text(json.dumps(data))
    if tensors is not None:
        weights = load_file(str(target / "model.safetensors"))
        tensors(weights)
        save_file(weights, str(target / "model.safetensors"))
    return target


def assert_nothing_written(parent: Path, target: Path) -> None:
    assert not target.exists()
    assert not [p.name for p in parent.iterdir() if ".tmp-" in p.name]
    assert not dist.is_initialized(), "validation must fail before distributed start-up"


CASES = {
    "unsupported_model_type": (
        {"config": lambda c: c.update(model_type="mistral")},
        ConfigError,
        "model_type='mistral'",
    ),
    "rope_scaling": (
        {"config": lambda c: c.update(rope_parameters={"rope_type": "dynamic", "factor": 2.0})},
        ConfigError,
        "rope_type='dynamic'",
    ),
    "missing_weight": (
        {"tensors": lambda w: w.pop("model.layers.1.mlp.down_proj.weight")},
        CheckpointError,
        r"missing.*model\.layers\.1\.mlp\.down_proj\.weight",
    ),
    "shape_mismatch": (
        {"config": lambda c: c.update(intermediate_size=128)},
        CheckpointError,
        r"model\.layers\.0\.mlp\.gate_proj\.weight has shape \(160, 96\).*\(128, 96\)",
    ),
    "unexpected_weight": (
        {"tensors": lambda w: w.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(96)})},
        CheckpointError,
        r"not used.*q_proj\.bias",
    ),
    "fewer_layers_in_config": (
        {"config": lambda c: c.update(num_hidden_layers=2)},
        CheckpointError,
        r"not used.*model\.layers\.2\.",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hf_to_mcore_rejects(source: Path, tmp_path: Path, case: str) -> None:
    edits, error, message = CASES[case]
    broken = broken_copy(source, tmp_path, **edits)
    out = tmp_path / "out" / "mcore"
    out.parent.mkdir()
    with pytest.raises(error, match=message):
        hf_to_mcore(broken, out, progress=False)
    assert_nothing_written(out.parent, out)


def test_missing_files_name_the_path(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "mcore"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        hf_to_mcore(tmp_path / "nowhere", out)
    no_config = broken_copy(source, tmp_path)
    (no_config / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf_to_mcore(no_config, out)
    (no_config / "model.safetensors").unlink()
    shutil.copy(source / "config.json", no_config / "config.json")
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors"):
        hf_to_mcore(no_config, out)
    assert_nothing_written(tmp_path, out)


def test_existing_target_is_left_alone(source: Path, tmp_path: Path) -> None:
    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="taken"):
        hf_to_mcore(source, target)
    with pytest.raises(FileExistsError, match="taken"):
        mcore_to_hf(source, target)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]


def test_mcore_to_hf_needs_an_oprd_checkpoint(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "hf_out"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        mcore_to_hf(tmp_path / "nowhere", out)
    with pytest.raises(FileNotFoundError, match="oprd_checkpoint.json"):
        mcore_to_hf(source, out)  # an HF directory is not a Megatron checkpoint
    assert_nothing_written(tmp_path, out)


def test_a_truncated_safetensors_file_is_named(source: Path, tmp_path: Path) -> None:
    broken = broken_copy(source, tmp_path)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    out = tmp_path / "mcore"
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors"):
        hf_to_mcore(broken, out, progress=False)
    assert_nothing_written(tmp_path, out)


def _checkpoint_files(source: Path, directory: Path, fmt: dict) -> Path:
    """The files read_mcore_args reads (no tensors: it reads none)."""
    (directory / "hf").mkdir(parents=True)
    shutil.copy2(source / "config.json", directory / "hf" / "config.json")
    (directory / "metadata.json").write_text("{}")
    (directory / "oprd_checkpoint.json").write_text(json.dumps({"format_version": 1, **fmt}))
    return directory


def test_the_recorded_padded_vocabulary_is_read_and_checked(source: Path, tmp_path: Path) -> None:
    from oprd_mega.convert.mcore_io import read_mcore_args

    padded = {"make_vocab_size_divisible_by": 48, "padded_vocab_size": 1008}
    args = read_mcore_args(_checkpoint_files(source, tmp_path / "new", padded))
    assert (args.vocab_size, args.padded_vocab_size) == (1000, 1008)
    legacy = read_mcore_args(_checkpoint_files(source, tmp_path / "legacy", {}))
    assert legacy.padded_vocab_size == 1000  # written before padding: exactly vocab_size rows
    wrong = _checkpoint_files(source, tmp_path / "wrong", {**padded, "padded_vocab_size": 1024})
    with pytest.raises(CheckpointError, match="padded_vocab_size=1024 does not match"):
        read_mcore_args(wrong)
