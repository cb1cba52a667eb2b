"""The one `oprd-mega` command line: every subcommand, help on every flag, --version, flags and
overrides in any order, the old console scripts as aliases."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections.abc import Iterator
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from oprd_mega.cli import DELEGATED, build_parser, delegated_main, main
from oprd_mega.config.__main__ import build_parser as config_parser
from oprd_mega.train.cli import main as train_module_main

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "tiny_cpu.yaml"
COMMANDS = ("train", "serve", "evaluate", "convert", "bridge", "bench", "config", "plot",
            "prepare-model", "prune")  # fmt: skip


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _all_parsers() -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every parser reachable from `oprd-mega`, delegated tools' parsers included."""
    from oprd_kernels.benchmark import build_parser as bench_parser
    from oprd_mega.bridge.build import build_parser as bridge_parser
    from oprd_mega.convert.cli import _parser as convert_parser
    from oprd_mega.convert.packaged import _parser as packaged_parser
    from oprd_mega.convert.prune import _parser as prune_parser

    stack = [("oprd-mega", build_parser())]
    own = {"convert": convert_parser(), "bridge": bridge_parser(), "bench": bench_parser(),
           "config": config_parser(), "prepare-model": packaged_parser(),
           "prune": prune_parser()}  # fmt: skip
    while stack:
        name, parser = stack.pop()
        yield name, parser
        for sub_name, sub in _subparsers(parser).items():
            stack.append((f"{name} {sub_name}", own.get(sub_name, sub)))


def test_every_subcommand_is_there() -> None:
    assert sorted(_subparsers(build_parser())) == sorted(COMMANDS)
    assert set(DELEGATED) == {"convert", "bridge", "bench", "config", "prepare-model", "prune"}


def test_every_flag_has_help() -> None:
    missing = [
        f"{name}: {action.option_strings or action.dest}"
        for name, parser in _all_parsers()
        for action in parser._actions
        if not action.help and not isinstance(action, argparse._SubParsersAction)
    ]
    assert missing == []


@pytest.mark.parametrize("command", COMMANDS)
def test_help_names_the_one_command(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: oprd-mega {command}")


def test_version_is_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    declared = re.search(r'version="([^"]+)"', (ROOT / "setup.py").read_text()).group(1)
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"oprd-mega {declared}"


@pytest.mark.parametrize("entry", [main, train_module_main])
def test_train_takes_flags_and_overrides_in_any_order(
    entry: object, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--config", str(EXAMPLE), "distillation.methd=oprd", "--resume", "never",
            "seed=-1", "--stop-at-step", "3", "optimizer.lr=0"]  # fmt: skip
    if entry is main:
        argv = ["train", *argv]
    assert entry(argv) == 2  # type: ignore[operator]
    err = capsys.readouterr().err
    # Every override reached the loader (each is named), not "unrecognized arguments".
    assert "distillation.methd" in err and "seed = -1" in err and "optimizer.lr = 0" in err


def test_config_takes_flags_and_overrides_in_any_order(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = ["config", str(EXAMPLE), "seed=7", "--world-size", "2", "optimizer.lr=0.25"]
    # --world-size runs train's checks, which read the models: the example's relative paths
    # lead nowhere from an empty folder (the quickstart builds them under the repository
    # root), so the answer names the student's directory.
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert "student.path = 'runs/quickstart/models/student'" in capsys.readouterr().err
    argv = ["config", str(EXAMPLE), "seed=7", "optimizer.lr=0.25"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "\nseed: 7\n" in f"\n{out}" and "  lr: 0.25\n" in out


def test_stray_arguments_are_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as done:
        main(["serve", "--model", str(tmp_path), "a.b=1"])  # serve takes no overrides
    assert done.value.code == 2
    assert "unrecognized arguments: a.b=1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--config", str(EXAMPLE), "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_old_console_scripts_are_aliases() -> None:
    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert scripts["oprd-mega"] == "oprd_mega.cli:main"
    aliases = {"oprd-convert-checkpoint": "convert", "oprd-build-bridge": "bridge",
               "oprd-bench-kernels": "bench"}  # fmt: skip
    for alias, command in aliases.items():
        module, function = scripts[alias].split(":")
        assert (module, function) == (DELEGATED[command][0], "main")
        assert delegated_main(command).__module__ == module


def test_installed_script_runs() -> None:
    script = Path(sys.executable).parent / "oprd-mega"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "oprd_mega.cli"]
    result = subprocess.run([*cmd, "bench", "--help"], capture_output=True, text=True,
                            timeout=120, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: oprd-mega bench")
