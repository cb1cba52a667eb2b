#!/usr/bin/env bash
# Set up (or reuse) the project's virtual environment, then lint and run the test suite.
#
#   ./scripts/test.sh [pytest args...]
#
# Environment:
#   VENV        virtual environment folder (default: .venv in the repository root)
#   PYTHON      interpreter that creates it (default: python3; needs >= 3.11)
#   TORCH_SPEC  the torch requirement installed first (default: torch==2.13.0, the CPU wheel);
#               GPU users set e.g. TORCH_SPEC="torch==2.11.0" with their own index options.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="${VENV:-$root/.venv}"
python="${PYTHON:-python3}"
torch_spec="${TORCH_SPEC:-torch==2.13.0}"

if [ ! -x "$venv/bin/python" ]; then
  echo "[test.sh] creating virtual environment $venv"
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)

# torch first and pinned: an open-ended torch requirement would pull a multi-GB CUDA build.
echo "[test.sh] installing $torch_spec"
"${pip[@]}" install --quiet "$torch_spec"
echo "[test.sh] installing oprd-mega[dev]"
"${pip[@]}" install --quiet -e ".[dev]"

echo "[test.sh] ruff"
"$venv/bin/ruff" check .
"$venv/bin/ruff" format --check .

echo "[test.sh] pytest"
# Triton kernels run on CPU through the interpreter; it must be set before any kernel is defined.
export TRITON_INTERPRET="${TRITON_INTERPRET:-1}"
exec "$venv/bin/python" -m pytest "$@"
