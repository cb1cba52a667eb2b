#!/usr/bin/env python
"""Kernel micro-benchmarks: see ``python tools/bench_kernels.py --help`` and the README.

Also installed as the console script ``oprd-bench-kernels``.
"""

from oprd_kernels.benchmark import main

if __name__ == "__main__":
    raise SystemExit(main())
