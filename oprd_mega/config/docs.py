"""docs/config.md from the configuration models: ``python -m oprd_mega.config.docs [--check]``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from oprd_mega.config.fields import groups
from oprd_mega.config.schema import TrainConfig

DOC_PATH = Path(__file__).resolve().parents[2] / "docs" / "config.md"

HEADER = """# Configuration reference

Generated from `oprd_mega/config` by `python -m oprd_mega.config.docs`; do not edit by hand
(`tests/config` fails when this file is out of date).

A run reads one YAML file and then dotted overrides, each a YAML value:

```bash
oprd-mega train --config examples/tiny_cpu.yaml optimizer.lr=3e-4 \\
    'distillation.layers=[2,4]' parallel.sp=true evaluation.sampling=null
```

`load_config(path, overrides)` validates everything at once; each error names the dotted key,
the value and what is allowed, and unknown keys get a did-you-mean suggestion. Relative paths
are relative to the working directory. `dump_config` writes the resolved configuration (every
key, defaults included) for checkpoints; it loads back to an equal object.
`data_parallel_size(config, world_size)` checks the layout against the world size,
`check_paths(config)` the input files, and `check_models(config, student_args, teacher_args)`
what needs the models' shapes (equal widths for `identity`, layer numbers, tp/pp against heads
and depth, one vocabulary for OPD).
"""


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("``", "`").replace("|", "\\|")


def render() -> str:
    """The whole reference as Markdown."""
    lines = [HEADER]
    for group in groups(TrainConfig):
        title = f"`{group.key}`" if group.key else "Top level"
        lines.append(f"## {title}\n")
        description = _cell(group.description)
        if group.nullable:
            description += " May be null."
        lines.append(description + "\n")
        if not group.keys:
            continue
        lines.append("| key | type | default | meaning |")
        lines.append("|---|---|---|---|")
        for key in group.keys:
            lines.append(
                f"| `{key.key}` | `{_cell(key.type)}` | `{_cell(key.default)}` | "
                f"{_cell(key.description)} |"
            )
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Write docs/config.md, or with ``--check`` exit 1 when it is out of date."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="only compare, write nothing")
    parser.add_argument("--output", type=Path, default=DOC_PATH, help="file to write")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is out of date: run python -m oprd_mega.config.docs")
            return 1
        return 0
    args.output.write_text(text, encoding="utf-8")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
