"""Check a configuration: ``oprd-mega config FILE.yaml [key.sub=value ...]``.

Prints the resolved YAML (every key), or the problems and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from oprd_mega.cli_args import positive_int
from oprd_mega.config.errors import ConfigError
from oprd_mega.config.loader import dump_config, load_config, to_yaml
from oprd_mega.errors import cannot_write


def build_parser(prog: str = "oprd-mega config") -> argparse.ArgumentParser:
    """The checker's command line (``oprd-mega config``, ``python -m oprd_mega.config``)."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    parser.add_argument("config", help="YAML configuration file")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value (a YAML value)")
    parser.add_argument(
        "--world-size",
        type=positive_int,
        help="also run train's checks for this many ranks: the layout, the input files and the "
        "model directories (shapes, pipeline split, recompute, tokenizers)",
    )
    parser.add_argument("--dump", help="write the resolved configuration here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Validate, then print or write the resolved configuration."""
    # Intermixed: flags and overrides in any order.
    args = build_parser().parse_intermixed_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        if args.world_size is not None:
            from oprd_mega.config.model_files import check_launch

            check_launch(config, args.world_size)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.dump:
        try:
            dump_config(config, args.dump)
        except OSError as exc:
            print(
                f"oprd-mega config: error: {cannot_write('--dump', args.dump, exc)}",
                file=sys.stderr,
            )
            return 2
    else:
        sys.stdout.write(to_yaml(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
