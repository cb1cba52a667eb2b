"""write_hf_directory: the one atomic writer of Hugging Face directories (export, mcore-to-hf)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from oprd_mega.convert.hf_io import write_hf_directory


def test_writes_shards_index_and_aux_files(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    (source / "config.json").write_text('{"model_type": "llama"}')
    tensors = {"a.weight": torch.arange(6.0).reshape(2, 3), "b.weight": torch.ones(4)}
    target = write_hf_directory(
        iter(tensors.items()), tmp_path / "out" / "hf", source, max_shard_bytes=24
    )
    names = sorted(p.name for p in target.iterdir())
    assert names == [
        "config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ]
    loaded: dict[str, torch.Tensor] = {}
    for name in names[1:3]:
        loaded.update(load_file(str(target / name)))
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["hf"]  # no temporary left


def test_a_failure_leaves_nothing(tmp_path: Path) -> None:
    def failing():
        yield "a.weight", torch.ones(2)
        raise RuntimeError("gather failed")

    with pytest.raises(RuntimeError, match="gather failed"):
        write_hf_directory(failing(), tmp_path / "hf", tmp_path)
    assert list(tmp_path.iterdir()) == []
