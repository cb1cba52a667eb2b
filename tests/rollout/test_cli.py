"""The `oprd-mega` command line parses its subcommands."""

from __future__ import annotations

import pytest

from oprd_mega.cli import build_parser, main


def test_serve_arguments():
    args = build_parser().parse_args(
        ["serve", "--model", "/m", "--host", "127.0.0.1", "--port", "1234"]
    )
    assert (args.command, args.model, args.host, args.port) == ("serve", "/m", "127.0.0.1", 1234)


def test_serve_needs_a_model(capsys):
    with pytest.raises(SystemExit):
        main(["serve"])
    assert "--model" in capsys.readouterr().err


def test_serve_accepts_sglangs_model_path():
    args = build_parser().parse_args(["serve", "--model-path", "/m"])
    assert args.model == "/m"
