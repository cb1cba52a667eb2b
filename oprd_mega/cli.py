"""The `oprd-mega` command line: one subcommand per entry point (train, serve, evaluate)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def _add_serve(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run the embedded SGLang-compatible rollout server on CPU",
        description=(
            "Serve a Hugging Face model directory over SGLang's native HTTP API "
            "(/generate, /health, /get_model_info, weight updates) with transformers."
        ),
    )
    parser.add_argument("--model", required=True, help="Hugging Face model directory")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=30000, help="TCP port (default 30000)")
    parser.add_argument(
        "--max-batch-size", type=int, default=32, help="most sequences decoded together"
    )
    parser.add_argument("--dtype", default="float32", help="torch dtype of the weights")
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="base seed for sampling (default: random, so that servers never repeat each other)",
    )
    parser.add_argument(
        "--weight-version", default="default", help="weight version reported before any update"
    )
    parser.set_defaults(func=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from oprd_mega.rollout.embedded_server import ServerConfig, serve_forever

    serve_forever(
        ServerConfig(
            model_path=args.model,
            host=args.host,
            port=args.port,
            max_batch_size=args.max_batch_size,
            dtype=args.dtype,
            seed=args.seed,
            weight_version=args.weight_version,
        )
    )
    return 0


def _add_train(subparsers: argparse._SubParsersAction) -> None:
    from oprd_mega.train.cli import DESCRIPTION, add_arguments, run

    parser = subparsers.add_parser(
        "train", help="train a student (under torchrun)", description=DESCRIPTION
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def _add_evaluate(subparsers: argparse._SubParsersAction) -> None:
    from oprd_mega.train.evaluation import add_arguments, run

    parser = subparsers.add_parser(
        "evaluate",
        help="Avg@k of a model directory on held-out prompts (the trainer's scoring)",
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def _add_plot(subparsers: argparse._SubParsersAction) -> None:
    from oprd_mega.train.plot import DESCRIPTION, add_arguments, run

    parser = subparsers.add_parser(
        "plot",
        help="draw runs (accuracy, loss, per-layer alignment), bridge reports or kernel "
        "benchmarks to an image",
        description=DESCRIPTION,
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand registered."""
    parser = argparse.ArgumentParser(prog="oprd-mega", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_train(subparsers)
    _add_serve(subparsers)
    _add_evaluate(subparsers)
    _add_plot(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen subcommand; returns the process exit code."""
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
