#!/usr/bin/env bash
# Set up (or reuse) the project's virtual environment, then lint and run the test suite.
#
#   ./scripts/test.sh [pytest args...]
#
# Environment: VENV, PYTHON, TORCH_SPEC as in scripts/setup.sh.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="${VENV:-$root/.venv}"
"$root/scripts/setup.sh" dev

echo "[test.sh] ruff"
"$venv/bin/ruff" check .
"$venv/bin/ruff" format --check .

echo "[test.sh] pytest"
# Triton kernels run on CPU through the interpreter; it must be set before any kernel is defined.
export TRITON_INTERPRET="${TRITON_INTERPRET:-1}"
exec "$venv/bin/python" -m pytest "$@"
