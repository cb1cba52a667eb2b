"""Bad command-line values: one line naming the flag (or file, or port) and exit code 2, before
any model loads. Each case is a probe of issue 18 that used to give a traceback or pass."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from oprd_mega.cli import main as oprd_mega
from oprd_mega.config.__main__ import main as check_config
from oprd_mega.train.cli import main as train_main
from tools.tiny_hf import make_tiny_model_dir


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("m") / "model", layers=1, hidden=32)


def _usage_error(capsys: pytest.CaptureFixture[str], run, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as info:
        run(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_serve_flags(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    serve = ["serve", "--model", str(model)]
    line = _usage_error(capsys, oprd_mega, [*serve, "--port", "70000"])
    assert "--port" in line and "1..65535" in line
    line = _usage_error(capsys, oprd_mega, [*serve, "--dtype", "float8"])
    assert "--dtype" in line and "float8" in line
    line = _usage_error(capsys, oprd_mega, [*serve, "--max-batch-size", "0"])
    assert "--max-batch-size" in line and ">= 1" in line
    missing = str(tmp_path / "nowhere")
    line = _usage_error(capsys, oprd_mega, ["serve", "--model", missing])
    assert "--model" in line and missing in line


def test_serve_on_a_taken_port_names_it(model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        code = oprd_mega(["serve", "--model", str(model), "--port", str(taken)])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"port {taken}" in err[0] and "in use" in err[0]


def test_evaluate_flags(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a", "answer": "b"}\n')
    evaluate = ["evaluate", "--model", str(model), "--prompts", str(prompts)]
    line = _usage_error(capsys, oprd_mega, [*evaluate, "--k", "0"])
    assert "--k" in line and ">= 1" in line
    line = _usage_error(capsys, oprd_mega, [*evaluate, "--temperature", "-1"])
    assert "--temperature" in line
    line = _usage_error(capsys, oprd_mega, [*evaluate, "--temperature", "nan"])
    assert "--temperature" in line
    missing = str(tmp_path / "absent.jsonl")
    line = _usage_error(capsys, oprd_mega, [*evaluate[:3], "--prompts", missing])
    assert "--prompts" in line and missing in line
    line = _usage_error(capsys, oprd_mega, ["evaluate", "--model", missing, *evaluate[3:]])
    assert "--model" in line and missing in line


def test_train_and_config_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = _usage_error(capsys, train_main, ["--config", "c.yaml", "--stop-at-step", "-1"])
    assert "--stop-at-step" in line
    line = _usage_error(capsys, check_config, ["c.yaml", "--world-size", "0"])
    assert "--world-size" in line


def test_a_world_size_that_does_not_fit_the_layout_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("student: {path: s}\nteacher: {path: t}\ndata: {path: p.jsonl}\n")
    monkeypatch.setenv("WORLD_SIZE", "3")  # as torchrun --nproc-per-node 3 sets it
    assert train_main(["--config", str(config), "parallel.tp=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "parallel.tp = 2" in "\n".join(err) and "world size 3" in "\n".join(err)
    assert "Traceback" not in "\n".join(err)
