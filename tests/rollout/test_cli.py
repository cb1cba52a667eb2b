"""The `oprd-mega` command line parses its subcommands."""

from __future__ import annotations

import pytest

from oprd_mega.cli import build_parser, main


def test_serve_arguments(tmp_path):
    model = str(tmp_path)  # --model must be an existing folder
    args = build_parser().parse_args(
        ["serve", "--model", model, "--host", "127.0.0.1", "--port", "1234"]
    )
    assert (args.command, args.model, args.host, args.port) == ("serve", model, "127.0.0.1", 1234)


def test_serve_needs_a_model(capsys):
    with pytest.raises(SystemExit):
        main(["serve"])
    assert "--model" in capsys.readouterr().err


def test_serve_accepts_sglangs_model_path(tmp_path):
    args = build_parser().parse_args(["serve", "--model-path", str(tmp_path)])
    assert args.model == str(tmp_path)


def test_serve_enable_memory_saver_is_sglangs_flag(tmp_path):
    parser = build_parser()
    assert parser.parse_args(["serve", "--model", str(tmp_path)]).enable_memory_saver is False
    args = parser.parse_args(["serve", "--model", str(tmp_path), "--enable-memory-saver"])
    assert args.enable_memory_saver is True
