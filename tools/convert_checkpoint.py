"""Convert checkpoints between Hugging Face and Megatron; see ``--help`` and the README.

A thin entry point: the logic lives in :mod:`oprd_mega.convert`. Run ``verify`` under torchrun.
"""

import sys

from oprd_mega.convert.cli import main

if __name__ == "__main__":  # the torch_dist saver re-imports the main module: keep this guard
    sys.exit(main())
