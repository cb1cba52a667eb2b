"""OPRD-Bridge stage 1: rollouts, both models' hidden states, P_T/mu_T and P_S; see ``--help``.

A thin entry point: the logic lives in :mod:`oprd_mega.bridge.build`. Run it under torchrun,
e.g. ``torchrun --nproc-per-node 2 tools/build_bridge.py --student S --teacher T --prompts P
--out DIR`` (README, "OPRD-Bridge").
"""

import sys

from oprd_mega.bridge.build import main

if __name__ == "__main__":
    sys.exit(main())
