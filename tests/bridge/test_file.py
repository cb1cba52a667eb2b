"""The bridge file: round trips, the distillation step's loader, and mismatch errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from oprd_mega.bridge import (
    BridgeFile,
    BridgeMetadata,
    BridgeMismatchError,
    ModelIdentity,
    StudentMap,
    check_bridge_models,
    load_bridge_file,
    save_bridge_file,
)
from oprd_mega.distill.layers import layer_pairs
from oprd_mega.models.hf_config import parse_hf_config

STUDENT = {
    "model_type": "llama",
    "hidden_size": 24,
    "intermediate_size": 48,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "vocab_size": 100,
    "max_position_embeddings": 64,
}
TEACHER = {**STUDENT, "model_type": "qwen3", "hidden_size": 32, "num_hidden_layers": 3}


def _identities() -> tuple[ModelIdentity, ModelIdentity]:
    student = ModelIdentity.from_args(parse_hf_config(STUDENT), "tiny-student")
    teacher = ModelIdentity.from_args(parse_hf_config(TEACHER), "tiny-teacher")
    return student, teacher


def _bridge(kind: str = "linear", rank: int = 4) -> BridgeFile:
    student, teacher = _identities()
    pairs = layer_pairs("all", 2, 3)
    torch.manual_seed(0)
    metadata = BridgeMetadata(
        rank, pairs, student, teacher, student_map=kind, rows=512, report=({"rank": rank},)
    )
    maps = {s: StudentMap(24, rank, kind, hidden=16) for s, _ in pairs}  # type: ignore[arg-type]
    teacher_maps = {t: (torch.randn(rank, 32), torch.randn(32)) for _, t in pairs}
    return BridgeFile(metadata, maps, teacher_maps)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_round_trip(tmp_path: Path, kind: str) -> None:
    bridge = _bridge(kind)
    path = save_bridge_file(bridge, tmp_path / "bridge.safetensors")
    loaded = load_bridge_file(path)
    assert loaded.metadata == bridge.metadata
    assert loaded.metadata.layer_pairs == ((1, 1), (2, 3))
    x = torch.randn(5, 24)
    for layer, module in bridge.student.items():
        torch.testing.assert_close(loaded.student[layer](x), module(x))
    for layer, (p_t, mu_t) in bridge.teacher.items():
        assert torch.equal(loaded.teacher[layer][0], p_t)
        assert torch.equal(loaded.teacher[layer][1], mu_t)
    assert [p.name for p in tmp_path.iterdir()] == ["bridge.safetensors"]


def test_the_distillation_step_reads_a_linear_bridge(tmp_path: Path) -> None:
    from oprd_mega.bridge.loaded import check_bridge, load_bridge

    bridge = _bridge()
    path = save_bridge_file(bridge, tmp_path / "bridge.safetensors")
    loaded = load_bridge(path)
    assert loaded.rank == 4
    check_bridge(loaded, list(bridge.metadata.layer_pairs), 24, 32, "bridge")
    assert torch.equal(loaded.student[2].weight(), bridge.student[2].weight())


def test_models_that_fit_pass() -> None:
    student, teacher = _identities()
    check_bridge_models(_bridge(), student, teacher, pairs=[(1, 1), (2, 3)], rank=4)


def test_mismatches_are_named() -> None:
    student, teacher = _identities()
    bridge = _bridge()
    wider = ModelIdentity("other", 48, 2, 100, student.config_hash)
    with pytest.raises(BridgeMismatchError, match="student.hidden_size: the bridge has 24"):
        check_bridge_models(bridge, wider, teacher)
    deeper = ModelIdentity.from_args(
        parse_hf_config({**TEACHER, "num_hidden_layers": 4}), "tiny-teacher"
    )
    with pytest.raises(BridgeMismatchError, match="teacher.num_layers: the bridge has 3") as err:
        check_bridge_models(bridge, student, deeper)
    assert "teacher.config_hash" in str(err.value)
    retrained = ModelIdentity("tiny-student", 24, 2, 100, "sha256:0")
    with pytest.raises(BridgeMismatchError, match="student.config_hash"):
        check_bridge_models(bridge, retrained, teacher)
    with pytest.raises(BridgeMismatchError, match="rank: the bridge has 4, expected 8"):
        check_bridge_models(bridge, student, teacher, rank=8)
    with pytest.raises(BridgeMismatchError, match=r"layer_pairs: \[\(2, 2\)\]"):
        check_bridge_models(bridge, student, teacher, pairs=[(1, 1), (2, 2)])


def test_inconsistent_bridges_are_refused(tmp_path: Path) -> None:
    bridge = _bridge()
    bridge.teacher[3] = (torch.randn(4, 30), torch.randn(32))
    target = tmp_path / "bad.safetensors"
    with pytest.raises(BridgeMismatchError, match=r"teacher.3.P_T: shape \[4, 30\], expected"):
        save_bridge_file(bridge, target)
    assert not target.exists()  # nothing written
    student, teacher = _identities()
    with pytest.raises(BridgeMismatchError, match="layer_pairs: teacher layer 5 outside"):
        BridgeMetadata(4, [(1, 5)], student, teacher)
    with pytest.raises(BridgeMismatchError, match="rank: 40 is outside"):
        BridgeMetadata(40, [(1, 1)], student, teacher)


def test_foreign_and_missing_files(tmp_path: Path) -> None:
    plain = tmp_path / "plain.safetensors"
    save_file({"student.1.P_S": torch.zeros(2, 3)}, str(plain))
    with pytest.raises(BridgeMismatchError, match="plain.safetensors: not an OPRD bridge"):
        load_bridge_file(plain)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_bridge_file(tmp_path / "missing.safetensors")
    # A file whose tensors disagree with its own metadata names the key.
    bridge = _bridge()
    path = save_bridge_file(bridge, tmp_path / "b.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    tensors["student.2.P_S"] = torch.zeros(4, 20)
    save_file(tensors, str(path), metadata=header)
    with pytest.raises(BridgeMismatchError, match=r"b.safetensors: student.2: maps \[20\]"):
        load_bridge_file(path)
