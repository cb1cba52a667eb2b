"""The converter's command line end to end: console script, tools script under torchrun."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.torchrun_utils import run_torchrun
from tools.tiny_hf import make_tokenizer
from tools.tiny_hf_models import make_tiny_model

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "convert_checkpoint.py"


def console(*args: str) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).parent / "oprd-convert-checkpoint"
    cmd = [str(script)] if script.exists() else [sys.executable, str(TOOL)]
    return subprocess.run(
        [*cmd, *args],
        capture_output=True,
        text=True,
        timeout=180,
        env={"CUDA_VISIBLE_DEVICES": ""} | {k: v for k, v in __import__("os").environ.items()},
    )


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("cli")
    hf = make_tiny_model("qwen2", base / "hf", tied=False)
    make_tokenizer().save_pretrained(hf)
    # 1000 tokens padded to a multiple of 48: 1008 rows, split over TP2 by verify below
    result = console(
        "hf-to-mcore",
        "--hf",
        str(hf),
        "--mcore",
        str(base / "mcore"),
        "--make-vocab-size-divisible-by",
        "48",
    )
    assert result.returncode == 0, result.stderr
    assert "wrote Megatron checkpoint" in result.stdout
    recorded = json.loads((base / "mcore" / "oprd_checkpoint.json").read_text())
    assert (recorded["make_vocab_size_divisible_by"], recorded["padded_vocab_size"]) == (48, 1008)
    return hf, base / "mcore"


def test_verify_under_torchrun_prints_every_layer_and_passes(converted) -> None:
    hf, mcore = converted
    result = run_torchrun(
        TOOL,
        "verify",
        "--hf",
        str(hf),
        "--mcore",
        str(mcore),
        "--tp",
        "2",
        "--sp",
        "--seq-len",
        "8",
        nproc=2,
        timeout=240,
    )
    for name in ("layer 1", "layer 2", "layer 3", "final_norm", "logits"):
        assert name in result.stdout
    assert "OK: all within tolerance" in result.stdout


def test_verify_exits_non_zero_for_other_weights(converted, tmp_path: Path) -> None:
    _, mcore = converted
    other = make_tiny_model("qwen2", tmp_path / "other", seed=123)
    with pytest.raises(AssertionError, match="exited 1") as info:
        run_torchrun(
            TOOL,
            "verify",
            "--hf",
            str(other),
            "--mcore",
            str(mcore),
            "--seq-len",
            "8",
            nproc=1,
            timeout=240,
        )
    assert "FAILED: layer 1" in str(info.value)


def test_mcore_to_hf_copies_tokenizer_and_config(converted, tmp_path: Path) -> None:
    hf, mcore = converted
    out = tmp_path / "back"
    result = console("mcore-to-hf", "--mcore", str(mcore), "--hf", str(out), "--no-progress")
    assert result.returncode == 0, result.stderr
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (hf / name).read_bytes(), name
    original = load_file(str(hf / "model.safetensors"))
    back = {}
    for file in out.glob("*.safetensors"):
        back.update(load_file(str(file)))
    assert sorted(back) == sorted(original)
    assert all(back[k].equal(original[k]) for k in original)


def test_bad_input_exits_2_with_one_line_naming_the_problem(tmp_path: Path) -> None:
    result = console(
        "hf-to-mcore", "--hf", str(tmp_path / "absent"), "--mcore", str(tmp_path / "m")
    )
    assert result.returncode == 2
    assert "error:" in result.stderr and str(tmp_path / "absent") in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "m").exists()


def test_nonfinite_weights_exit_2_naming_the_tensor_unless_allowed(tmp_path: Path) -> None:
    hf = make_tiny_model("llama", tmp_path / "hf")
    weights = load_file(str(hf / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj.weight"
    weights[name][0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    save_file(weights, str(hf / "model.safetensors"))
    out = tmp_path / "out" / "mcore"
    result = console("hf-to-mcore", "--hf", str(hf), "--mcore", str(out), "--no-progress")
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in result.stderr  # (Megatron's import warns)
    assert name in lines[0] and "model.safetensors" in lines[0]
    assert "3 non-finite" in lines[0] and "--allow-nonfinite" in lines[0]
    assert not out.exists() and not [p for p in out.parent.iterdir() if ".tmp-" in p.name]
    result = console(
        "hf-to-mcore", "--hf", str(hf), "--mcore", str(out), "--no-progress", "--allow-nonfinite"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "metadata.json").is_file()


def test_a_truncated_distcp_file_is_named(converted, tmp_path: Path) -> None:
    _, mcore = converted
    damaged = tmp_path / "mcore"
    shutil.copytree(mcore, damaged)
    shard = sorted(damaged.glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:64])
    result = console("mcore-to-hf", "--mcore", str(damaged), "--hf", str(tmp_path / "hf"))
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert str(shard) in lines[0] and "truncated (64 of" in lines[0]
    assert not (tmp_path / "hf").exists()


def test_a_truncated_metadata_index_is_named(converted, tmp_path: Path) -> None:
    _, mcore = converted
    damaged = tmp_path / "mcore"
    shutil.copytree(mcore, damaged)
    index = damaged / ".metadata"
    index.write_bytes(index.read_bytes()[: index.stat().st_size // 2])
    result = console("mcore-to-hf", "--mcore", str(damaged), "--hf", str(tmp_path / "hf"))
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"{index} is not a readable checkpoint index (UnpicklingError" in lines[0]
    assert not (tmp_path / "hf").exists()


def test_verify_against_a_deeper_hf_model_is_one_line(converted, tmp_path: Path) -> None:
    _, mcore = converted
    deeper = make_tiny_model("qwen2", tmp_path / "deeper", tied=False, num_hidden_layers=5)
    result = console("verify", "--hf", str(deeper), "--mcore", str(mcore))
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert "num_layers 5 vs 3" in lines[0] and str(deeper) in lines[0]


def test_a_bad_vocabulary_multiple_is_refused_naming_the_flag(converted, tmp_path: Path) -> None:
    hf, _ = converted
    args = ["--hf", str(hf), "--mcore", str(tmp_path / "m"), "--make-vocab-size-divisible-by", "0"]
    result = console("hf-to-mcore", *args)
    assert result.returncode == 2
    assert "--make-vocab-size-divisible-by must be a positive integer, got 0" in result.stderr
    assert not (tmp_path / "m").exists()


def test_a_hand_set_split_that_does_not_fit_is_refused_naming_the_flags(converted) -> None:
    """3 layers on 2 stages: first 3 leaves the last stage none; refused before any process
    group, in one line naming the flags."""
    hf, mcore = converted
    flags = ["--pp", "2", "--decoder-first-pipeline-num-layers", "3"]
    result = console("verify", "--hf", str(hf), "--mcore", str(mcore), *flags)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert lines[0].endswith(
        "--decoder-first-pipeline-num-layers 3 with --pp 2: the model has 3 layers; it leaves 0 "
        "of the 3 layer(s) run for the 1 last stage(s), which need equal numbers and at least one "
        "layer each"
    )
    zero = console("verify", "--hf", str(hf), "--mcore", str(mcore), "--pp", "2", *flags[2:3], "0")
    assert zero.returncode == 2
    assert "--decoder-first-pipeline-num-layers 0: pipeline_split.first must be a positive" in (
        zero.stderr
    )
