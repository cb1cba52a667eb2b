"""Command line of the trainer: ``oprd-mega train`` and ``python -m oprd_mega.train``."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from oprd_mega.cli_args import positive_int
from oprd_mega.train.logs import add_log_level_argument, logger, setup_logging

DESCRIPTION = (
    "Train a student with OPRD (or an OPD baseline) under torchrun: "
    "torchrun --nproc-per-node N -m oprd_mega.train --config FILE.yaml [key.sub=value ...]"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The trainer's arguments (shared by both entry points)."""
    parser.add_argument("--config", required=True, help="YAML config (keys: docs/config.md)")
    parser.add_argument(
        "--resume",
        choices=("auto", "always", "never"),
        default=None,
        help="override checkpoint.resume: auto (resume when a checkpoint exists), always, never",
    )
    parser.add_argument(
        "--stop-at-step",
        type=positive_int,
        default=None,
        metavar="K",
        help="save a checkpoint after step K and exit (resume later with the same command)",
    )
    add_log_level_argument(parser)
    parser.add_argument(
        "overrides", nargs="*", metavar="key.sub=value", help="config overrides, applied in order"
    )


def run(args: argparse.Namespace) -> int:
    """Load the config and train; a config or run error is one clear message and exit code."""
    from oprd_mega.config import ConfigError, load_config
    from oprd_mega.config.model_files import check_launch

    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f"checkpoint.resume={args.resume}")
    rank = int(os.environ.get("RANK", "0"))
    setup_logging(getattr(args, "log_level", "INFO"), rank)
    try:
        config = load_config(args.config, overrides)
        # What `oprd-mega config --world-size N` checks, against torchrun's world size, before
        # any process group exists.
        check_launch(config, int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as exc:
        if rank == 0:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    from oprd_mega.train.checkpoint import CheckpointError
    from oprd_mega.train.trainer import TrainingError, train

    try:
        summary = train(config, stop_at=args.stop_at_step, launch_checked=True)
    except (TrainingError, CheckpointError, ConfigError) as exc:
        shared = getattr(exc, "shared", False)  # every rank raised it at one collective point
        if rank == 0:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        elif not shared:  # this rank's own failure
            print(f"error (rank {rank}): {exc}", file=sys.stderr, flush=True)
        if shared:  # no rank exits (and has torchrun stop the others) before rank 0 has said it
            from oprd_mega.parallel.distributed import barrier

            barrier()
        return 1
    logger.info(
        f"done: {summary.steps_run} steps (to step {summary.final_step}) in "
        f"{summary.seconds:.1f} s; skipped {summary.skipped_steps}; last checkpoint "
        f"{summary.checkpoint}"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m oprd_mega.train``."""
    parser = argparse.ArgumentParser(prog="python -m oprd_mega.train", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_intermixed_args(argv))  # flags and overrides in any order
