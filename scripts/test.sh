#!/usr/bin/env bash
# Set up (or reuse) the project's virtual environment, then lint and run the test suite.
#
#   ./scripts/test.sh [--latest] [pytest args...]
#
# By default the environment holds the versions of requirements/lock-cpu.txt (what CI runs).
# --latest: the same suite in .venv-latest, with the newest versions setup.py allows; run it
# before every refresh of the lock (scripts/lock.sh), and fix or bound in setup.py what fails.
# Environment: VENV, PYTHON, TORCH_SPEC, LOCK as in scripts/setup.sh.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
setup=("$root/scripts/setup.sh")
venv="${VENV:-$root/.venv}"
if [ "${1:-}" = "--latest" ]; then
  shift
  setup+=(--latest)
  venv="${VENV:-$root/.venv-latest}"
fi
"${setup[@]}" dev
"$venv/bin/python" -m pip --disable-pip-version-check freeze --exclude-editable \
  >"$venv/installed.txt"
echo "[test.sh] environment: $(grep -E '^(torch|megatron-core|transformers)==' "$venv/installed.txt" | tr '\n' ' ')(all: $venv/installed.txt)"

echo "[test.sh] ruff"
"$venv/bin/ruff" check .
"$venv/bin/ruff" format --check .

echo "[test.sh] pytest"
# Triton kernels run on CPU through the interpreter; it must be set before any kernel is defined.
export TRITON_INTERPRET="${TRITON_INTERPRET:-1}"
exec "$venv/bin/python" -m pytest "$@"
