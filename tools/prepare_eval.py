"""Evaluation prompt files from local AIME/MATH-style JSONL or Parquet files; see ``--help``.

A thin entry point: the logic lives in :mod:`oprd_mega.train.eval_data`, e.g.
``python tools/prepare_eval.py aime_2024.parquet -o data/aime24.jsonl``.
"""

import sys

from oprd_mega.train.eval_data import main

if __name__ == "__main__":
    sys.exit(main())
